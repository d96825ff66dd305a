"""Logits parity with transformers' Gemma3ForCausalLM on shared random weights, in float32."""

import pytest
import torch
from hf_reference import ours_from_hf, random_hf_model, tiny_config

from architecture import DEFAULT_MODEL_CONFIG, Gemma3Model, ModelConfig

TOLERANCE = 1e-4


def max_logit_difference(config, seq_len: int, batch: int = 2) -> float:
    hf_model = random_hf_model(config)
    ours = ours_from_hf(hf_model, config)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = ours(idx)
    return (logits - expected).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="gqa-4-heads-2-kv"),
        pytest.param({"n_kv_groups": 1}, id="mqa"),
        pytest.param({"tie_embeddings": True}, id="tied-head"),
    ],
)
def test_tiny_config_matches_transformers_past_the_window(overrides):
    config = tiny_config(**overrides)
    seq_len = 5 * config.sliding_window + 3  # well past the window: the sliding mask is in play
    assert max_logit_difference(config, seq_len) <= TOLERANCE


def test_short_sequence_takes_plain_causal_path_and_matches():
    config = tiny_config()
    assert max_logit_difference(config, config.sliding_window) <= TOLERANCE


def test_parity_check_detects_a_wrong_window():
    """The comparison is sensitive to the mask: a model whose window is off by one no longer matches."""
    config = tiny_config()
    hf_model = random_hf_model(config)
    wrong = ours_from_hf(hf_model, tiny_config(sliding_window=config.sliding_window + 1))
    idx = torch.randint(0, config.vocab_size, (1, 4 * config.sliding_window))
    with torch.no_grad():
        difference = (wrong(idx)[0] - hf_model(idx).logits).abs().max().item()
    assert difference > 100 * TOLERANCE


def test_seed_config_parameter_count_and_parity():
    model_config = ModelConfig.from_json(DEFAULT_MODEL_CONFIG)
    assert model_config.n_layers == 18 and model_config.vocab_size == 50257
    # 50257*640 embedding + the same again for the separate head + 18 blocks of 5,573,632 + the final norm's 640.
    assert sum(p.numel() for p in Gemma3Model(model_config).parameters()) == 164_654_976
    assert max_logit_difference(model_config, seq_len=24, batch=1) <= TOLERANCE
