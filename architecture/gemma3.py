"""The Gemma 3 text model, numerically equal to transformers' `Gemma3ForCausalLM` given the same weights.

Design choices:
- Each block is pre- and post-normed around both attention and feed-forward (four RMSNorms), and every RMSNorm
  is Gemma's: computed in float32 and scaled by (1 + weight), so a zero weight is the identity.
- Attention goes through `F.scaled_dot_product_attention` with multi-query / grouped-query heads
  (`enable_gqa`, so keys and values are never copied per head). Queries and keys are RMS-normed per head,
  then rotated with RoPE whose base depends on the layer type (local for sliding, global for full layers).
- Masks and kernels of the uncached forward are chosen in attention.py: a sequence no longer than the sliding
  window takes SDPA's causal path in every layer; a longer one builds one sliding mask per forward, shared by all
  sliding layers (a cached FlexAttention `BlockMask` on data-center GPUs, window-sized blocks for SDPA
  elsewhere), and full layers keep the causal path. `model.attention_backend` ("auto", "sdpa", "flex")
  overrides the choice.
- Training loss without the logits: `model(idx, targets, return_logits=False)` computes the cross-entropy with
  `loss.linear_cross_entropy`, which never holds the (B*T, vocab) float32 logits whole; the default
  `return_logits=True` gives `logits, loss = model(idx, targets)`.
- `model.activation_checkpointing = True` recomputes each block in the backward (torch.utils.checkpoint,
  non-reentrant) instead of keeping its activations: long blocks (8192 tokens and beyond) fit one GPU.
- cos/sin tables are computed per forward from float32 inverse frequencies, as transformers does, rather than
  stored as buffers: a model cast to bfloat16 would otherwise round its frequencies too.
- Parameters are created in float32 (training keeps float32 master weights); `config.dtype` is for inference.
- Generation prefills the prompt in one forward and then decodes one token per forward against a `KVCache`
  (see kv_cache.py). Without a cache the forward is the training forward. Past context_length the
  cache cannot slide (RoPE positions are absolute), so each further step re-prefills the last context_length
  tokens: the same tokens the uncached path would see.
"""

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import Mask, attend, sliding_mask
from .config import ModelConfig
from .kv_cache import KVCache
from .loss import IGNORE_INDEX, linear_cross_entropy

