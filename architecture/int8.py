"""Weight-only INT8 quantization of the blocks' Linear layers and the output head, for inference.

Design choices:
- Symmetric, one scale per output channel (row of the weight): w ~= q * scale with q in [-127, 127]. Per-channel
  scales follow each row's range, which is what keeps the error small without calibration data.
- The blocks' projections (attention q/k/v/o and the GeGLU gate/up/down) and the output head are quantized; the
  norms and the embedding stay in float. A cached decode step reads every weight once, so its speed follows the
  bytes it reads, and the head is a large share of them (the default model's 50,257 x 640 head is 39% of its
  weights; in the small CPU benchmark config it is 69%). A tied head gets its own int8 copy: the embedding
  lookup reads one float row a token, the head reads the int8 copy.
- The int8 columns are stored interleaved by quarters (column j*K/4 + k at position 4k + j), so that each int32
  word of a row holds one weight from each quarter of the input. Every kernel reads the same bytes; the matmul
  kernels take the input permuted the same way (one copy of K numbers a call).
- One kernel per case, each the fastest measured on its hardware (benchmarks/results/generate_cpu.md):
  - CPU, inside `torch.compile` with float32 activations and a few rows (the decode step): a dot product over the
    int32 words, each unpacked into its four int8 weights by shifts. Inductor turns it into one vectorised loop
    that reads each byte once and converts it in registers; a plain int8 load would not do (on AVX2 inductor
    copies partial int8 vectors through memory, about 1 GB/s), so the words are bit-cast to float32 for the load.
    Exact: the weights are dequantized, the sum is float32.
  - CPU otherwise: PyTorch's int8-weight matmul (`aten._weight_int8pack_mm`), which never materialises a
    dequantized weight. It takes bfloat16 activations, so float32 ones are rounded to bfloat16 for it (the
    perplexity change this costs is measured by bench_generate.py --int8-eval). Dequantizing instead
    (`linear(x, q.float())`) makes a decode step's matmul 10-30x slower on AVX2, where aten converts int8 to float
    element by element.
  - CUDA and MPS: `linear(x, q.to(x.dtype)) * scale`, as gpt-fast does; compiled, it fuses into the matmul.
  The scale multiplies the output, not the weight: one multiply per output instead of one per weight.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# Up to this many rows (batch x tokens: a decode step), compiled float32 on the CPU takes the word kernel; more rows
# (a prompt) take the matmul kernel, which reuses each weight across rows.
WORD_KERNEL_MAX_ROWS = 8


def interleave_quarters(t: torch.Tensor) -> torch.Tensor:
    """`t` (..., K) with column j*K/4 + k moved to position 4k + j: the layout of `Int8Linear.weight`."""
    return t.unflatten(-1, (4, t.size(-1) // 4)).transpose(-1, -2).flatten(-2)


def deinterleave_quarters(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `interleave_quarters`."""
    return t.unflatten(-1, (t.size(-1) // 4, 4)).transpose(-1, -2).flatten(-2)


def int8_dot_by_words(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) times an `Int8Linear.weight` (N, K, interleaved by quarters) times `scale` (N), as a sum over the
    weight's int32 words: written for torch.compile, which turns it into one loop over the words."""
    words = weight.view(torch.float32).view(torch.int32)  # loaded as float32, used as int32 (see the module doc)
    quarters = x.unflatten(-1, (4, words.size(1)))
    out = 0
    for j in range(4):
        weights = ((words << (24 - 8 * j)) >> 24).to(x.dtype)  # byte j, sign-extended
        out = out + (quarters[..., None, j, :] * weights).sum(-1)
    return out * scale.to(x.dtype)


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is stored as int8 (columns interleaved by quarters) with a per-output-channel
    scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free Linear layers only")
        if linear.in_features % 4:
            raise ValueError(f"Int8Linear needs in_features divisible by 4, got {linear.in_features}")
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", interleave_quarters(q).contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        on_cpu = x.device.type == "cpu"
        if on_cpu and x.dtype == torch.float32 and rows <= WORD_KERNEL_MAX_ROWS and torch.compiler.is_compiling():
            return int8_dot_by_words(x, self.weight, self.scale)
        x = interleave_quarters(x)
        if on_cpu:
            bf16 = x.reshape(rows, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(bf16, self.weight, self.scale.to(torch.bfloat16))
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out_features, in_features) this layer computes with, in the original column order."""
        return deinterleave_quarters(self.weight).float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `model.blocks`, and the output head, with an `Int8Linear`, in place; returns
    `model`."""
    for block in model.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    model.lm_head = Int8Linear(model.lm_head)
    return model


def dequantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `Int8Linear` of `model` with an nn.Linear holding the weight it computes with, in place: the
    float model an int8 kernel that dequantizes exactly (the compiled CPU word kernel) computes. Returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device=child.weight.device)
                linear.weight.data = child.dequantized().to(child.scale.dtype)
                setattr(parent, name, linear)
    return model


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the Linear weights (blocks and head) as they are now, and as bfloat16 and float32 would store them."""
    stored = numel = 0
    for module in [*model.blocks.modules(), model.lm_head]:
        if isinstance(module, Int8Linear):
            numel += module.weight.numel()
            stored += module.weight.numel() + module.scale.numel() * module.scale.element_size()
        elif isinstance(module, nn.Linear):
            numel += module.weight.numel()
            stored += module.weight.numel() * module.weight.element_size()
    return {"stored": stored, "bfloat16": 2 * numel, "float32": 4 * numel}
