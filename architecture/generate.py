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

from .int8 import Int8Linear
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
    hundred small kernels a token; on the CPU its wrapper is C++ (`cpp_wrapper`: no Python between the kernels,
    which makes the first compilation of a size two to three times as long: 61 s for the demo model). Where it pays
    (`freezes`), the weights are constants of the program, which lets inductor pre-pack them once into the CPU
    matmul libraries' layouts (MKL's for float32, oneDNN's for bf16). concat_linear makes q/k/v and gate/up one
    matmul each. The two realize thresholds compute a value once where inductor would otherwise recompute it inside a
    loop that reads it many times: the RMSNorm before a matmul row by row (realize_reads_threshold), the RoPE of the
    query (a pow, a cos and a sin per element) once per cached key (realize_opcount_threshold: at most 16 ops
    inline, which still inlines the 4-op int8 unpacking into its matmul). The RoPE alone cost 0.9 ms of a 270M-wide
    layer's step on a 2-core CPU."""
    compiled = torch.compile(decode_one_token, fullgraph=True, dynamic=False)
    options = {"freezing": freezes(model), "cpp.enable_concat_linear": True}
    if model.tok_emb.weight.device.type == "cpu":  # measured on CPUs only; GPUs keep inductor's defaults
        options |= {"cpp_wrapper": True, "realize_reads_threshold": 1, "realize_opcount_threshold": 16}
    compiled_for = set()  # (token shape, cache shape, dtype, device) of the programs compiled so far

    def frozen_decode_one_token(model, token: torch.Tensor, step: TokenStep, cache: KVCache):
        key = (token.shape, cache.keys[0].shape, cache.keys[0].dtype, token.device)
        # Once compiled for this key, skip the guards that check the model's every parameter (0.7 ms a step on a
        # 2-core CPU); only those that tell the compiled programs apart run.
        with (
            torch._inductor.config.patch(options),
            torch.compiler.set_stance(skip_guard_eval_unsafe=key in compiled_for),
        ):
            logits = compiled(model, token, step, cache)
        compiled_for.add(key)
        return logits

    return frozen_decode_one_token


def freezes(model: torch.nn.Module) -> bool:
    """Whether `compile_decode` should freeze `model`'s weights into the program. Not for int8: freezing would
    constant-fold the dequantization into float32 copies of the weights. Not for bf16 on a CPU where oneDNN has no
    bf16 kernels (before AVX-512): its frozen bf16 matmuls decode at half the eager speed there, unfrozen at 1.4x
    (benchmarks/results/generate_cpu.md)."""
    if any(isinstance(module, Int8Linear) for module in model.modules()):
        return False
    weight = model.tok_emb.weight
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return True


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