__all__ = ["Gemma3Model", "sample_next_token"]


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
    """cos and sin of shape (T, head_dim) for absolute `positions`, in the half-split layout of transformers."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_groups, config.head_dim
        self.q_proj = nn.Linear(config.emb_dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.emb_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.emb_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.emb_dim, bias=False)
        norm = (lambda: RMSNorm(self.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.scale = config.query_pre_attn_scalar**-0.5

    def forward(self, x, cos, sin, mask: Mask, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            y = cache.attend(layer, q, k, v, self.scale)
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
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.input_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.pre_ffn_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)
        self.mlp = FeedForward(config)
        self.post_ffn_norm = RMSNorm(config.emb_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask: Mask, cache: KVCache | None = None, layer: int = 0):
        x = x + self.post_attn_norm(self.attn(self.input_norm(x), cos, sin, mask, cache, layer))
        return x + self.post_ffn_norm(self.mlp(self.pre_ffn_norm(x)))


class Gemma3Model(nn.Module):
    """Gemma 3 text model: `logits, loss = model(idx, targets)`; `model.generate(prompt, max_new_tokens, ...)`."""

    def __init__(self, config: ModelConfig | dict):
        super().__init__()
        self.config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        cfg = self.config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.blocks = nn.ModuleList(Block(cfg, layer_type) for layer_type in cfg.layer_types)
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.attention_backend = "auto"  # sliding layers past the window: "auto", "sdpa" or "flex" (attention.py)
        self.activation_checkpointing = False  # recompute blocks in the backward (training forward only)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # transformers' Gemma 3 init: N(0, 0.02) for every matrix; RMSNorm weights stay zero, i.e. scale 1.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_hf(cls, path: str, device: str | torch.device = "cpu") -> "Gemma3Model":
        """Build a model from a local Hugging Face Gemma 3 text checkpoint directory (safetensors only)."""
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
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) for every position; loss is the mean cross-entropy over targets != IGNORE_INDEX.

        With a `cache`, `idx` continues the cached sequence (its positions start at `cache.pos`) and is cached.
        With targets and `return_logits=False`, logits is None and the loss never materialises them whole.
        """
        hidden = self.final_norm(self._hidden(idx, cache))
        if targets is not None and not return_logits:
            loss = linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
            return None, loss
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Output of the last block, before the final norm."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {cfg.context_length}")
        positions = torch.arange(T, device=idx.device) if cache is None else cache.begin(T)
        return self._blocks(idx, positions, cache)

    def _blocks(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Embed `idx` at `positions` and run every block; with a cache, its `begin` has prepared the step."""
        cfg = self.config
        T = idx.size(1)
        x = self.tok_emb(idx)
        # transformers rounds the scale to the activation dtype (sqrt(640) becomes 25.25 in bfloat16); so do we.
        x = x * torch.tensor(math.sqrt(cfg.emb_dim), dtype=x.dtype)
        rope = {
            "sliding_attention": rope_cos_sin(positions, cfg.head_dim, cfg.rope_local_base, x.dtype),
            "full_attention": rope_cos_sin(positions, cfg.head_dim, cfg.rope_base, x.dtype),
        }
        # With a cache, the cache builds its own masks from absolute positions.
        sliding = None
        if cache is None:
            sliding = sliding_mask(T, cfg.sliding_window, idx.device, self.attention_backend)
        masks = {"sliding_attention": sliding, "full_attention": None}
        recompute = self.activation_checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, *rope[block.layer_type], masks[block.layer_type], use_reentrant=False)
            else:
                x = block(x, *rope[block.layer_type], masks[block.layer_type], cache, i)
        return x

    def decode_step(self, token: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """float32 logits (B, vocab) after `token` (B, 1) at `positions` (from `cache.begin(1)`), cached.

        Every shape is fixed and no Python number depends on the position, so `compile_decode` can compile it."""
        return self._last_logits(self._blocks(token, positions, cache))

    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the last position only: all that generation needs."""
        return self.lm_head(self.final_norm(hidden[:, -1])).float()

    def compile_decode(self) -> None:
        """Compile `decode_step` for this model (inference only): one fused program per cache size instead of a
        few hundred small kernels a token. With `freezing`, the weights are constants of the program, which lets
        inductor pre-pack them once into the CPU matmul libraries' layouts (MKL's for float32, oneDNN's for bf16)."""
        compiled = torch.compile(self.decode_step, fullgraph=True, dynamic=False)
        # Read when a cache size is first compiled. concat_linear: q/k/v and gate/up become one matmul each.
        options = {"freezing": True, "cpp.enable_concat_linear": True}

        def frozen_decode_step(token: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
            with torch._inductor.config.patch(options):
                return compiled(token, positions, cache)

        self.decode_step = frozen_decode_step

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and in its dtype (max_len defaults to context_length)."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len, weight.device, weight.dtype)

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B, 1), `max_new_tokens` times, continuing the prompts `idx` (B, T).

        All rows share the prompt length. `use_cache=False` recomputes the whole (cropped) sequence each step.
        """
        C = self.config.context_length
        cache = self.make_cache(idx.size(0), min(C, idx.size(1) + max_new_tokens)) if use_cache else None
        context = idx[:, -C:]  # what the next forward reads: the prompt, then each new token
        for _ in range(max_new_tokens):
            if cache is not None and context.size(1) == 1 and cache.pos < cache.max_len:
                logits = self.decode_step(context, cache.begin(1), cache)
            else:  # no cache; or the prompt; or past context_length, where the cache re-prefills the last C tokens
                if cache is not None:
                    cache.reset()
                logits = self._last_logits(self._hidden(idx[:, -C:], cache))
            context = sample_next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat((idx, context), dim=1)
            yield context

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """`idx` (B, T) with `max_new_tokens` sampled tokens appended: one prefill, then cached decode steps."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
        return torch.cat((idx, *new), dim=1)


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
