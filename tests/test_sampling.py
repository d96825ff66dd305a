"""Sampling: temperature, top-k and top-p on fixed logits; seeded reproducibility; batched equals one-by-one."""

import torch
from hf_reference import tiny_config

from architecture import Gemma3Model, sample_next_token

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0]])


def frequencies(n: int = 20_000, **kwargs) -> torch.Tensor:
    draws = sample_next_token(LOGITS.repeat(n, 1), generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(draws.flatten(), minlength=4).float() / n


def test_temperature_scales_the_distribution():
    for temperature in (0.5, 1.0, 2.0):
        expected = (LOGITS[0] / temperature).softmax(-1)
        torch.testing.assert_close(frequencies(temperature=temperature), expected, atol=0.015, rtol=0)
    assert sample_next_token(LOGITS, temperature=0).item() == 0  # greedy


def test_top_k_renormalises_over_the_k_best():
    expected = torch.tensor([2.0, 1.0]).softmax(-1)
    freq = frequencies(top_k=2)
    torch.testing.assert_close(freq[:2], expected, atol=0.015, rtol=0)
    assert freq[2:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS[0].softmax(-1)  # 0.644, 0.237, 0.087, 0.032
    assert frequencies(top_p=0.6)[0] == 1.0  # the top token alone already holds 0.6
    freq = frequencies(top_p=0.9)  # needs three tokens (0.644 + 0.237 < 0.9)
    torch.testing.assert_close(freq[:3], probs[:3] / probs[:3].sum(), atol=0.015, rtol=0)
    assert freq[3] == 0


def test_seeded_generation_is_reproducible_and_batched_equals_one_by_one():
    torch.manual_seed(0)
    model = Gemma3Model(tiny_config()).eval()
    prompts = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))

    def sampled(seed: int) -> torch.Tensor:
        return model.generate(prompts[:1], 30, temperature=0.9, top_k=50, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sampled(7), sampled(7))
    assert not torch.equal(sampled(7), sampled(8))

    batched = model.generate(prompts, 40, temperature=0)
    one_by_one = torch.cat([model.generate(prompts[i : i + 1], 40, temperature=0) for i in range(3)])
    assert torch.equal(batched, one_by_one)
