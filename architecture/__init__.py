"""Gemma 3 text architecture: the model, its config, KV cache, INT8 weights, Hugging Face import and export.

`Gemma3Model(ModelConfig.from_json(DEFAULT_MODEL_CONFIG))` is the model of `config/model_config.json`.
"""

from .config import DEFAULT_MODEL_CONFIG, REPO_ROOT, ConfigError, ModelConfig
from .gemma3 import IGNORE_INDEX, Gemma3Model, sample_next_token
from .hf_export import export_hf
from .hf_weights import WeightsError, load_weights_into
from .int8 import quantize_int8
from .kv_cache import KVCache

__all__ = [
    "ConfigError",
    "DEFAULT_MODEL_CONFIG",
    "Gemma3Model",
    "IGNORE_INDEX",
    "KVCache",
    "ModelConfig",
    "REPO_ROOT",
    "WeightsError",
    "export_hf",
    "load_weights_into",
    "quantize_int8",
    "sample_next_token",
]
