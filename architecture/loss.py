"""The training loss without the logits: chunked linear cross-entropy, gradients computed in the forward.

`model(idx, targets, return_logits=False)` computes its loss here (architecture/gemma3.py).

Design choices:
- `linear_cross_entropy` walks the rows in chunks and computes each chunk's gradient in the forward, so
  the (B*T, vocab) float32 logits, their softmax and its gradient are never held whole (at a 32 x 128
  batch that would be three 823 MB tensors). Nothing is recomputed: the backward only scales the stored
  gradients. Each chunk is one matmul, one in-place float32 softmax (which yields both the loss and the
  gradient) and two matmuls for the gradients, in two (rows, vocab) buffers reused by every chunk.
- The vocabulary stays 50,257 wide in the parameters (state-dict shapes, parameter count and HF export); on
  CUDA the loss pads the head to 50,304 rows inside, on the bf16 copy autocast makes anyway, so that its GEMMs
  get aligned shapes, and gives the pad logits -inf.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["CE_CHUNK_ROWS", "IGNORE_INDEX", "linear_cross_entropy"]

IGNORE_INDEX = -100  # targets with this id (padding) do not count in the loss, as in F.cross_entropy
# Rows of logits alive at once in linear_cross_entropy: 1024 on a GPU (206 MB of float32 at 50,257 entries), 512 on
# a CPU: the fastest of 64 to 2,048 rows in float32 and in bf16 autocast on a 2-core AVX512-BF16 EPYC, where fewer,
# larger chunks mean fewer passes over the weight gradient (benchmarks/results/train_cpu.md).
CE_CHUNK_ROWS = {"cuda": 1024, "cpu": 512}


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk, gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, pad_to: int, needs_grad: bool, mean: bool):
        vocab_size, weight_dtype = weight.size(0), weight.dtype
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:  # cast (and pad) the head once, not in every matmul
            weight = weight.to(torch.get_autocast_dtype(device_type))
        # Zero rows up to a multiple of `pad_to` give GEMMs aligned shapes (50,257 is odd, which GPU kernels
        # handle slowly); their logits are set to -inf below, so they take no probability and get no gradient.
        if vocab_size % pad_to:
            weight = F.pad(weight, (0, 0, 0, -vocab_size % pad_to))
        valid = targets != IGNORE_INDEX
        # d(loss)/d(row's loss): 1/n_valid for the mean (1 for the sum) on rows that count, 0 on ignored rows
        row_scale = (valid / valid.sum() if mean else valid.float())[:, None]
        safe_targets = targets.masked_fill(~valid, 0)[:, None]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        # Two (rows, vocab) buffers serve every chunk: the matmul dtype's and float32's (one and the same in float32).
        # A fresh 100 MB tensor per chunk and pass costs more than the pass itself on a CPU (page faults, cold cache).
        shape = (min(chunk_rows, hidden.size(0)), weight.size(0))
        scores = torch.empty(shape, device=hidden.device, dtype=weight.dtype)
        probs_buffer = scores if weight.dtype == torch.float32 else torch.empty_like(scores, dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, scale = hidden[rows].to(weight.dtype), safe_targets[rows], row_scale[rows]
            logits = torch.mm(h, weight.t(), out=scores[: h.size(0)])  # in the autocast dtype
            probs = probs_buffer[: h.size(0)].copy_(logits)  # softmax in float32
            probs[:, vocab_size:] = -math.inf
            # One softmax pass (one exp per logit) gives both the loss and the gradient. The loss is not -log p(t),
            # which underflows float32 past about 87 nats: with m the row's largest logit, the largest probability
            # is 1 / sum(exp(logits - m)) >= 1 / vocab, so -log p(t) = m - logit(t) - log(max p), exactly.
            top_logit, target_logit = probs.amax(dim=-1, keepdim=True), probs.gather(1, t)
            torch.softmax(probs, dim=-1, out=probs)
            loss += ((top_logit - target_logit - probs.amax(dim=-1, keepdim=True).log()) * scale).sum()
            if needs_grad:
                # d(row's loss)/d(logits) = softmax - one_hot(target), in place, then in the matmul dtype; the row
                # scale goes on the (rows, dim) operands instead of this (rows, vocab) chunk, saving a pass over it.
                grad_logits = logits.copy_(probs.scatter_add_(1, t, -torch.ones_like(scale)))
                grad_hidden[rows] = (grad_logits @ weight) * scale
                scaled_h = (hidden[rows] * scale).to(weight.dtype)  # scaled before rounding: 1/n_valid is not exact
                if autocast:  # the matmul in autocast's dtype, the sum in float32
                    grad_weight += grad_logits.t() @ scaled_h
                else:  # in place: no (vocab, dim) temporary per chunk, which a CPU's memory bandwidth feels
                    grad_weight.addmm_(grad_logits.t().float(), scaled_h.float())
        ctx.save_for_backward(grad_hidden, grad_weight[:vocab_size] if needs_grad else None)
        ctx.weight_dtype = weight_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    pad_to: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction=reduction)` ("mean" or
    "sum") for hidden (N, D), weight (V, D), targets (N,), holding at most `chunk_rows` rows of logits at a time
    (default: CE_CHUNK_ROWS for the device), with the vocabulary padded to a multiple of `pad_to` inside (default: 64
    on CUDA, none elsewhere)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk_rows = chunk_rows or CE_CHUNK_ROWS.get(hidden.device.type, CE_CHUNK_ROWS["cuda"])
    pad_to = pad_to or (64 if hidden.is_cuda else 1)
    # Gradients are computed in the forward, so only when a backward can follow: not under torch.no_grad (evaluation),
    # where ctx.needs_input_grad would still say True for a parameter.
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, pad_to, needs_grad, reduction == "mean")
