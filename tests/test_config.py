from pathlib import Path

import pytest

from ryzen_llm.config import PRESETS, Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_seed_yaml_is_the_default_config():
    assert load_config(CONFIGS / "scaled_model_training_config.yaml") == Config()


@pytest.mark.parametrize("preset", ["smoke", "quick", "long"])
def test_preset_yaml_files_match_the_presets(preset):
    assert load_config(CONFIGS / f"{preset}.yaml") == load_config(preset=preset)


def test_seed_values():
    c = Config()
    assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff) == (512, 4, 8, 1024)
    assert (c.model.vocab_size, c.model.max_seq_len) == (2048, 128)
    assert c.training.learning_rate == 1e-4 and c.training.batch_size == 16
    assert c.training.gradient_accumulation_steps == 8 and c.training.total_steps == 100
    assert c.optimization.kernel_level == 4 and c.optimization.compression_ratio == 0.3
    assert c.inference.warmup_steps == 100 and c.training.seed == 42


def test_overrides_apply_with_types():
    c = load_config(preset="smoke", overrides=["training.learning_rate=3e-4", "model.dropout=0.1",
                                               "data.source=synthetic"])
    assert c.training.learning_rate == 3e-4 and c.model.dropout == 0.1
    assert c.data.source == "synthetic"
    assert c.model.d_model == PRESETS["smoke"]["model"]["d_model"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.learing_rate=1"], "training.learing_rate: unknown key"),
        (["modle.d_model=3"], "modle: unknown key"),
        (["model.d_model=abc"], "model.d_model: expected int"),
        (["training.epochs=2.5"], "training.epochs: expected int"),
        (["model.n_heads=7"], "divisible by model.n_heads"),
        (["optimization.kernel_level=5"], "optimization.kernel_level"),
        (["inference.kv_cache_dtype=fp8"], "inference.kv_cache_dtype: must be float32 or int8"),
        (["inference.weights=int3"], "inference.weights: must be float32, bfloat16, int8, int4"),
        (["optimization.adamw_state_dtype=float16"],
         "optimization.adamw_state_dtype: must be float32 or bfloat16 or null"),
        (["optimization.int8_gemm=fastest"],
         "optimization.int8_gemm: must be one of auto, own, onednn"),
        (["training.epochs"], "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_unknown_key_in_yaml_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  learning_rate: 1e-3\n  bach_size: 4\n")
    with pytest.raises(ConfigError, match="training.bach_size: unknown key"):
        load_config(f)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(preset="huge")


def test_inference_weights_default_to_the_levels_choice():
    from ryzen_llm.ops.quantized_decode_linear import QUANTIZED_FORMATS
    from ryzen_llm.config import WEIGHT_FORMATS

    assert load_config().inference.weights is None
    assert load_config(overrides=["inference.weights=int4"]).inference.weights == "int4"
    assert WEIGHT_FORMATS[2:] == QUANTIZED_FORMATS  # the quantized formats' one declaration
