"""Attention dispatch for the uncached (training) forward: which kernel each layer type uses at a given length.

Design choices:
- T <= sliding_window: every causal key is inside the window, so all layers use SDPA's causal path
  (flash / memory-efficient kernels on CUDA, the fused flash kernel on the CPU). No mask is built.
- T > sliding_window, full layers: still SDPA's causal path.
- T > sliding_window, sliding layers, backend "sdpa": the sequence is cut into blocks of `window` queries, and
  each block attends to its own block and the one before (2 x window keys) under one shared (window, 2 x window)
  boolean mask, in a single batched SDPA call; the first block, which has no block before it, is plain causal.
  Compute and memory grow as T x 2 window (half of each block pair is masked), on every device and with SDPA's
  own backward; K/V are copied twice (each block appears in two pairs), which at T x head_dim is small.
- T > sliding_window, sliding layers, backend "flex": FlexAttention with a `BlockMask` built once per
  (T, window, device) and cached. Blocks wholly outside the window are skipped, so compute and memory grow as
  T x window. On CUDA it runs through `torch.compile(flex_attention)` (compiled once, at first use); elsewhere
  the eager implementation runs, which is exact but unfused, and is there so the CPU tests can check the
  mask logic against the SDPA path.
- "auto" (the default) picks flex on data-center GPUs (A100, H100/H200, B200) and sdpa everywhere else. The
  CPU has no FlexAttention backward in torch 2.13; GPUs with about 100 KB of shared memory per block (RTX
  30xx/40xx/50xx, A6000, L4, L40) cannot compile its backward kernels at the Gemma 3 head_dim of 256
  (pytorch/pytorch#133254, #198224). The CPU tests check the blocked path against SDPA under the dense
  T x T mask and against transformers.
- Multi-query / grouped-query heads go to FlexAttention, and to SDPA wherever one of its fused kernels takes them,
  with `enable_gqa=True`, so K/V are not repeated per head. On CUDA only SDPA's flash kernel takes grouped K/V
  (torch <= 2.13; the memory-efficient kernel, which serves masks, float32 and GPUs before Ampere, does not), and
  elsewhere SDPA would fall back to its math kernel, which materialises every score: there K/V are repeated per
  query head, as on MPS with a torch whose SDPA lacks enable_gqa (probed once).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import ATTENTION_BACKENDS as BACKENDS  # with the config, so a training config is checked without torch

FLEX_GPUS = ((8, 0), (9, 0), (10, 0))  # compute capabilities where "auto" means flex: A100, H100/H200, B200


@dataclass(frozen=True)
class WindowBlocks:
    """Sliding-window attention block by block (see the module docstring): `mask` (window, 2 x window) is True where
    query a of a block may attend key b of the pair (previous block, this block), i.e. a < b <= a + window."""

    window: int
    mask: torch.Tensor


Mask = WindowBlocks | BlockMask | None  # None: plain causal

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
    if backend != "auto":
        return backend
    return "flex" if device.type == "cuda" and torch.cuda.get_device_capability(device) in FLEX_GPUS else "sdpa"


def sliding_mask(seq_len: int, window: int, device: torch.device, backend: str = "auto") -> Mask:
    """The mask sliding layers use for an uncached sequence of `seq_len` tokens (None: causal is enough)."""
    if seq_len <= window:
        return None
    if resolve_backend(backend, device) == "flex":
        if torch.compiler.is_compiling():  # traced into the graph (dynamo would bypass the cache anyway)
            return sliding_block_mask.__wrapped__(seq_len, window, device)
        return sliding_block_mask(seq_len, window, device)
    query, key = torch.arange(window, device=device)[:, None], torch.arange(2 * window, device=device)[None, :]
    return WindowBlocks(window, (key > query) & (key <= query + window))


def window_blocks_attention(q, k, v, blocks: WindowBlocks, scale: float, gqa: bool) -> torch.Tensor:
    """Sliding-window attention of q (B, H, T, hd) over k, v (B, H_kv, T, hd), for T > window."""
    B, T = q.size(0), q.size(2)
    W, n = blocks.window, -(-T // blocks.window)  # n blocks of W, the last one padded (its padding attends itself)
    q, k, v = (F.pad(x, (0, 0, 0, n * W - T)) for x in (q, k, v))
    first = F.scaled_dot_product_attention(
        q[:, :, :W], k[:, :, :W], v[:, :, :W], is_causal=True, scale=scale, enable_gqa=gqa
    )

    def pairs(x: torch.Tensor) -> torch.Tensor:  # (B, h, n W, hd) -> (B (n - 1), h, 2 W, hd): block i-1 next to i
        x = x.unflatten(2, (n, W))
        return torch.cat((x[:, :, :-1], x[:, :, 1:]), dim=3).transpose(1, 2).flatten(0, 1)

    rest_q = q[:, :, W:].unflatten(2, (n - 1, W)).transpose(1, 2).flatten(0, 1)  # (B (n - 1), H, W, hd)
    rest = F.scaled_dot_product_attention(
        rest_q, pairs(k), pairs(v), attn_mask=blocks.mask, scale=scale, enable_gqa=gqa
    )
    rest = rest.unflatten(0, (B, n - 1)).transpose(1, 2).flatten(2, 3)  # (B, H, (n - 1) W, hd)
    return torch.cat((first, rest), dim=2)[:, :, :T]


@functools.cache
def mps_sdpa_has_gqa() -> bool:
    """Whether SDPA takes `enable_gqa` on MPS with the installed torch (probed once with a tiny call)."""
    try:
        q, kv = torch.ones(1, 2, 4, 8, device="mps"), torch.ones(1, 1, 4, 8, device="mps")
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).sum().item()
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def sdpa_takes_grouped_kv(q: torch.Tensor, masked: bool, device_type: str) -> bool:
    """Whether SDPA runs grouped K/V (`enable_gqa`) in a fused kernel for queries `q`, with or without a mask: on
    CUDA, flash's conditions (no mask, half or bf16 as autocast will cast, compute capability 8.0 or newer)."""
    if device_type == "mps":
        return mps_sdpa_has_gqa()
    if device_type != "cuda":
        return True  # the CPU's flash kernel takes grouped K/V, masked or not
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    gpu = torch.cuda.get_device_properties(q.device)
    return not masked and dtype in (torch.float16, torch.bfloat16) and (gpu.major, gpu.minor) >= (8, 0)


def kv_heads_for_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: bool = False, device_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k, v, enable_gqa) for an SDPA call: K/V shared across query heads where a fused kernel takes that, else
    repeated per query head. `device_type` defaults to q's."""
    gqa = q.size(1) != k.size(1)
    if gqa and not sdpa_takes_grouped_kv(q, masked, device_type or q.device.type):
        repeat = q.size(1) // k.size(1)
        return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), False
    return k, v, gqa


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, scale: float) -> torch.Tensor:
    """Attention of q (B, H, T, hd) over k, v (B, H_kv, T, hd), causal when `mask` is None."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # SDPA's CPU kernels are slower in bf16 than in float32 (the demo's bf16 training step: 345 ms with bf16
        # attention, 312 ms with float32, 2-core AVX512-BF16 EPYC), and attention is a small share of the FLOPs.
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), mask, scale)
    if isinstance(mask, BlockMask):
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):  # SDPA is cast by autocast; flex_attention is not
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        flex = _compiled_flex_attention if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    k, v, gqa = kv_heads_for_sdpa(q, k, v, masked=mask is not None)
    if isinstance(mask, WindowBlocks):
        return window_blocks_attention(q, k, v, mask, scale, gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
