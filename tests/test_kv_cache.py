"""KV cache: cached generation equals recomputation, past the sliding window and past context_length."""

import pytest
import torch
from hf_reference import tiny_config

from architecture import Gemma3Model, KVCache
from architecture.config import LAYER_TYPES, LayerAttention
from architecture.generate import compile_decode, generate, make_cache


def tiny_model(**overrides) -> Gemma3Model:
    torch.manual_seed(0)
    return Gemma3Model(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_groups": 1}], ids=["gqa", "mqa"])
@pytest.mark.parametrize("prompt_len", [5, 40], ids=["short-prompt", "prompt-past-window"])
def test_greedy_with_cache_equals_recomputation_past_the_window(overrides, prompt_len):
    model = tiny_model(**overrides)
    window = model.config.sliding_window
    new_tokens = 3 * window - prompt_len + 7  # prompt + new tokens > 2 x window
    prompt = torch.randint(0, 300, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, new_tokens, temperature=0)
    recomputed = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new_tokens) and prompt_len + new_tokens > 2 * window
    assert torch.equal(cached, recomputed)


def test_prefill_chunks_and_decode_logits_equal_full_forward():
    model = tiny_model()
    idx = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(2))
    cache = make_cache(model, batch_size=2, max_len=80)
    with torch.no_grad():
        expected, _ = model(idx)
        pieces = [model(idx[:, :23], cache=cache)[0]]  # prefill longer than the 16-token window
        pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(23, 45)]  # decode, ring wraps
        pieces.append(model(idx[:, 45:70], cache=cache)[0])  # a second chunk on top of a wrapped ring
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_generation_past_context_length_matches_recomputation():
    model = tiny_model(context_length=48)
    prompt = torch.randint(0, 300, (1, 60), generator=torch.Generator().manual_seed(3))  # longer than the context
    cached = model.generate(prompt, 12, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))


def test_ring_buffers_bound_sliding_layer_memory():
    config = tiny_config()
    cache = KVCache(config, batch_size=1, max_len=256)
    entry = 2 * config.n_kv_groups * config.head_dim * 4  # key + value, float32
    n_full = config.layer_types.count("full_attention")
    n_sliding = config.n_layers - n_full
    ideal = entry * (n_full * 256 + n_sliding * config.sliding_window)
    assert cache.nbytes() == ideal + 8 * config.sliding_window  # plus one int64 position per ring slot
    for keys, kind in zip(cache.keys, config.layer_types, strict=True):
        assert keys.shape[2] == (256 if kind == "full_attention" else config.sliding_window)
    # A short generation allocates only what it needs, rings included.
    assert KVCache(config, batch_size=1, max_len=10).keys[0].shape[2] == 10


def test_ring_holds_the_last_window_positions_after_wrapping():
    model = tiny_model()
    cache = make_cache(model, batch_size=1, max_len=100)
    with torch.no_grad():
        model(torch.zeros(1, 37, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.pos == 38
    assert sorted(cache.slot_pos.tolist()) == list(range(38 - 16, 38))


def test_overfilling_the_cache_is_an_error():
    model = tiny_model()
    cache = make_cache(model, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="KV cache holds 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(model.config, batch_size=1, max_len=1000)


def test_compiled_decode_step_equals_eager_and_compiles_once_per_cache_size():
    model = tiny_model()
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = model.generate(prompt, 40, temperature=0)  # past the 16-token window: the rings wrap
    decode = compile_decode(model)
    torch._dynamo.reset()
    # A recompilation at any later position would raise: positions live in tensors, not in the traced program.
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(generate(model, prompt, 40, temperature=0, decode=decode), expected)
        assert torch.equal(generate(model, prompt, 40, temperature=0, decode=decode), expected)  # no recompile


def test_a_new_window_kind_is_one_config_entry(monkeypatch):
    """A kind with its own window, added as one LAYER_TYPES entry: the model attends with it (its logits differ
    from the 16-token window's) and cached generation, one ring serving both windows, equals recomputation."""
    monkeypatch.setitem(LAYER_TYPES, "short_sliding", lambda config: LayerAttention(5, config.rope_local_base))
    model = tiny_model(layer_types=["sliding_attention", "short_sliding", "full_attention", "short_sliding"])
    assert [layer.window for layer in model.config.layer_attention] == [16, 5, None, 5]
    same_weights_wider = tiny_model()
    same_weights_wider.load_state_dict(model.state_dict())
    idx = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        short, wide = model(idx)[0], same_weights_wider(idx)[0]
    torch.testing.assert_close(short[:, :5], wide[:, :5])  # within 5 tokens the windows agree
    assert not torch.allclose(short[:, 5:], wide[:, 5:])
    prompt = idx[:, :7]
    cached = model.generate(prompt, 40, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 40, temperature=0, use_cache=False))
