"""Gemma 3 text architecture: the model, its config, KV cache, INT8 weights, Hugging Face import and export.

`Gemma3Model(model_config)` is the model of `config/model_config.json`: `model_config` is that file's dict, read
and validated once, at its first use (the seed documents' API); `ModelConfig.from_json(path)` reads any other.
"""

import functools

from .config import DEFAULT_MODEL_CONFIG, REPO_ROOT, ConfigError, ModelConfig
from .gemma3 import Gemma3Model
from .generate import compile_decode, generate, generate_stream, make_cache, sample_next_token
from .hf_export import export_hf
from .hf_weights import WeightsError, load_weights_into
from .int8 import quantize_int8
from .kv_cache import KVCache
from .loss import IGNORE_INDEX


@functools.cache
def _default_model_config() -> dict:
    return ModelConfig.from_json(DEFAULT_MODEL_CONFIG).to_dict()


def __getattr__(name: str):
    if name == "model_config":  # read on first use, so that importing the package never reads a file
        return _default_model_config()
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
