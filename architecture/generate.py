"""Generation: prefill the prompt in one forward, then decode one token per step against a `KVCache`, sampling each.

    for token in generate_stream(model, prompt, max_new_tokens, temperature=0.8, top_k=40): ...
    out = generate(model, prompt, max_new_tokens)            # what `model.generate(...)` runs
    out = generate(model, prompt, max_new_tokens, decode=compile_decode(model))   # a compiled decode step

Design choices (gpt-fast's prefill / decode_one_token / generate):
- The loop owns the cache: it is sized to the generation (prompt + new tokens, at most context_length) and filled
  by one `prefill`, then one `decode_one_token` per new token.
- The loop owns each step's state too: `cache.step(T)` returns it as a value (positions, masks, write slots, as
  gpt-fast's `input_pos`), which goes down the model to every attention layer.
- `decode_one_token` has static shapes: every shape is fixed and no Python number depends on the position (its
  `TokenStep` holds the position as tensors), so `compile_decode` traces it once per cache size. The compiled step
  is a value handed to the loop, never patched onto the model.
- Past context_length the cache cannot slide (RoPE positions are absolute), so each further step re-prefills the
  last context_length tokens: the same tokens the uncached path would see.
- Logits are float32 whatever the weights' dtype; sampling is greedy at temperature 0, else top-k / top-p.
"""

from collections.abc import Callable, Iterator

import torch

from .kv_cache import KVCache, TokenStep

DecodeStep = Callable[[torch.nn.Module, torch.Tensor, TokenStep, KVCache], torch.Tensor]


def make_cache(model: torch.nn.Module, batch_size: int, max_len: int | None = None) -> KVCache:
    """An empty KV cache on `model`'s device and in its dtype (max_len defaults to context_length)."""
    weight = model.tok_emb.weight
    return KVCache(model.config, batch_size, max_len, weight.device, weight.dtype)


def prefill(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """float32 logits (B, vocab) after the prompt `idx` (B, T), cached from position 0 (uncached without a cache)."""
    if cache is not None:
        cache.reset()
    return model.last_logits(idx, cache)


def decode_one_token(model: torch.nn.Module, token: torch.Tensor, step: TokenStep, cache: KVCache):
    """float32 logits (B, vocab) after `token` (B, 1) at the position of `step` (from `cache.step(1)`), cached."""
    return model.last_logits(token, cache, step)


def compile_decode(model: torch.nn.Module) -> DecodeStep:
    """`decode_one_token` compiled for `model` (inference only): one fused program per cache size instead of a few
    hundred small kernels a token. With `freezing`, the weights are constants of the program, which lets inductor
    pre-pack them once into the CPU matmul libraries' layouts (MKL's for float32, oneDNN's for bf16)."""
    compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    # Read when a cache size is first compiled. concat_linear: q/k/v and gate/up become one matmul each.
    options = {"freezing": True, "cpp.enable_concat_linear": True}

    def frozen_decode_one_token(model, token: torch.Tensor, step: TokenStep, cache: KVCache):
        with torch._inductor.config.patch(options):
            return compiled(model, token, step, cache)

    return frozen_decode_one_token


@torch.no_grad()
def generate_stream(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    decode: DecodeStep = decode_one_token,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B, 1), `max_new_tokens` times, continuing the prompts `idx` (B, T).

    All rows share the prompt length. `use_cache=False` recomputes the whole (cropped) sequence each step.
    """
    C = model.config.context_length
    cache = make_cache(model, idx.size(0), min(C, idx.size(1) + max_new_tokens)) if use_cache else None
    context = idx[:, -C:]  # what the next forward reads: the prompt, then each new token
    for _ in range(max_new_tokens):
        if cache is not None and context.size(1) == 1 and cache.pos < cache.max_len:
            logits = decode(model, context, cache.step(1), cache)
        else:  # no cache; or the prompt; or past context_length, where the cache re-prefills the last C tokens
            logits = prefill(model, idx[:, -C:], cache)
        context = sample_next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat((idx, context), dim=1)
        yield context


def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """`idx` (B, T) with `max_new_tokens` sampled tokens appended: one prefill, then cached decode steps. `options`
    are `generate_stream`'s: temperature, top_k, top_p, generator, use_cache, decode."""
    return torch.cat((idx, *generate_stream(model, idx, max_new_tokens, **options)), dim=1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of `logits` (B, vocab): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
