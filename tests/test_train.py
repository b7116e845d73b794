"""The trainer end to end: TrainStep, the CLI, checkpoints, resume, and bad input."""
import json

import pytest
import torch

from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
from ryzen_llm import train as train_mod
from ryzen_llm.checkpoint import CheckpointError, load_checkpoint
from ryzen_llm.ops.dispatch import INFERENCE_OPS
from ryzen_llm.train_step import NonFiniteError

TINY = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RYZEN_LLM_CACHE", str(tmp_path / "cache"))


def smoke(tmp_path, *extra):
    return ["--preset", "smoke", "--output-dir", str(tmp_path / "runs"), "--no-progress", *extra]


@pytest.mark.parametrize("level", [0, 3])
def test_overfits_one_batch(level):
    torch.manual_seed(0)
    model = ScaledTransformerModel(TINY)
    step = TrainStep(model, level=level, lr=3e-3, grad_accum_steps=2)
    idx = torch.randint(0, 128, (4, 16))
    targets = torch.roll(idx, -1, dims=1)
    first = step(idx, targets)
    for _ in range(60):
        last = step(idx, targets)
    assert last < 0.2 * first, (first, last)


def test_bf16_adamw_moments_need_the_fused_adamw():
    with pytest.raises(ValueError, match="adamw_state_dtype=torch.bfloat16: needs the fused AdamW"):
        TrainStep(ScaledTransformerModel(TINY), level=2, adamw_state_dtype=torch.bfloat16)
    step = TrainStep(ScaledTransformerModel(TINY), level=3, adamw_state_dtype=torch.bfloat16)
    idx = torch.randint(0, 128, (2, 16))
    step(idx, idx)
    assert {s["exp_avg"].dtype for s in step.optimizer.state.values()} == {torch.bfloat16}


def test_clipping_inside_the_fused_adamw_matches_torchs_clipping(monkeypatch):
    """Level 3 (FusedAdamW): the clipping factor goes into the AdamW pass (grad_scale) instead of
    torch.nn.utils.clip_grad_norm_ multiplying every gradient first; the parameters come out
    the same, bit for bit."""
    from ryzen_llm import train_step as ts

    def run():
        torch.manual_seed(0)
        model = ScaledTransformerModel(TINY)
        step = TrainStep(model, level=3, lr=3e-3, max_grad_norm=0.05)
        g = torch.Generator().manual_seed(1)
        norms = []
        for _ in range(3):
            idx = torch.randint(0, 128, (4, 16), generator=g)
            step(idx, torch.roll(idx, -1, dims=1))
            norms.append(step.last_grad_norm)
        return model, norms, type(step.optimizer).__name__

    fused, fused_norms, name = run()
    if name != "FusedAdamW":
        pytest.skip("level 3 runs torch.optim.AdamW here (no extension)")
    monkeypatch.setattr(ts, "FusedAdamW", type("NotTheOptimizer", (), {}))  # torch's clipping
    plain, plain_norms, _ = run()
    assert min(fused_norms) > 0.05  # every step clipped
    assert fused_norms == plain_norms
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_micro_batch_end_runs_after_each_micro_batch():
    calls = []
    step = TrainStep(ScaledTransformerModel(TINY), level=0, grad_accum_steps=3,
                     micro_batch_end=lambda: calls.append(len(calls)))
    idx = torch.randint(0, 128, (6, 16))
    step(idx, idx)
    assert calls == [0, 1, 2]


