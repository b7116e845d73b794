"""ryzen_llm: train and serve small GPT-style language models fast on ordinary hardware."""
import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `python -m ryzen_llm.<module>` runs cleanly.
_EXPORTS = {
    "Config": "ryzen_llm.config",
    "ModelConfig": "ryzen_llm.config",
    "load_config": "ryzen_llm.config",
    "ScaledTransformerModel": "ryzen_llm.model",
    "KernelOptimizer": "ryzen_llm.ops.dispatch",
    "KernelSet": "ryzen_llm.ops.dispatch",
    "TrainStep": "ryzen_llm.train_step",
    "Engine": "ryzen_llm.engine",
    "SamplingParams": "ryzen_llm.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ryzen_llm' has no attribute {name!r}")
