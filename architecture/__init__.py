"""Gemma 3 text architecture: the model, its config, KV cache, INT8 weights, Hugging Face import and export.

`from architecture import Gemma3Model, model_config` gives the model class and the default config read from
`config/model_config.json` (loaded on first access, so a broken JSON file only matters to code that uses it).
"""

from pathlib import Path

from .config import ConfigError, ModelConfig
from .gemma3 import IGNORE_INDEX, Gemma3Model, sample_next_token
from .hf_export import export_hf
from .hf_weights import WeightsError, load_weights_into
from .int8 import quantize_int8
from .kv_cache import KVCache

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent.parent / "config" / "model_config.json"

__all__ = [
    "ConfigError",
    "DEFAULT_MODEL_CONFIG",
    "Gemma3Model",
    "IGNORE_INDEX",
    "KVCache",
    "ModelConfig",
    "WeightsError",
    "export_hf",
    "load_weights_into",
    "model_config",
    "quantize_int8",
    "sample_next_token",
]


def __getattr__(name: str):
    if name == "model_config":
        return ModelConfig.from_json(DEFAULT_MODEL_CONFIG)
    raise AttributeError(f"module 'architecture' has no attribute '{name}'")
