"""A mini model trained 30 steps at every level next to level 0 (Liger-Kernel's convergence
test): per-step losses equal within 1e-4 relative at the fp32 levels and 2e-2 at levels 3 (bf16
where the CPU computes bf16 natively) and 4 (int8 GEMMs, the LM head's gradients stochastically
rounded: about four times the worst measured, which docs/benchmarks/int8_training.md records
beside level 3's)."""
import pytest
import torch

from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
from ryzen_llm.ops._extension import extension_loaded

MINI = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=160, max_seq_len=48)
STEPS = 30


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def losses(level: int, device: str = "cpu", odd_batch_at: int | None = None,
           **step_args) -> tuple[list[float], TrainStep]:
    torch.manual_seed(0)
    model = ScaledTransformerModel(MINI).to(device)
    step = TrainStep(model, level=level, lr=3e-3, grad_accum_steps=2, **step_args)
    g = torch.Generator().manual_seed(1)
    # A learnable stream: each sequence counts up from a random start, modulo the vocabulary.
    starts = torch.randint(0, 256, (STEPS, 8, 1), generator=g)
    seqs = (starts + torch.arange(MINI.max_seq_len + 1)) % 256
    # odd_batch_at: that step gets half the batch (another shape than the captured one).
    out = []
    for i in range(STEPS):
        batch = seqs[i, : 4 if i == odd_batch_at else 8]
        out.append(step(batch[:, :-1], batch[:, 1:]))
    return out, step


@pytest.fixture(scope="module")
def baseline() -> list[float]:
    return losses(0)[0]


@pytest.mark.skipif(not extension_loaded(), reason="the fused kernels are not built")
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_level_tracks_the_baseline_step_by_step(level, baseline):
    base = baseline
    got, step = losses(level)
    rtol = 2e-2 if step.bf16 else 1e-4
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, base))
    print(f"level {level} ({'bf16' if step.bf16 else 'fp32'}): loss {base[0]:.4f} -> "
          f"{base[-1]:.4f}, worst per-step relative difference {worst:.2e} (bound {rtol})")
    assert base[-1] < 0.95 * base[0], "the mini model did not learn: the comparison says nothing"
    assert worst <= rtol
    fused = [op for op, c in step.kernels.choices.items() if c.impl == "fused"]
    assert fused, f"level {level} ran no fused op"


@requires_cuda
@pytest.mark.skipif(not extension_loaded(), reason="the fused kernels are not built")
def test_cuda_level3_tracks_level0():
    base, _ = losses(0, "cuda")
    got, step = losses(3, "cuda")
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, base))
    print(f"cuda level 3 ({step.graph_status}): worst per-step relative difference {worst:.2e}")
    assert base[-1] < 0.95 * base[0]
    assert worst <= (2e-2 if step.bf16 else 1e-4)


@requires_cuda
@pytest.mark.skipif(not extension_loaded(), reason="the fused kernels are not built")
def test_cuda_graph_replays_the_eager_step():
    """Level 3 with its CUDA graph gives the losses of the same steps run eagerly, also around a
    step of another batch shape (run eagerly between replays), and counts the same kernel calls."""
    eager, eager_step = losses(3, "cuda", odd_batch_at=12, cuda_graph=False)
    graphed, step = losses(3, "cuda", odd_batch_at=12)
    assert step.graph_status.startswith("on: batch [8, 48] captured"), step.graph_status
    assert eager_step.graph_status == "off"
    worst = max(abs(a - b) / abs(b) for a, b in zip(graphed, eager))
    print(f"graph vs eager: worst per-step relative difference {worst:.2e}")
    assert worst <= 1e-6
    assert step.kernels.calls == eager_step.kernels.calls


def test_cuda_graph_needs_a_cuda_model():
    with pytest.raises(ValueError, match="cuda_graph: needs a model on a CUDA device"):
        TrainStep(ScaledTransformerModel(MINI), level=3, cuda_graph=True)
    assert TrainStep(ScaledTransformerModel(MINI), level=3).graph_status == "off"
