"""Static key/value cache for generation: full-attention layers grow up to `max_len`, sliding layers use rings.

Design choices:
- Buffers are preallocated once per generation (gpt-fast style), shaped (B, n_kv, slots, head_dim); nothing is
  allocated while decoding and the training forward never creates a cache, so training pays nothing.
- Full-attention layers write token p at slot p and attend over slots [0, end): slicing to the filled length keeps
  a short generation cheap even with a 32k-slot buffer.
- Sliding-window layers keep a ring of min(sliding_window, max_len) slots; token p goes to slot p % ring, so their
  memory is constant however long the sequence. `slot_pos` records the absolute position held in each slot (-1:
  empty), and masks are built from positions, never from slot order. RoPE is applied before caching, at absolute
  positions, so keys stay valid wherever they sit in the ring.
- All bookkeeping for one forward (positions, masks, ring slots) happens once in `begin`, shared by every layer,
  as the uncached forward shares its sliding mask.
- A chunk of several tokens (prefill) attends over [old ring entries, its own keys] with the sliding rule, then
  only its last `ring` keys are written, so the ring holds exactly the keys later tokens can still see. A chunk
  at position 0 has no old entries: it takes the uncached path's attention (causal, or window by window past
  the window), so a long prompt costs T x window there, not T^2.
- A single token (decode) has static shapes: `begin` turns its position into tensors (write slots, masks over
  the whole buffer), and every layer writes with `index_copy_` and attends over its whole buffer under its mask.
  No shape and no Python number inside the step depends on the position, so a compiled decode step
  (`generate.compile_decode`) is traced once per cache size and then replays at every position. The cost is
  attending over unfilled slots of full layers, and the cache is sized to the generation, so that is small.
"""

import math

import torch
import torch.nn.functional as F

from .attention import Mask, attend, kv_heads_for_sdpa, sliding_mask
from .config import ModelConfig


def kv_cache_bytes(config: ModelConfig, tokens: int, dtype_bytes: int, rings: bool = True) -> int:
    """Bytes of keys and values for `tokens` tokens; with `rings`, sliding layers hold at most `sliding_window`."""
    per_entry = 2 * config.n_kv_groups * config.head_dim * dtype_bytes  # a key and a value
    sliding_entries = min(tokens, config.sliding_window) if rings else tokens
    return sum(per_entry * (sliding_entries if kind == "sliding_attention" else tokens) for kind in config.layer_types)


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
        self.max_len, self.window = max_len, config.sliding_window
        self.ring = min(config.sliding_window, max_len)
        self.sliding = [kind == "sliding_attention" for kind in config.layer_types]
        self.keys, self.values = [], []
        for sliding in self.sliding:
            shape = (batch_size, config.n_kv_groups, self.ring if sliding else max_len, config.head_dim)
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

    def begin(self, T: int) -> torch.Tensor:
        """Reserve positions for the next `T` tokens; return them (absolute, for RoPE) and prepare the masks."""
        start, end = self.pos, self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {T} after {start}")
        device = self.slot_pos.device
        positions = torch.arange(start, end, device=device)
        self.start, self.end = start, end
        self.pos = end
        if T == 1:
            self._begin_decode(positions)
            return positions

        # Full layers: a chunk from position 0 is plain causal; a later chunk needs an explicit mask because SDPA's
        # is_causal aligns to the top-left corner.
        self.first_chunk = start == 0
        self.full_mask = None if self.first_chunk else self.full_slots[None, :end] <= positions[:, None]

        # Sliding layers: key positions in attention order, then the ring update.
        n_written = min(T, self.ring)
        written = positions[T - n_written :]
        key_pos = torch.cat((self.slot_pos, positions))
        self.slot_pos[written % self.ring] = written
        self.write_slots, self.n_written = written % self.ring, n_written
        if self.first_chunk:
            self.first_chunk_mask: Mask = sliding_mask(T, self.window, device, backend="sdpa")
        else:
            q = positions[:, None]
            self.sliding_mask = (key_pos >= 0) & (key_pos <= q) & (key_pos > q - self.window)
        return positions

    def _begin_decode(self, position: torch.Tensor) -> None:
        """Slots and masks of one decoded token at `position` (1,), as tensors of fixed shapes."""
        self.ring_slot = position % self.ring
        self.slot_pos.index_copy_(0, self.ring_slot, position)
        self.decode_position = position
        self.ring_mask = ((self.slot_pos >= 0) & (self.slot_pos > position - self.window))[None, :]  # (1, ring)
        self.full_decode_mask = (self.full_slots <= position)[None, :]  # (1, max_len)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Store this forward's `k`, `v` (B, n_kv, T, hd) for `layer` and attend queries `q` over the cache."""
        k_cache, v_cache = self.keys[layer], self.values[layer]
        if k.size(2) == 1:
            slots, mask = (self.ring_slot, self.ring_mask) if self.sliding[layer] else (
                self.decode_position, self.full_decode_mask)  # fmt: skip
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            return decode_attention(q, k_cache, v_cache, mask, scale)
        if not self.sliding[layer]:
            k_cache[:, :, self.start : self.end] = k
            v_cache[:, :, self.start : self.end] = v
            keys, values, gqa = kv_heads_for_sdpa(
                q, k_cache[:, :, : self.end], v_cache[:, :, : self.end], masked=self.full_mask is not None
            )
            return F.scaled_dot_product_attention(
                q, keys, values, attn_mask=self.full_mask, is_causal=self.first_chunk, scale=scale, enable_gqa=gqa
            )
        # Old ring entries first (the cat copies them), so the write below cannot clobber keys still needed.
        if not self.first_chunk:
            keys, values = torch.cat((k_cache, k), dim=2), torch.cat((v_cache, v), dim=2)
        k_cache[:, :, self.write_slots] = k[:, :, -self.n_written :]
        v_cache[:, :, self.write_slots] = v[:, :, -self.n_written :]
        if self.first_chunk:  # nothing was cached before: the uncached forward's attention over its own keys
            return attend(q, k, v, self.first_chunk_mask, scale)
        keys, values, gqa = kv_heads_for_sdpa(q, keys, values, masked=True)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=self.sliding_mask, scale=scale, enable_gqa=gqa
        )  # fmt: skip