def test_nonfinite_loss_stops_without_update():
    model = ScaledTransformerModel(TINY)
    step = TrainStep(model, level=0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    idx = torch.randint(0, 128, (2, 16))
    with pytest.raises(NonFiniteError, match="loss is nan"):
        step(idx, idx)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()
    assert step.step_count == 0


def test_smoke_preset_end_to_end(tmp_path, capsys):
    assert train_mod.main(smoke(tmp_path, "--name", "e2e")) == 0
    run = tmp_path / "runs" / "e2e"
    report = json.loads((run / "report.json").read_text())
    assert (run / "loss_curves.png").stat().st_size > 1000
    for which in ("baseline", "optimized"):
        m = report["runs"][which]
        assert m["completed"] and m["steps"] == 6 and len(m["step_losses"]) == 6
        assert m["tokens_per_s"] > 0 and m["memory"]["peak_rss"] > 0
        assert {"best", "last"} <= set(m["checkpoints"])
        load_checkpoint(run / which / "checkpoints" / "best")  # verifies the manifest
    assert report["runs"]["baseline"]["level"] == 0
    assert report["runs"]["optimized"]["level"] == 4
    # the optimized run's fused AdamW keeps bfloat16 moments; the baseline is torch's AdamW
    assert report["runs"]["baseline"]["adamw_state_dtype"] == "float32"
    assert report["runs"]["optimized"]["adamw_state_dtype"] == "bfloat16"
    # level 4's int8 GEMMs: which implementation ran, per shape (the baseline ran none)
    gemm = report["runs"]["optimized"]["int8_gemm"]
    assert report["runs"]["baseline"]["int8_gemm"] is None and gemm["mode"] == "auto"
    assert gemm["shapes"] and all(c["runs"] in ("own", "onednn") and sum(c["calls"].values()) > 0
                                  for c in gemm["shapes"])
    # counted, not assumed: the baseline ran every model op as its reference
    for op, info in report["runs"]["baseline"]["ops"].items():
        if op in INFERENCE_OPS or op == "int8_linear_cross_entropy":
            # generation only, or level 4's LM head: the baseline never calls it
            assert info["calls"] == {}, op
            continue
        assert set(info["calls"]) == {"reference"}, op
    # and the optimized run's LM head was the int8 one
    lm_heads = {op: report["runs"]["optimized"]["ops"][op]["calls"]
                for op in ("linear_cross_entropy", "int8_linear_cross_entropy")}
    assert lm_heads["linear_cross_entropy"] == {} and lm_heads["int8_linear_cross_entropy"]["fused"] > 0
    assert set(report["criteria"]) >= {"speedup", "final_loss_difference", "memory",
                                       "no_nan_or_inf", "checkpoints_saved"}
    assert report["criteria"]["checkpoints_saved"]["status"] == "PASS"
    assert report["criteria"]["final_loss_difference"]["status"] in ("PASS", "FAIL")
    out = capsys.readouterr().out
    assert "speedup" in out and "report:" in out
    assert "int8 GEMMs (optimized, auto; M x K x N)" in out


def test_config_runs_optimized_trains_only_that_run(tmp_path, capsys):
    """`runs: optimized` (the long preset's) trains one run; the report checks what it can."""
    assert train_mod.main(smoke(tmp_path, "--name", "one", "runs=optimized")) == 0
    run = tmp_path / "runs" / "one"
    report = json.loads((run / "report.json").read_text())
    assert set(report["runs"]) == {"optimized"} and not (run / "baseline").exists()
    assert report["criteria"]["speedup"]["status"] == "NOT MEASURED"
    assert report["criteria"]["convergence"]["status"] in ("PASS", "FAIL")
    assert "optimized" in report["criteria"]["convergence"]["measured"]


@pytest.mark.parametrize("which", ["baseline", "optimized"])
def test_resume_gives_identical_losses(tmp_path, which):
    """The optimized run's checkpoint carries bfloat16 AdamW moments and int8-level state."""
    args = ["--only", which, "training.epochs=2", "training.steps_per_epoch=2"]
    assert train_mod.main(smoke(tmp_path, "--name", "straight", *args)) == 0
    assert train_mod.main(smoke(tmp_path, "--name", "split", "--max-steps", "3", *args)) == 0
    partial = json.loads((tmp_path / f"runs/split/{which}/metrics.json").read_text())
    assert partial["steps"] == 3 and not partial["completed"]
    assert train_mod.main(["--resume", str(tmp_path / "runs/split"), "--no-progress"]) == 0
    a = json.loads((tmp_path / f"runs/straight/{which}/metrics.json").read_text())
    b = json.loads((tmp_path / f"runs/split/{which}/metrics.json").read_text())
    assert b["completed"] and a["step_losses"] == b["step_losses"]
    assert a["final_val_loss"] == b["final_val_loss"]


def test_nonfinite_run_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_call = TrainStep.__call__

    def failing(self, idx, targets):
        if self.step_count == 4:
            raise NonFiniteError(f"step {self.step_count}: loss is nan; the update was not applied")
        return real_call(self, idx, targets)

    monkeypatch.setattr(TrainStep, "__call__", failing)
    assert train_mod.main(smoke(tmp_path, "--name", "nan", "--only", "optimized")) == 1
    run = tmp_path / "runs/nan"
    report = json.loads((run / "report.json").read_text())
    assert report["criteria"]["no_nan_or_inf"]["status"] == "FAIL"
    last = load_checkpoint(run / "optimized/checkpoints/last")
    assert last.trainer_state["step"] == 3  # the end of epoch 1, before the bad step
    assert "loss is nan" in capsys.readouterr().out


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "runs" / "taken"
    run.mkdir(parents=True)
    (run / "report.json").write_text("precious")
    assert train_mod.main(smoke(tmp_path, "--name", "taken")) == 2
    assert (run / "report.json").read_text() == "precious"
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "data, message",
    [
        ("/no/such/corpus.txt", "/no/such/corpus.txt"),
        ("EMPTY", "empty"),
        ("SHORT", "tokens"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, capsys, data, message):
    if data == "EMPTY":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.txt").write_text("")
        data = str(tmp_path / "empty")
    elif data == "SHORT":
        (tmp_path / "short.txt").write_text("just a few words\n")
        data = str(tmp_path / "short.txt")
    assert train_mod.main(smoke(tmp_path, "--data", data, "--name", "bad")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message.lower() in err.lower()


def test_corrupt_checkpoint_is_named_on_resume(tmp_path, capsys):
    args = ["--only", "baseline", "training.epochs=1"]
    assert train_mod.main(smoke(tmp_path, "--name", "c", "--max-steps", "1", *args)) == 0
    weights = tmp_path / "runs/c/baseline/checkpoints/last/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    assert train_mod.main(["--resume", str(tmp_path / "runs/c"), "--no-progress"]) == 2
    assert "model.safetensors: corrupt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(weights.parent)


def test_unknown_config_key_on_the_command_line(tmp_path, capsys):
    assert train_mod.main(smoke(tmp_path, "training.lr=1")) == 2
    assert "training.lr: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("only", [["--only", "baseline"], []], ids=["in-process", "child-process"])
def test_sigint_saves_a_checkpoint_and_resume_finishes(tmp_path, only):
    """SIGINT to the trainer alone (as `kill -INT` sends it; a terminal's Ctrl-C reaches the
    run's child process as well): a checkpoint is saved, and --resume continues from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "runs" / "sig"
    env = {**os.environ, "RYZEN_LLM_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ryzen_llm.train", "--preset", "smoke", "--output-dir",
           str(tmp_path / "runs"), "--name", "sig", "--no-progress", *only,
           "training.epochs=400", "training.steps_per_epoch=1"]
    # A job started in the background of a non-interactive shell (as CI may start this suite)
    # inherits SIGINT ignored, and Python then leaves it ignored: give the trainer the default
    # disposition a terminal would.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    last = run / "baseline" / "checkpoints" / "last"
    # Seen once, that is enough: the trainer rewrites `last` after every step here, and between
    # its two renames (old aside, new in place) the path is briefly absent, so checking it a
    # second time after the loop failed now and then.
    appeared = False
    while not appeared and time.time() < deadline and proc.poll() is None:
        appeared = last.exists()
        time.sleep(0 if appeared else 0.2)
    if not appeared:
        proc.kill()
        raise AssertionError("no checkpoint appeared before the interrupt; trainer output:\n"
                             + proc.communicate()[0])
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted: saving a checkpoint" in out
    step = load_checkpoint(last).trainer_state["step"]
    assert 1 <= step < 400
    resume = subprocess.run(
        [sys.executable, "-m", "ryzen_llm.train", "--resume", str(run), "--no-progress",
         "--max-steps", "2"], env=env, capture_output=True, text=True, timeout=120,
    )
    assert resume.returncode == 0, resume.stdout + resume.stderr
    assert load_checkpoint(last).trainer_state["step"] == step + 2
