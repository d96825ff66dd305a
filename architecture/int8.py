"""Weight-only INT8 quantization of the blocks' Linear layers, for inference.

Design choices:
- Symmetric, one scale per output channel (row of the weight): w ~= q * scale with q in [-127, 127]. Per-channel
  scales follow each row's range, which is what keeps the error small without calibration data.
- Only the blocks' projections are quantized (attention q/k/v/o and the GeGLU gate/up/down: all but 0.1% of the
  non-embedding weights, 61% of the default model's parameters). The embedding and the output head stay in
  float: the head sees every logit, and a tied head is the embedding.
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
    """Replace every nn.Linear inside `model.blocks` with an `Int8Linear`, in place; returns `model`."""
    for block in model.blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    return model


def block_linear_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the blocks' Linear weights as they are now, and as bfloat16 and float32 would store them."""
    stored = numel = 0
    for module in model.blocks.modules():
        if isinstance(module, Int8Linear):
            numel += module.weight.numel()
            stored += module.weight.numel() + module.scale.numel() * module.scale.element_size()
        elif isinstance(module, nn.Linear):
            numel += module.weight.numel()
            stored += module.weight.numel() * module.weight.element_size()
    return {"stored": stored, "bfloat16": 2 * numel, "float32": 4 * numel}
