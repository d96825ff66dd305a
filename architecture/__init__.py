"""Gemma 3 text architecture: the model, its config, KV cache, INT8 weights, Hugging Face import and export.

`Gemma3Model(model_config)` is the model of `config/model_config.json`: `model_config` is that file's dict, read
and validated once, at its first use (the seed documents' API); `ModelConfig.from_json(path)` reads any other.

Only the config (torch-free) is imported with the package; the names below that need torch are imported together
at the first use of any of them. So `architecture.config` loads in a fraction of a second, and train.py checks its
arguments and config file with it before torch loads (seconds, tens of seconds on a busy CPU).
"""

import functools
import importlib

from .config import DEFAULT_MODEL_CONFIG, REPO_ROOT, ConfigError, ModelConfig

TORCH_NAMES = {  # module: the names it gives the package
    "gemma3": ("Gemma3Model",),
    "generate": ("compile_decode", "generate", "generate_stream", "make_cache", "sample_next_token"),
    "hf_export": ("export_hf",),
    "hf_weights": ("WeightsError", "load_weights_into"),
    "int8": ("quantize_int8",),
    "kv_cache": ("KVCache",),
    "loss": ("IGNORE_INDEX",),
}


@functools.cache
def _default_model_config() -> dict:
    return ModelConfig.from_json(DEFAULT_MODEL_CONFIG).to_dict()


def _import_torch_names() -> None:
    """Bind every name of TORCH_NAMES in the package, as `from .module import name` lines would (so that
    `architecture.generate` is the function, as it was when they were imported with the package)."""
    for module, names in TORCH_NAMES.items():
        loaded = importlib.import_module(f".{module}", __name__)
        globals().update({name: getattr(loaded, name) for name in names})


def __getattr__(name: str):
    if name == "model_config":  # read on first use, so that importing the package never reads a file
        return _default_model_config()
    if any(name in names for names in TORCH_NAMES.values()):
        _import_torch_names()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DEFAULT_MODEL_CONFIG",
    "Gemma3Model",
    "IGNORE_INDEX",
    "KVCache",
    "ModelConfig",
    "REPO_ROOT",
    "WeightsError",
    "compile_decode",
    "export_hf",
    "generate",
    "generate_stream",
    "load_weights_into",
    "make_cache",
    "model_config",
    "quantize_int8",
    "sample_next_token",
]
