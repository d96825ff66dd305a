"""Run logging: console lines, a JSONL metrics file in out_dir, optional wandb, and model FLOPs utilisation.

Design choices:
- Every figure logged goes to `out_dir/metrics.jsonl` (one JSON object a line, "kind" = "train" or "eval"), the
  file `scripts/plot_loss.py` reads. On resume, lines past the resumed iteration are dropped so the file tells
  one consistent history.
- MFU = achieved model FLOPs per second / the GPU's peak dense bf16 FLOPs. Model FLOPs per token (PaLM appendix B,
  as in nanoGPT's estimate_mfu, with the attention span per layer type):
      6 * N + 12 * sum over layers of (n_heads * head_dim * span)
  N: parameters excluding the embedding lookup (the output head is a matmul and counts); span: block_size for
  full layers, min(block_size, sliding_window) for sliding ones. The factor 6 is 2 (multiply-add) x 3 (forward +
  backward); 12 is the same for the two attention matmuls QK^T and AV.
"""

import json
import time
from pathlib import Path
from typing import Any

import torch

# Peak dense bf16 tensor-core FLOP/s by GPU name (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A6000": 155e12, "L40S": 362e12, "4090": 165e12}


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    if config.tie_embeddings:
        n_params += model.lm_head.weight.numel()  # the tied head is still a full matmul
    n_params -= model.tok_emb.weight.numel()  # the lookup is free
    attention = 0
    for kind in config.layer_types:
        span = block_size if kind == "full_attention" else min(block_size, config.sliding_window)
        attention += config.n_heads * config.head_dim * span
    return 6 * n_params + 12 * attention


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of the CUDA device, or None where unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class MetricsLog:
    """Appends metric rows to out_dir/metrics.jsonl and, when enabled, to wandb."""

    def __init__(self, out_dir: Path, resume_from_iter: int | None, wandb_run: Any = None):
        self.path = out_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        if resume_from_iter is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [row for row in rows if row["iter"] <= resume_from_iter]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, kind: str, iteration: int, **values: float) -> None:
        row = {"kind": kind, "iter": iteration, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in values.items()}, step=iteration)
