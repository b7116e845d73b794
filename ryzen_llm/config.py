"""Every setting of the library, with its default, in one place.

YAML files load straight into these dataclasses (`load_config`); an unknown key or a value of the
wrong type is an error naming the key. `key=value` overrides (`training.learning_rate=3e-4`) go
through the same checks. The defaults below are the `full` preset: the seed's configuration.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not fit the dataclasses below."""


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 1024
    max_seq_len: int = 128
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib", "synthetic", a text file, a folder or a glob
    max_bytes: int = 24_000_000  # how much of the corpus is read
    val_fraction: float = 0.05  # share of files held out for validation
    cache_dir: str | None = None  # token cache; None = $RYZEN_LLM_CACHE or ~/.cache/ryzen_llm
    eval_batches: int = 8  # validation batches per evaluation


@dataclass
class TrainingConfig:
    learning_rate: float = 1e-4
    batch_size: int = 16  # sequences per micro-batch
    gradient_accumulation_steps: int = 8  # micro-batches per optimizer step
    epochs: int = 10
    steps_per_epoch: int = 10  # optimizer steps per epoch
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_steps: int = 10  # linear warmup, then cosine decay to min_lr_ratio * learning_rate
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 42
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    keep_checkpoints: int = 2  # per-epoch checkpoints kept besides `best` and `last`
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when available, else cpu)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"training.device: must be cpu, cuda or auto, got {self.device!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "epochs", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name}: must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate: must be > 0, got {self.learning_rate}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


ADAMW_STATE_DTYPES = ("float32", "bfloat16")
# Level 4's int8 GEMM on the CPU (ryzen_llm.ops.linear.set_int8_gemm): the faster per shape
# (the own kernel when within 15%), the own AVX512-VNNI kernel, or at::_int_mm (oneDNN).
INT8_GEMMS = ("auto", "own", "onednn")


@dataclass
class OptimizationConfig:
    # 0 = plain PyTorch (the baseline) ... 3 = every fused kernel, 4 = + the blocks' linear layers
    # on int8 GEMMs (CPU; elsewhere level 4 runs level 3's linear layers and says so)
    kernel_level: int = 4
    compression_ratio: float = 0.3  # target bytes of compressed tensors / fp32 bytes; 0 = off
    # AdamW's moments: float32 or bfloat16 (half the bytes; stochastic rounding; fused AdamW on
    # the CPU only); None = bfloat16 where the optimized run uses the fused AdamW on the CPU
    # (level >= 3), float32 elsewhere
    adamw_state_dtype: str | None = None
    int8_gemm: str = "auto"  # INT8_GEMMS: which int8 GEMM level 4 runs on the CPU

    def __post_init__(self):
        from ryzen_llm.ops.dispatch import LEVELS

        if self.int8_gemm not in INT8_GEMMS:
            raise ConfigError(
                f"optimization.int8_gemm: must be one of {', '.join(INT8_GEMMS)}, "
                f"got {self.int8_gemm!r}"
            )

        if self.adamw_state_dtype not in (None, *ADAMW_STATE_DTYPES):
            raise ConfigError(
                f"optimization.adamw_state_dtype: must be {' or '.join(ADAMW_STATE_DTYPES)} or "
                f"null, got {self.adamw_state_dtype!r}"
            )

        if self.kernel_level not in LEVELS:
            raise ConfigError(
                f"optimization.kernel_level: must be one of {', '.join(map(str, LEVELS))}, "
                f"got {self.kernel_level}"
            )
        if not 0.0 <= self.compression_ratio <= 1.0:
            raise ConfigError(
                f"optimization.compression_ratio: must be in [0, 1], got {self.compression_ratio}"
            )


KV_CACHE_DTYPES = ("float32", "int8")
# The formats generation can hold the linear weights in (ryzen_llm.engine's `weights`; the
# quantized ones are ryzen_llm.ops.quantized_decode_linear.QUANTIZED_FORMATS).
WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")


@dataclass
class InferenceConfig:
    warmup_steps: int = 100  # decode steps run before the engine reports ready
    max_batch_size: int = 32
    max_new_tokens: int = 16
    kv_cache_dtype: str = "float32"  # "int8": 0.27x the bytes, one fp32 scale per cached vector
    weights: str | None = None  # linear weights: WEIGHT_FORMATS; None = the level's default
    #                             (bfloat16 at level 3, float32 below)

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"inference.kv_cache_dtype: must be {' or '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"inference.weights: must be {', '.join(WEIGHT_FORMATS)} or null "
                              f"(the level's default), got {self.weights!r}")


@dataclass
class TargetsConfig:
    """The seed's success criteria, checked from measured values in the report."""

    min_speedup: float = 0.25  # optimized tokens/s over baseline tokens/s, minus 1
    max_final_loss_diff: float = 0.05  # |final validation loss, optimized - baseline|
    max_memory_mb: float = 500.0  # peak process memory of the optimized run
    max_final_loss: float = 6.0  # final validation loss of the optimized run (convergence)


@dataclass
class Config:
    name: str = "full"
    output_dir: str = "runs"
    runs: str = "both"  # "both" (baseline, then optimized), "baseline" or "optimized"; --only wins
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)

    def __post_init__(self):
        if self.runs not in RUN_CHOICES:
            raise ConfigError(f"runs: must be {', '.join(RUN_CHOICES)}, got {self.runs!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RUN_CHOICES = ("both", "baseline", "optimized")


# Presets: overrides on top of the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: a tiny model on a small slice of the corpus, for tests and a first look.
    "smoke": {
        "name": "smoke",
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128,
                  "max_seq_len": 32},
        "data": {"max_bytes": 400_000, "eval_batches": 2},
        "training": {"learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 2,
                     "epochs": 2, "steps_per_epoch": 3, "warmup_steps": 1},
    },
    # A couple of minutes: the full-size model, fewer steps.
    "quick": {
        "name": "quick",
        "data": {"max_bytes": 4_000_000},
        "training": {"learning_rate": 3e-4, "gradient_accumulation_steps": 2, "epochs": 3,
                     "steps_per_epoch": 5, "warmup_steps": 2},
    },
    # The seed's configuration: the defaults.
    "full": {},
    # The seed's model trained on ~8 M tokens (a quarter of an hour on 2 idle cores at level 3),
    # the optimized run only (the level-0 baseline would take three times as long).
    "long": {
        "name": "long",
        "runs": "optimized",
        "training": {"learning_rate": 1e-3, "gradient_accumulation_steps": 4, "epochs": 10,
                     "steps_per_epoch": 100, "warmup_steps": 100},
    },
}


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Returns value converted to the annotated type, or raises ConfigError naming the key."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**globals(), **vars(typing)})  # postponed annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    if annotation is float and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    expected = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{full_key}: unknown key (known keys of {prefix.rstrip('.') or 'the config'}: "
                f"{', '.join(fields)})"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{full_key}.")
        else:
            kwargs[key] = _check_type(value, hint, full_key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'training.learning_rate=3e-4' -> {'training': {'learning_rate': 3e-4}}."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. training.epochs=2")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults, then the preset, then the YAML file, then key=value overrides."""
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset {preset!r}: unknown (choose from {', '.join(PRESETS)})")
        data = _merge(data, PRESETS[preset])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
        data = _merge(data, loaded)
    for text in overrides:
        data = _merge(data, parse_override(text))
    return config_from_dict(data)
