"""Shared helpers for tests that compare against transformers' Gemma 3, the numerical reference."""

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from architecture import Gemma3Model, ModelConfig
from architecture.hf_weights import hf_names


def tiny_config(**overrides) -> ModelConfig:
    """Both layer types, GQA (4 query heads over 2 KV heads), a 16-token window: small enough for any CPU."""
    values = dict(
        vocab_size=300,
        context_length=256,
        emb_dim=64,
        n_heads=4,
        n_layers=4,
        hidden_dim=128,
        head_dim=32,
        n_kv_groups=2,
        query_pre_attn_scalar=24,
        sliding_window=16,
        rope_local_base=10_000.0,
        rope_base=1e6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    values.update(overrides)
    return ModelConfig(**values)


def random_hf_model(config: ModelConfig, seed: int = 0) -> Gemma3ForCausalLM:
    """A transformers model for `config` with every parameter random, norms included (their init is zero)."""
    hf_config = config.to_hf_dict()
    del hf_config["architectures"], hf_config["model_type"]
    model = Gemma3ForCausalLM(Gemma3TextConfig(**hf_config, attn_implementation="eager")).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def ours_from_hf(hf_model: Gemma3ForCausalLM, config: ModelConfig) -> Gemma3Model:
    """Our model holding the same weights as `hf_model`, copied through the loader's name table."""
    model = Gemma3Model(config).eval()
    hf_state = hf_model.state_dict()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in hf_names(model).items():
            params[ours].copy_(hf_state[theirs])
    return model
