"""Model behaviour: loss, masks, parameter dtype, generation and the `python -m architecture` report."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hf_reference import tiny_config

from architecture import IGNORE_INDEX, Gemma3Model, sample_next_token
from architecture.attention import sliding_window_mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Gemma3Model(tiny_config()).eval()


def test_loss_is_cross_entropy_of_returned_logits_ignoring_padding(model):
    idx = torch.randint(0, 300, (2, 40))
    targets = torch.randint(0, 300, (2, 40))
    targets[1, 30:] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 40, 300)
    kept = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None


def test_parameters_are_float32_and_tying_shares_one_tensor():
    model = Gemma3Model(tiny_config(tie_embeddings=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.tok_emb.weight


def test_sliding_mask_is_transformers_rule():
    mask = sliding_window_mask(6, 3, torch.device("cpu"))
    expected = torch.tensor([[abs(i - j) < 3 and j <= i for j in range(6)] for i in range(6)])
    assert torch.equal(mask, expected)


def test_too_long_input_is_rejected(model):
    with pytest.raises(ValueError, match="exceeds context_length 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_generate_is_reproducible_with_a_seed(model):
    prompt = torch.tensor([[1, 2, 3]])
    torch.manual_seed(42)
    first = model.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=40)
    torch.manual_seed(42)
    second = model.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=40)
    assert first.shape == (1, 11) and torch.equal(first, second)
    assert torch.equal(first[:, :3], prompt)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(500, 1)
    generator = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, temperature=5.0, top_k=2, generator=generator)
    assert set(top_k.flatten().tolist()) == {0, 1}
    # softmax([4, 3, 2, 1, 0]) = 0.64, 0.24, 0.09, ...: 0.8 of the mass needs the first two tokens.
    top_p = sample_next_token(logits, temperature=1.0, top_p=0.8, generator=generator)
    assert set(top_p.flatten().tolist()) == {0, 1}
    assert sample_next_token(logits[:1], temperature=0).item() == 0


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": 0}, {"top_p": 1.5}])
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_next_token(torch.zeros(1, 5), **kwargs)


def test_architecture_report():
    result = subprocess.run([sys.executable, "-m", "architecture"], capture_output=True, text=True, check=True)
    assert "164,654,976" in result.stdout
    assert "18,432 bytes per token" in result.stdout  # 18 layers x K and V x 1 head x 256 dims x 2 bytes


SEED_USAGE_EXAMPLE = """
from architecture import Gemma3Model, model_config
import torch

# Initialize model
model = Gemma3Model(model_config)

# Forward pass
input_ids = torch.randint(0, 50257, (2, 128))  # batch_size=2, seq_len=128
logits, loss = model(input_ids, targets=None)

# Generation
prompt = torch.randint(0, 50257, (1, 10))  # Single prompt
generated = model.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=40)
"""  # the seed document's usage example, character for character


def test_the_seed_usage_example_runs_verbatim():
    namespace = {}
    exec(SEED_USAGE_EXAMPLE, namespace)
    model, logits, loss, generated = (namespace[k] for k in ("model", "logits", "loss", "generated"))
    assert sum(p.numel() for p in model.parameters()) == 164_654_976  # the model of config/model_config.json
    assert logits.shape == (2, 128, 50257) and loss is None
    assert generated.shape == (1, 60) and torch.equal(generated[:, :10], namespace["prompt"])
