"""Static key/value cache for generation: full-attention layers grow up to `max_len`, windowed layers use a ring.

Design choices:
- Buffers are preallocated once per generation (gpt-fast style), shaped (B, n_kv, slots, head_dim); nothing is
  allocated while decoding and the training forward never creates a cache, so training pays nothing.
- Each layer's buffer follows its attention (`ModelConfig.layer_attention`, resolved once): a full-attention layer
  (window None) writes token p at slot p and attends over slots [0, end), so slicing to the filled length keeps a
  short generation cheap even with a 32k-slot buffer; a windowed layer keeps a ring of min(largest window, max_len)
  slots where token p goes to slot p % ring, so its memory is constant however long the sequence.
- `slot_pos` records the absolute position held in each ring slot (-1: empty); masks are built from positions,
  never from slot order, so one ring serves every window size. RoPE is applied before caching, at absolute
  positions, so keys stay valid wherever they sit in the ring.
- The cache holds the buffers; what one forward does with them is a value, `step(T)`'s `ChunkStep` or `TokenStep`
  (positions, masks and slots, each computed once and shared by every layer, as gpt-fast's `input_pos`), which the
  generation loop passes down the model to each attention layer. `step` advances the cache by T positions.
- A chunk of several tokens (prefill) attends over [old ring entries, its own keys] with the sliding rule, then
  only its last `ring` keys are written, so the ring holds exactly the keys later tokens can still see. A chunk
  at position 0 has no old entries: it takes the uncached path's attention (causal, or window by window past
  the window), so a long prompt costs T x window there, not T^2.
- A single token (decode) has static shapes: its `TokenStep` holds the position, write slots and masks over the
  whole buffer as tensors, every layer writes with `index_copy_` and attends over its whole buffer under its mask.
  No shape and no Python number inside the step depends on the position, so a compiled decode step
  (`generate.compile_decode`) is traced once per cache size and then replays at every position. The cost is
  attending over unfilled slots of full layers, and the cache is sized to the generation, so that is small.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import Mask, attend, kv_heads_for_sdpa, sliding_mask
from .config import ModelConfig


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype_bytes: int, rings: bool = True) -> int:
    """Bytes of keys and values for `tokens` tokens; with `rings`, a windowed layer holds at most its window."""
    per_entry = 2 * config.n_kv_groups * config.head_dim * dtype_bytes  # a key and a value
    held = [
        tokens if layer.window is None or not rings else min(tokens, layer.window) for layer in config.layer_attention
    ]
    return per_entry * sum(held)


@dataclass(frozen=True)
class ChunkStep:
    """One forward of several tokens at positions [start, end), with shapes that follow the chunk."""

    positions: torch.Tensor  # (T,) absolute positions, for RoPE
    start: int
    end: int
    masks: dict[int | None, Mask | torch.Tensor]  # by window (None: full layers); see KVCache.attend
    ring_slots: torch.Tensor  # where the chunk's last `len(ring_slots)` keys go in the ring


@dataclass(frozen=True)
class TokenStep:
    """One forward of a single token, every field a tensor of fixed shape (a compiled step never recompiles)."""

    positions: torch.Tensor  # (1,)
    slots: dict[int | None, torch.Tensor]  # (1,) write slot, by window (None: full layers)
    masks: dict[int | None, torch.Tensor]  # (1, slots) True where the token may attend, by window


CacheStep = ChunkStep | TokenStep


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float):
    """Attention of one query per head, q (B, H, 1, hd), over keys/values (B, n_kv, S, hd) where `mask` (1, S).

    Two small matmuls and a float32 softmax: for a single query that is cheaper than SDPA's kernel (about 50 us a
    call on a CPU), and the H / n_kv query heads that share a key head become rows of one matmul, so keys and
    values are never repeated per head. Compiled, the same products are written as broadcast multiply-and-sum,
    which inductor fuses into two loops over the cache; its batched-matmul path copied the transposed keys of
    every layer at every step (INT8 decode on the small CPU config: 953 tok/s with it, 1,127 without)."""
    B, H, _, hd = q.shape
    grouped = q.view(B, keys.size(1), H // keys.size(1), hd)  # (B, n_kv, heads per key head, hd)
    if torch.compiler.is_compiling():  # eager, this would hold (B, n_kv, heads per key head, S, hd) floats
        scores = (grouped[:, :, :, None, :].float() * keys[:, :, None, :, :].float()).sum(-1) * scale
        weights = scores.masked_fill(~mask, -math.inf).softmax(dim=-1)
        out = (weights[..., None] * values[:, :, None, :, :].float()).sum(-2).to(values.dtype)
        return out.view(B, H, 1, hd)
    scores = (grouped @ keys.transpose(-1, -2)).float() * scale
    weights = scores.masked_fill(~mask, -math.inf).softmax(dim=-1).to(values.dtype)
    return (weights @ values).view(B, H, 1, hd)


class KVCache:
    """Keys and values of every layer for `batch_size` sequences of at most `max_len` tokens."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        max_len = config.context_length if max_len is None else max_len
        if not 0 < max_len <= config.context_length:
            raise ValueError(f"max_len must be in [1, context_length={config.context_length}], got {max_len}")
        self.max_len = max_len
        self.windows = [layer.window for layer in config.layer_attention]  # per layer; None: full attention
        windowed = [window for window in self.windows if window is not None]
        self.ring = min(max(windowed, default=max_len), max_len)
        self.keys, self.values = [], []
        for window in self.windows:
            shape = (batch_size, config.n_kv_groups, max_len if window is None else self.ring, config.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.slot_pos = torch.full((self.ring,), -1, device=device, dtype=torch.long)
        self.full_slots = torch.arange(max_len, device=device)  # full layers hold position p at slot p
        self.pos = 0  # tokens cached so far; the next token's absolute position

    def reset(self) -> None:
        """Forget every cached token (buffers are kept; stale entries are masked by `slot_pos`)."""
        self.pos = 0
        self.slot_pos.fill_(-1)

    def nbytes(self) -> int:
        """Bytes held by the cache (keys, values and slot positions)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.slot_pos))

    def step(self, T: int) -> CacheStep:
        """Reserve positions for the next `T` tokens and record them in the ring; return what the forward of those
        tokens needs: a `TokenStep` for one token (decode), a `ChunkStep` for several (prefill)."""
        start, end = self.pos, self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {T} after {start}")
        positions = torch.arange(start, end, device=self.slot_pos.device)
        self.pos = end
        if T == 1:
            return self._token_step(positions)
        ring_keys = torch.cat((self.slot_pos, positions))  # positions of the keys a later chunk attends over
        written = positions[-self.ring :]
        self.slot_pos[written % self.ring] = written
        masks = {}
        for window in set(self.windows):
            if window is None:  # from position 0, plain causal; later, explicit (SDPA's is_causal is top-left)
                masks[None] = None if start == 0 else self.full_slots[None, :end] <= positions[:, None]
            elif start == 0:
                masks[window] = sliding_mask(T, window, positions.device, backend="sdpa")
            else:
                query = positions[:, None]
                masks[window] = (ring_keys >= 0) & (ring_keys <= query) & (ring_keys > query - window)
        return ChunkStep(positions, start, end, masks, written % self.ring)

    def _token_step(self, position: torch.Tensor) -> TokenStep:
        """Slots and masks of one decoded token at `position` (1,), as tensors of fixed shapes."""
        ring_slot = position % self.ring
        self.slot_pos.index_copy_(0, ring_slot, position)
        slots, masks = {}, {}
        for window in set(self.windows):
            if window is None:
                slots[None], masks[None] = position, (self.full_slots <= position)[None, :]
            else:
                slots[window] = ring_slot
                masks[window] = ((self.slot_pos >= 0) & (self.slot_pos > position - window))[None, :]
        return TokenStep(position, slots, masks)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: CacheStep, scale: float
    ) -> torch.Tensor:
        """Store `layer`'s keys and values of this step, `k`, `v` (B, n_kv, T, hd), and attend `q` over the cache."""
        k_cache, v_cache = self.keys[layer], self.values[layer]
        window = self.windows[layer]
        mask = step.masks[window]
        if isinstance(step, TokenStep):
            k_cache.index_copy_(2, step.slots[window], k)
            v_cache.index_copy_(2, step.slots[window], v)
            return decode_attention(q, k_cache, v_cache, mask, scale)
        if window is None:
            k_cache[:, :, step.start : step.end] = k
            v_cache[:, :, step.start : step.end] = v
            keys, values = k_cache[:, :, : step.end], v_cache[:, :, : step.end]
            keys, values, gqa = kv_heads_for_sdpa(q, keys, values, masked=mask is not None)
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )
        # Old ring entries first (the cat copies them), so the write below cannot clobber keys still needed.
        first_chunk = step.start == 0
        if not first_chunk:
            keys, values = torch.cat((k_cache, k), dim=2), torch.cat((v_cache, v), dim=2)
        n_written = len(step.ring_slots)
        k_cache[:, :, step.ring_slots] = k[:, :, -n_written:]
        v_cache[:, :, step.ring_slots] = v[:, :, -n_written:]
        if first_chunk:  # nothing was cached before: the uncached forward's attention over its own keys
            return attend(q, k, v, mask, scale)
        keys, values, gqa = kv_heads_for_sdpa(q, keys, values, masked=True)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
