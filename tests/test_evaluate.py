"""python -m ryzen_llm.evaluate: loss through the generation kernels, the CLI and its errors."""
import copy
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ryzen_llm import train as train_mod
from ryzen_llm.checkpoint import _sha256, load_checkpoint, save_checkpoint
from ryzen_llm.config import ModelConfig, config_from_dict
from ryzen_llm.data import encode_corpus
from ryzen_llm.evaluate import evaluate, main, windows
from ryzen_llm.model import KVCache, ScaledTransformerModel
from ryzen_llm.ops.dispatch import KernelOptimizer
from ryzen_llm.tokenizer import Tokenizer

# a small corpus of real text: a few standard-library modules, whole
MODULES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py",
           "shlex.py", "colorsys.py", "keyword.py", "calendar.py", "difflib.py", "pprint.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A smoke-preset checkpoint (vocab 512, d_model 64, max_seq_len 32) trained on MODULES."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in MODULES:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, corpus / name)
    assert train_mod.main(["--preset", "smoke", "--data", str(corpus), "--only", "optimized",
                           "--output-dir", str(root / "runs"), "--name", "ev", "--no-progress",
                           f"data.cache_dir={root / 'cache'}"]) == 0
    return root / "runs" / "ev" / "optimized" / "checkpoints" / "best"


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "ck"))


def test_teacher_forced_logits_are_the_engine_prefill_bits():
    """every_position=True runs the kernels of the engine's prefill: its last position is, bit
    for bit, what forward_with_cache (the fused prefill_step at level 3) returns."""
    config = ModelConfig(vocab_size=301, d_model=80, n_layers=2, n_heads=2, d_ff=96,
                         max_seq_len=37)
    torch.manual_seed(0)
    base = ScaledTransformerModel(config)
    idx = torch.randint(0, 301, (3, 37))
    for weights in ("float32", "bfloat16", "int8", "int4"):
        model = copy.deepcopy(base)
        KernelOptimizer(3).apply(model)
        model.cast_linear_weights(weights).eval()
        with torch.inference_mode():
            every = model.forward_with_cache(idx, KVCache(config, 3), every_position=True)
            last = model.forward_with_cache(idx, KVCache(config, 3))
        assert every.shape == (3, 37, 301)
        assert torch.equal(every[:, -1], last), weights
    with pytest.raises(ValueError, match="every_position"):
        model.forward_with_cache(idx[:, :1], KVCache(config, 3), every_position=True)


def test_float32_loss_is_the_training_loss(ckpt):
    """float32 weights through the generation kernels give the loss model.loss (the training
    path, level 0) gives on the same windows."""
    got = evaluate(ckpt, "float32", batch_size=4, progress=False)
    raw = load_checkpoint(ckpt)
    config = config_from_dict(raw.config)
    model = ScaledTransformerModel(config.model)
    model.load_state_dict(raw.model_state)
    tokens = encode_corpus(config.data.source, Tokenizer.load(raw.tokenizer_path), "val",
                           config.data.max_bytes, config.data.val_fraction, progress=False)
    batches = windows(tokens, config.model.max_seq_len, 4, None, "val")
    with torch.no_grad():
        total = sum(model.loss(idx, targets).item() * targets.numel() for idx, targets in batches)
    n = sum(t.numel() for _, t in batches)
    assert got.tokens == n and got.weights == "float32" and got.level == 4
    assert got.loss == pytest.approx(total / n, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(got.loss))


def test_quantized_losses_differ_from_bfloat16_but_are_close(ckpt):
    """The loss is that of the format asked for: int8 and int4 weights change it (so their
    kernels ran), by little."""
    bf16, i8, i4 = (evaluate(ckpt, w, batch_size=4, progress=False)
                    for w in ("bfloat16", "int8", "int4"))
    assert bf16.weights == "bfloat16"
    # the default format is the level's (bfloat16); another batch size sums in another order
    assert evaluate(ckpt, progress=False).loss == pytest.approx(bf16.loss, rel=1e-12)
    assert i8.loss != bf16.loss and i4.loss != bf16.loss
    assert abs(i8.perplexity / bf16.perplexity - 1) < 0.01
    assert abs(i4.perplexity / bf16.perplexity - 1) < 0.05
    assert i8.tokens == bf16.tokens == i4.tokens


def test_cli_json_is_the_last_line_and_max_batches_limits(ckpt, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    assert main(["--checkpoint", str(ckpt), "--weights", "int8", "--data", str(text),
                 "--batch-size", "3", "--max-batches", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["weights"] == "int8" and result["data"] == str(text)
    assert result["tokens"] == 2 * 3 * 32 and result["windows"] == 6
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["checkpoint"] == str(ckpt) and result["level"] == 4
    assert "perplexity" in out and "evaluate int8" in err  # the progress bar, on stderr


def _error(capsys, *argv) -> str:
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_checkpoints_are_named_errors(ckpt, tmp_path, capsys):
    assert "does not exist" in _error(capsys, "--checkpoint", str(tmp_path / "nope"))
    ck = _copy(ckpt, tmp_path)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors: corrupt" in _error(capsys, "--checkpoint", str(ck))
    (ck / "model.safetensors").unlink()
    assert "model.safetensors: listed in the manifest but missing" in _error(
        capsys, "--checkpoint", str(ck))
    shutil.rmtree(ck)
    ck = _copy(ckpt, tmp_path)
    (ck / "manifest.json").unlink()
    assert "no manifest.json" in _error(capsys, "--checkpoint", str(ck))


def test_state_without_config_is_a_named_error(ckpt, tmp_path, capsys):
    ck = _copy(ckpt, tmp_path)
    state = json.loads((ck / "state.json").read_text())
    del state["config"]
    (ck / "state.json").write_text(json.dumps(state))
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["state.json"] = {"sha256": _sha256(ck / "state.json"),
                              "bytes": (ck / "state.json").stat().st_size}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert "state.json: holds no config" in _error(capsys, "--checkpoint", str(ck))


def test_bad_data_and_options_are_named_errors(ckpt, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert "no non-empty text files" in _error(capsys, "--checkpoint", str(ckpt), "--data",
                                               str(tmp_path / "empty.txt"))
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    assert "fewer than one window" in _error(capsys, "--checkpoint", str(ckpt), "--data",
                                             str(tmp_path / "short.txt"))
    assert "is not 'stdlib'" in _error(capsys, "--checkpoint", str(ckpt), "--data",
                                       str(tmp_path / "missing.txt"))
    err = _error(capsys, "--checkpoint", str(ckpt), "--weights", "int3")
    assert "--weights" in err and "int3" in err and "int8" in err
    assert "fused decode_linear" in _error(capsys, "--checkpoint", str(ckpt), "--weights",
                                           "int8", "--level", "0")
    assert "--batch-size" in _error(capsys, "--checkpoint", str(ckpt), "--batch-size", "0")


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ryzen_llm.evaluate", "--checkpoint",
                           str(tmp_path / "nope"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: checkpoint") and "Traceback" not in proc.stderr


def test_weights_that_do_not_fit_the_config_are_a_named_error(ckpt, tmp_path, capsys):
    ck = _copy(ckpt, tmp_path)
    raw = load_checkpoint(ck)
    config = config_from_dict(raw.config)
    config.model.d_ff = 96
    save_checkpoint(ck, ScaledTransformerModel(config_from_dict(raw.config).model),
                    config.to_dict(), tokenizer_file=raw.tokenizer_path)
    assert "does not fit the model" in _error(capsys, "--checkpoint", str(ck))
