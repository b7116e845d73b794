"""Fused multi-tensor AdamW against torch.optim.AdamW and reference.adamw_step."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, requires_extension

pytestmark = requires_extension

# Odd shapes on purpose: a scalar-like (1,), a prime length, a 2-D weight, one spanning blocks.
SHAPES = [(1,), (97,), (48, 80), (3, 97, 5), (70_001,)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def FusedAdamW(*args, **kwargs):
    from ryzen_llm.ops.adamw import FusedAdamW as cls

    return cls(*args, **kwargs)


def make_params(dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in SHAPES]


def run_steps(params, opt, steps=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        opt.step()


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Difference in units of float32 eps of max(|b|, 1) (an absolute error near zero)."""
    scale = b.double().abs().clamp_min(1.0) * torch.finfo(torch.float32).eps
    return ((a.double() - b.double()).abs() / scale).max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["single", "foreach", "fused"])
def test_five_steps_match_torch_adamw(mode, device):
    ours, theirs = make_params(device=device), make_params(device=device)
    kw = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    run_steps(ours, FusedAdamW(ours, **HYPER))
    run_steps(theirs, torch.optim.AdamW(theirs, **HYPER, **kw[mode]))
    for a, b in zip(ours, theirs):
        err = max_ulps(a.detach(), b.detach())
        print(f"{tuple(a.shape)} vs torch AdamW ({mode}): {err:.1f} ulp")
        assert err <= 8, f"{tuple(a.shape)}: {err:.1f} ulp from torch.optim.AdamW ({mode})"


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_adamw_step_fp64(device):
    ours = make_params(torch.float64, device=device)
    ref = [p.detach().clone() for p in ours]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    opt = FusedAdamW(ours, **HYPER)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(device) for p in ours]
        for p, gr in zip(ours, grads):
            p.grad = gr
        opt.step()
        reference.adamw_step(ref, grads, m, v, HYPER["lr"], *HYPER["betas"], HYPER["eps"],
                             HYPER["weight_decay"], step)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_params_follow_fp32_master(device):
    """bfloat16 params: the update runs on a float32 master copy, the param is its rounding."""
    ours = make_params(torch.bfloat16, device=device)
    master = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt_ours = FusedAdamW(ours, **HYPER)
    opt_master = torch.optim.AdamW(master, **HYPER, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(ours, master):
            grad = torch.randn(p.shape, generator=g).to(device, torch.bfloat16)
            p.grad, q.grad = grad, grad.float()
        opt_ours.step()
        opt_master.step()
    for p, q in zip(ours, master):
        ours_master = opt_ours.state[p]["master_param"]
        assert max_ulps(ours_master, q.detach()) <= 8
        # The parameter is exactly our master's rounding (torch's master may round to the
        # neighbouring bfloat16 where the two masters differ by an ulp across a rounding edge).
        torch.testing.assert_close(p.detach(), ours_master.to(torch.bfloat16), rtol=0, atol=0)


def test_state_dict_round_trip_and_torch_compatible():
    ours, theirs = make_params(), make_params()
    opt = FusedAdamW(ours, **HYPER)
    run_steps(ours, opt, steps=2)
    sd = opt.state_dict()
    torch_opt = torch.optim.AdamW(theirs, **HYPER)
    run_steps(theirs, torch_opt, steps=2)
    torch_sd = torch_opt.state_dict()
    for i in sd["state"]:
        assert set(sd["state"][i]) == set(torch_sd["state"][i])
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert sd["state"][i][key].shape == torch_sd["state"][i][key].shape
            assert sd["state"][i][key].dtype == torch_sd["state"][i][key].dtype
    # Reload ours into a fresh FusedAdamW and torch's into ours: both continue identically.
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    restored = FusedAdamW(restored_params, **HYPER)
    restored.load_state_dict(copy.deepcopy(sd))  # state_dict() shares the live tensors
    run_steps(ours, opt, steps=3, seed=7)
    run_steps(restored_params, restored, steps=3, seed=7)
    for a, b in zip(ours, restored_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from_torch_params = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    from_torch = FusedAdamW(from_torch_params, **HYPER)
    from_torch.load_state_dict(copy.deepcopy(torch_sd))
    run_steps(theirs, torch_opt, steps=3, seed=7)
    run_steps(from_torch_params, from_torch, steps=3, seed=7)
    for a, b in zip(from_torch_params, theirs):
        assert max_ulps(a.detach(), b.detach()) <= 8


def test_training_does_not_import_dynamo():
    """Optimizer's add_param_group, zero_grad and state_dict carry torch._disable_dynamo, whose
    first call imports torch._dynamo (~70 MiB resident); FusedAdamW runs them plain until then."""
    code = (
        "import sys, torch\n"
        "from ryzen_llm.ops.adamw import FusedAdamW\n"
        "p = torch.nn.Parameter(torch.randn(4, 3))\n"
        "opt = FusedAdamW([p], lr=1e-3)\n"
        "p.grad = torch.randn(4, 3); opt.step(); opt.zero_grad()\n"
        "opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_plain_methods_keep_dynamo_semantics_once_loaded():
    """With torch._dynamo imported, the wrapped methods are the ones torch defines."""
    import torch._dynamo  # noqa: F401

    p = torch.nn.Parameter(torch.randn(3))
    opt = FusedAdamW([p], lr=1e-3)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})
    p.grad = torch.randn(3)
    opt.zero_grad()
    assert p.grad is None and len(opt.param_groups) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.randn_like(p) for p in params]
    v = [torch.rand_like(p) for p in params]
    torch.library.opcheck(
        torch.ops.ryzen_llm.adamw_step_, (params, grads, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3)
    )
    bf = [p.bfloat16() for p in params]
    torch.library.opcheck(
        torch.ops.ryzen_llm.adamw_master_step_,
        (bf, [p.clone() for p in params], [g.bfloat16() for g in grads], m, v,
         1e-3, 0.9, 0.999, 1e-8, 0.01, 3),
    )


