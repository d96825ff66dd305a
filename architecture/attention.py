"""Attention dispatch for the uncached (training) forward: which kernel each layer type uses at a given length.

Design choices:
- T <= sliding_window: every causal key is inside the window, so all layers use SDPA's causal path
  (flash / memory-efficient kernels on CUDA, the fused flash kernel on the CPU). No mask is built.
- T > sliding_window, full layers: still SDPA's causal path.
- T > sliding_window, sliding layers, backend "sdpa": one boolean T x T mask shared by all sliding layers.
  Correct everywhere, but the kernel computes every block and the mask alone is T^2 bytes.
- T > sliding_window, sliding layers, backend "flex": FlexAttention with a `BlockMask` built once per
  (T, window, device) and cached. Blocks wholly outside the window are skipped, so compute and memory grow as
  T x window. On CUDA it runs through `torch.compile(flex_attention)` (compiled once, at first use); elsewhere
  the eager implementation runs, which is exact but unfused, and is there so the CPU tests can check the
  mask logic against the SDPA path.
- "auto" (the default) picks flex on CUDA and sdpa on every other device: the CPU never takes a CUDA-only
  path, and the CPU test suite keeps testing the SDPA masks.
- Multi-query / grouped-query heads go to both kernels with `enable_gqa=True`, so K/V are never repeated.
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "sdpa", "flex")
Mask = torch.Tensor | BlockMask | None  # None: plain causal

# Compiled lazily at the first CUDA call; dynamic=False because block masks are cached per exact length.
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


def sliding_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend key j: j <= i and j > i - window (transformers' rule)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_mask_mod(window: int):
    """FlexAttention mask_mod with the same rule as `sliding_window_mask`."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return mask_mod


@functools.lru_cache(maxsize=8)
def sliding_block_mask(seq_len: int, window: int, device: torch.device) -> BlockMask:
    """The sliding-window `BlockMask` for one length, shared by every sliding layer and every step."""
    return create_block_mask(sliding_window_mask_mod(window), None, None, seq_len, seq_len, device=device)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def sliding_mask(seq_len: int, window: int, device: torch.device, backend: str = "auto") -> Mask:
    """The mask sliding layers use for an uncached sequence of `seq_len` tokens (None: causal is enough)."""
    if seq_len <= window:
        return None
    if resolve_backend(backend, device) == "flex":
        if torch.compiler.is_compiling():  # traced into the graph (dynamo would bypass the cache anyway)
            return sliding_block_mask.__wrapped__(seq_len, window, device)
        return sliding_block_mask(seq_len, window, device)
    return sliding_window_mask(seq_len, window, device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float) -> torch.Tensor:
    """Attention of q (B, H, T, hd) over k, v (B, H_kv, T, hd), causal when `mask` is None."""
    gqa = q.size(1) != k.size(1)
    if isinstance(mask, BlockMask):
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):  # SDPA is cast by autocast; flex_attention is not
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        flex = _compiled_flex_attention if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
