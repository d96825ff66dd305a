"""The Gemma 3 text model, numerically equal to transformers' `Gemma3ForCausalLM` given the same
weights.

Design choices:
- Each block is pre- and post-normed around both attention and feed-forward (four RMSNorms), and
  every RMSNorm is Gemma's: computed in float32 and scaled by (1 + weight), so a zero weight is the
  identity.
- Attention goes through `F.scaled_dot_product_attention` with multi-query / grouped-query heads
  (`enable_gqa`: keys and values are not copied per head wherever a fused kernel takes them shared,
  see attention.py). Queries and keys are RMS-normed per head, then rotated with RoPE.
- Each layer's kind (`config.layer_attention`: its window, None for full attention, and its RoPE
  base) is resolved once from `layer_types` and given to its block; the forward computes one RoPE
  table per base and one mask per window, shared by the layers that use them.
- Masks and kernels of the uncached forward are chosen in attention.py: a sequence no longer than
  the window takes SDPA's causal path in every layer; a longer one builds one sliding mask per
  window (a cached FlexAttention `BlockMask` on data-center GPUs, window-sized blocks for SDPA
  elsewhere), and full layers keep the causal path. `model.attention_backend` ("auto", "sdpa",
  "flex") overrides the choice.
- Training loss without the logits: `model(idx, targets, return_logits=False)` computes the
  cross-entropy with `loss.linear_cross_entropy`, which never holds the (B*T, vocab) float32 logits
  whole; the default `return_logits=True` gives `logits, loss = model(idx, targets)`.
- `model.activation_checkpointing = True` recomputes each block in the backward (non-reentrant
  torch.utils.checkpoint) instead of keeping its activations: 8192-token blocks fit one GPU.
- cos/sin tables are computed per forward from float32 inverse frequencies, as transformers does,
  rather than stored as buffers: a model cast to bfloat16 would otherwise round its frequencies too.
- Parameters are created in float32 (training keeps float32 master weights); `config.dtype` is the
  default dtype of sample.py and the exports.
- Generation (generate.py) runs the blocks against a `KVCache` (kv_cache.py) through `last_logits`,
  handing each attention layer the step's positions, masks and slots (a `CacheStep` value); without
  a cache the forward is the training forward. `model.generate(...)` is generate.py's `generate`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Mask, attend, sliding_mask
from .config import LayerAttention, ModelConfig
from .generate import generate
from .kv_cache import CacheStep, KVCache
from .loss import IGNORE_INDEX, linear_cross_entropy

__all__ = ["Gemma3Model"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        # Gemma multiplies by (1 + w) before casting back, unlike Llama which casts first.
        return (normed * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin (T, head_dim) at absolute `positions`, in transformers' half-split layout."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim
    inv_freq = 1.0 / (base**exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-query / grouped-query attention of layer `index` (its buffers' index in a KV cache)."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_groups
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.emb_dim, q_dim, bias=False)
        self.k_proj = nn.Linear(config.emb_dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.emb_dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.emb_dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.scale = config.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask: Mask, cache: KVCache | None = None, step: CacheStep | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            y = cache.attend(self.index, q, k, v, step, self.scale)
        else:
            y = attend(q, k, v, mask, self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.emb_dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """Layer `index`: attention over the tokens `kind` lets each query see, then the feed-forward,
    each pre- and post-normed."""

    def __init__(self, config: ModelConfig, index: int, kind: LayerAttention):
        super().__init__()
        self.kind = kind  # window and RoPE base, resolved once by the config
        self.input_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.attn = Attention(config, index)
        self.post_attn_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.pre_ffn_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.mlp = FeedForward(config)
        self.post_ffn_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask: Mask, cache: KVCache | None = None, step: CacheStep | None = None):
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), cos, sin, mask, cache, step))
        return x + self.post_ffn_norm(self.mlp(self.pre_ffn_norm(x)))


class Gemma3Model(nn.Module):
    """Gemma 3 text model: `logits, loss = model(idx, targets)`; `model.generate(idx, n)`."""

    def __init__(self, config: ModelConfig | dict):
        super().__init__()
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.blocks = nn.ModuleList(Block(cfg, i, k) for i, k in enumerate(cfg.layer_attention))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Sliding layers past the window: "auto", "sdpa" or "flex" (attention.py).
        self.attention_backend = "auto"
        # Recompute blocks in the backward (training forward only).
        self.activation_checkpointing = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # transformers' init: N(0, 0.02) for every matrix; RMSNorm weights stay zero (scale 1).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_hf(cls, path: str, device: str | torch.device = "cpu") -> "Gemma3Model":
        """A model from a local Hugging Face Gemma 3 text checkpoint directory (safetensors)."""
        from .hf_weights import load_weights_into, read_hf_config

        model = cls(ModelConfig.from_hf_dict(read_hf_config(path))).to(device)
        load_weights_into(model, path)
        return model

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool = True,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for every position; loss is the cross-entropy over targets other than
        IGNORE_INDEX, their mean (or with `reduction="sum"` their sum: the trainer divides by the supervised
        targets of a whole accumulated batch).

        With a `cache`, `idx` continues the cached sequence (from position `cache.pos`) and is
        cached. With targets and `return_logits=False`, logits is None and the loss never
        materialises them whole.
        """
        hidden = self.final_norm(self._hidden(idx, cache))
        if targets is not None and not return_logits:
            head = self.lm_head.weight
            loss = linear_cross_entropy(hidden.flatten(0, 1), head, targets.flatten(), reduction=reduction)
            return None, loss
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            flat_logits = logits.float().view(-1, logits.size(-1))
            loss = F.cross_entropy(flat_logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
        return logits, loss

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None, step: CacheStep | None = None):
        """Output of the last block, before the final norm. With a cache and no `step`, `idx`
        continues the cached sequence; a given `step` is what `cache.step` returned for it."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {cfg.context_length}")
        if cache is not None and step is None:
            step = cache.step(T)
        positions = torch.arange(T, device=idx.device) if cache is None else step.positions
        x = self.tok_emb(idx)
        # transformers rounds the scale to the activation dtype (sqrt(640) is 25.25 in bfloat16).
        x = x * torch.tensor(math.sqrt(cfg.emb_dim), dtype=x.dtype)
        kinds = set(cfg.layer_attention)
        bases = {k.rope_base for k in kinds}
        rope = {base: rope_cos_sin(positions, cfg.head_dim, base, x.dtype) for base in bases}
        # Uncached, one mask per window, shared by its layers; full layers are causal (no mask).
        # With a cache, the step holds the masks.
        windows = {k.window for k in kinds if k.window is not None and cache is None}
        backend = self.attention_backend
        masks = {window: sliding_mask(T, window, idx.device, backend) for window in windows}
        recompute = self.activation_checkpointing and cache is None and self.training
        recompute = recompute and torch.is_grad_enabled()
        for block in self.blocks:
            cos, sin = rope[block.kind.rope_base]
            mask = masks.get(block.kind.window)
            if recompute:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, step)
        return x

    def last_logits(self, idx: torch.Tensor, cache: KVCache | None, step: CacheStep | None = None) -> torch.Tensor:
        """float32 logits (B, vocab) of the last position of `idx`: all that generation needs.
        Without `step`, `idx` continues `cache` (or starts a sequence), as in `forward`."""
        hidden = self._hidden(idx, cache, step)
        return self.lm_head(self.final_norm(hidden[:, -1])).float()

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        **options,
    ) -> torch.Tensor:
        """`idx` (B, T) with `max_new_tokens` sampled tokens appended: one prefill, then cached
        decode steps. `options`: top_p, generator, use_cache, decode (generate.generate_stream)."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, **options)
