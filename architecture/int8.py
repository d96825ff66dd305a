"""Weight-only INT8 quantization of the blocks' Linear layers and the output head, for inference.

Design choices:
- Symmetric, one scale per output channel (row of the weight): w ~= q * scale with q in [-127, 127]. Per-channel
  scales follow each row's range, which is what keeps the error small without calibration data.
- The blocks' projections (attention q/k/v/o and the GeGLU gate/up/down) and the output head are quantized; the
  norms and the embedding stay in float. A cached decode step reads every weight once, so its speed follows the
  bytes it reads, and the head is a large share of them (the default model's 50,257 x 640 head is 39% of its
  weights; in the small CPU benchmark config it is 69%). A tied head gets its own int8 copy: the embedding
  lookup reads one float row a token, the head reads the int8 copy. Per-row scales keep every logit's error
  within its own row's rounding (the INT8 perplexity change is measured by bench_generate.py --int8-eval).
- The forward dequantizes on the fly, as gpt-fast does: `linear(x, q.to(x.dtype)) * scale`. Applying the scale to
  the output instead of the weight costs one multiply per output, not per weight. On the CPU in bfloat16, PyTorch's
  int8-weight kernel (`aten._weight_int8pack_mm`) does the same without materialising the dequantized weight and
  beats the bfloat16 matmul; in float32 that kernel is slower than dequantizing, so it is not used there.
  Activations stay in the model's dtype; no int8 x int8 matmul, which would need activation quantization too.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is stored as int8 with a per-output-channel scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free Linear layers only")
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(x.dtype)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight, scale)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * scale

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