def test_torch_compile_fullgraph():
    params = [torch.randn(5), torch.randn(3, 4)]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    p2, m2, v2 = ([t.clone() for t in ts] for ts in (params, m, v))

    def step(ps, gs, ms, vs):
        torch.ops.ryzen_llm.adamw_step_(ps, gs, ms, vs, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)

    torch.compile(step, fullgraph=True, backend="aot_eager")(params, grads, m, v)
    step(p2, grads, m2, v2)
    for a, b in zip(params + m + v, p2 + m2 + v2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "index, mutate, message",
    [
        (1, lambda ts: [ts[0][:-1], ts[1]], "grads\\[0\\]: expected sizes"),
        (1, lambda ts: [ts[0].double(), ts[1]], "grads\\[0\\]: expected dtype"),
        (2, lambda ts: ts[:1], "exp_avgs: expected 2 tensors"),
        (3, lambda ts: [ts[0], ts[1].t().contiguous()], "exp_avg_sqs\\[1\\]: expected sizes"),
        (0, lambda ts: [ts[0], ts[1].t()], "params\\[1\\]: expected a contiguous tensor"),
        (0, lambda ts: [t.int() for t in ts], "params\\[0\\]: expected float32 or float64"),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_named_error(index, mutate, message, device):
    lists = [[torch.randn(5, device=device), torch.randn(3, 4, device=device)] for _ in range(4)]
    lists[index] = mutate(lists[index])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.adamw_step_(*lists, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)


def test_bad_step_raises_named_error():
    lists = [[torch.randn(5)] for _ in range(4)]
    with pytest.raises(RuntimeError, match="step: expected the 1-based step count"):
        torch.ops.ryzen_llm.adamw_step_(*lists, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_bad_grad_scale_raises_named_error(bad):
    lists = [[torch.randn(5)] for _ in range(4)]
    with pytest.raises(RuntimeError, match="grad_scale: expected a finite non-negative value"):
        torch.ops.ryzen_llm.adamw_step_(*lists, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, bad)
    params = [torch.nn.Parameter(torch.randn(5))]
    params[0].grad = torch.randn(5)
    with pytest.raises(ValueError, match="grad_scale: expected a finite non-negative value"):
        FusedAdamW(params, **HYPER).step(grad_scale=bad)


# -- gradient clipping in the step ----------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_grad_scale_is_clipping_then_the_step_bit_for_bit(device, state_dtype):
    """step(grad_scale=c) leaves the gradients alone and updates exactly as
    torch.nn.utils.clip_grad_norm_ (which multiplies them by c) followed by step(): the same
    float32 product, so the same bits, for float32 parameters with either moment dtype."""
    if state_dtype is not None and device != "cpu":
        pytest.skip("bfloat16 moments: CPU only")
    kw = {} if state_dtype is None else dict(state_dtype=state_dtype)
    ours, theirs = make_params(device=device), make_params(device=device)
    opt_ours, opt_theirs = FusedAdamW(ours, **HYPER, **kw), FusedAdamW(theirs, **HYPER, **kw)
    g = torch.Generator().manual_seed(1)
    for max_norm in (0.5, 1e9, 2.0):  # clipped, not clipped (c = 1), clipped
        for p, q in zip(ours, theirs):
            p.grad = 10 * torch.randn(p.shape, generator=g).to(device)
            q.grad = p.grad.clone()
        held = [p.grad.clone() for p in ours]
        norm = torch.nn.utils.get_total_norm([p.grad for p in ours])
        scale = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        opt_ours.step(grad_scale=scale)
        assert torch.nn.utils.clip_grad_norm_(theirs, max_norm) == norm
        opt_theirs.step()
        assert all(torch.equal(p.grad, h) for p, h in zip(ours, held))
        assert (scale < 1.0) == (max_norm < 1e9)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_ours.state[a][key], opt_theirs.state[b][key], rtol=0,
                                       atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_with_bf16_params_follows_scaled_float32_gradients(device):
    """bfloat16 parameters: the scale multiplies the bfloat16 gradient in float32 (clipping in
    place would round the product to bfloat16 first), so the master follows torch.optim.AdamW
    on the float32 products."""
    ours = make_params(torch.bfloat16, device=device)
    master = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt_ours = FusedAdamW(ours, **HYPER)
    opt_master = torch.optim.AdamW(master, **HYPER, foreach=False)
    g = torch.Generator().manual_seed(1)
    for scale in (0.3, 1.0, 0.05):
        for p, q in zip(ours, master):
            grad = torch.randn(p.shape, generator=g).to(device, torch.bfloat16)
            p.grad, q.grad = grad, grad.float() * scale
        opt_ours.step(grad_scale=scale)
        opt_master.step()
    for p, q in zip(ours, master):
        assert max_ulps(opt_ours.state[p]["master_param"], q.detach()) <= 8


# -- bfloat16 moments ------------------------------------------------------------------------


def test_bf16_moments_match_reference():
    """The fused step with bfloat16 moments against reference.adamw_step on the same moments:
    the same random bits round the same float32 values. The float32 arithmetic may differ by
    an ulp (contraction, vector order), which would flip a stochastic rounding only where the
    random threshold falls between the two values (on the development machine: none of them)."""
    ours = make_params()
    ref = [p.detach().clone() for p in ours]
    m = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ref]
    v = [torch.zeros_like(p, dtype=torch.bfloat16) for p in ref]
    opt = FusedAdamW(ours, **HYPER, state_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, gr in zip(ours, grads):
            p.grad = gr
        opt.step()
        reference.adamw_step(ref, grads, m, v, HYPER["lr"], *HYPER["betas"], HYPER["eps"],
                             HYPER["weight_decay"], step)
    total = differ = 0
    for p, r, mr, vr in zip(ours, ref, m, v):
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        for ours_moment, ref_moment in ((state["exp_avg"], mr), (state["exp_avg_sq"], vr)):
            torch.testing.assert_close(ours_moment.float(), ref_moment.float(), rtol=2**-7, atol=0)
            differ += int((ours_moment != ref_moment).sum())
            total += ref_moment.numel()
        assert max_ulps(p.detach(), r) <= 64
    print(f"moments differing from the reference: {differ} of {total}")
    assert differ <= total // 1000


def test_bf16_moments_are_unbiased_where_rounding_to_nearest_stalls():
    """beta2 = 0.999: once v is large, each step moves it by less than half a bfloat16 spacing.
    Rounded to nearest it would stay where it is; rounded stochastically its mean follows the
    float32 moments."""
    n, beta2 = 100_000, 0.999
    p32, p16 = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    hyper = dict(lr=0.0, betas=(0.9, beta2), weight_decay=0.0)
    o32, o16 = FusedAdamW([p32], **hyper), FusedAdamW([p16], **hyper, state_dtype=torch.bfloat16)
    nearest = torch.zeros(n, dtype=torch.bfloat16)
    for i in range(1500):
        g = torch.full((n,), 1.0 if i < 500 else 2.0)
        p32.grad, p16.grad = g, g.clone()
        o32.step()
        o16.step()
        nearest = (nearest.float() * beta2 + (1 - beta2) * g * g).to(torch.bfloat16)
    v32 = o32.state[p32]["exp_avg_sq"]
    v16 = o16.state[p16]["exp_avg_sq"].float()
    nearest_error = abs(nearest.float().mean().item() / v32.mean().item() - 1)
    stochastic_error = abs(v16.mean().item() / v32.mean().item() - 1)
    print(f"mean v relative error: stochastic {stochastic_error:.2e}, nearest {nearest_error:.2e}")
    assert nearest_error > 0.05  # the failure the stochastic rounding is there for
    assert stochastic_error < 2e-3


def test_bf16_moments_do_not_depend_on_the_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = make_params()
            run_steps(params, FusedAdamW(params, **HYPER, state_dtype=torch.bfloat16))
            results.append(params)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_moments_survive_a_state_dict_round_trip():
    """torch's load_state_dict casts the moments to the parameter's dtype; the next step makes
    them bfloat16 again, exactly (a bfloat16 value is exact in float32)."""
    ours = make_params()
    opt = FusedAdamW(ours, **HYPER, state_dtype=torch.bfloat16)
    run_steps(ours, opt, steps=2)
    restored_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    restored = FusedAdamW(restored_params, **HYPER, state_dtype=torch.bfloat16)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    run_steps(ours, opt, steps=3, seed=7)
    run_steps(restored_params, restored, steps=3, seed=7)
    for a, b in zip(ours, restored_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert restored.state[b]["exp_avg"].dtype == torch.bfloat16


def test_bf16_moments_follow_float32_moments():
    """Training-like use: 50 steps of a float32 model's AdamW with bfloat16 moments stay close
    to the same steps with float32 moments (the moments' relative rounding is 2^-9 on average)."""
    ours, theirs = make_params(), make_params()
    run_steps(ours, FusedAdamW(ours, **HYPER, state_dtype=torch.bfloat16), steps=50)
    run_steps(theirs, FusedAdamW(theirs, **HYPER), steps=50)
    for a, b in zip(ours, theirs):
        rel = ((a - b).detach().abs().mean() / b.detach().abs().mean()).item()
        print(f"{tuple(a.shape)}: mean |difference| / mean |param| = {rel:.1e}")
        assert rel < 5e-3


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.float64])
def test_bad_state_dtype_raises_named_error(state_dtype):
    with pytest.raises(ValueError, match="state_dtype: expected torch.float32 or torch.bfloat16"):
        FusedAdamW(make_params(), **HYPER, state_dtype=state_dtype)


def test_bf16_moments_of_float64_params_raise_named_error():
    lists = [[torch.randn(5, dtype=torch.float64)] for _ in range(4)]
    lists[2] = [torch.zeros(5, dtype=torch.bfloat16)]
    lists[3] = [torch.zeros(5, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="exp_avgs\\[0\\]: expected dtype Double"):
        torch.ops.ryzen_llm.adamw_step_(*lists, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
