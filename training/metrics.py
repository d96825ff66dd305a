"""Run logging: console lines, a JSONL metrics file in out_dir, optional wandb, and model FLOPs utilisation.

Design choices:
- Every figure logged goes to `out_dir/metrics.jsonl` (one JSON object a line, "kind" = "train", "eval", ...), the
  file `scripts/plot_loss.py` reads. The file is append-only, never rewritten: a resume appends a "resume" row,
  and `read_metrics` drops the rows past that iteration that an earlier process logged, so readers see one
  consistent history. A line torn by a crash or a full disk is cut off at resume, with a note, and skipped by
  `read_metrics`; nothing else is ever removed.
- MFU = achieved model FLOPs per second / the GPU's peak dense bf16 FLOPs. Model FLOPs per token (PaLM appendix B,
  as in nanoGPT's estimate_mfu, with the attention span per layer type):
      6 * N + 12 * sum over layers of (n_heads * head_dim * span)
  N: parameters excluding the embedding lookup (the output head is a matmul and counts); span: block_size for
  full layers, min(block_size, sliding_window) for sliding ones. The factor 6 is 2 (multiply-add) x 3 (forward +
  backward); 12 is the same for the two attention matmuls QK^T and AV.
"""

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from .run_dir import os_error

# Peak dense bf16 tensor-core FLOP/s by GPU (vendor datasheets, without sparsity), matched on the words of the
# name CUDA reports, most specific first: an H100 PCIe ("NVIDIA H100 PCIe") and NVL are not the SXM part ("NVIDIA
# H100 80GB HBM3"), and "GH200" is not "H200".
PEAK_BF16_FLOPS = [
    ({"h100", "pcie"}, 756e12),
    ({"h100", "nvl"}, 835e12),
    ({"h100"}, 989e12),  # SXM
    ({"h200", "nvl"}, 835e12),
    ({"h200"}, 989e12),  # SXM
    ({"gh200"}, 989e12),
    ({"b200"}, 2250e12),
    ({"a100"}, 312e12),  # SXM and PCIe alike
    ({"a6000"}, 155e12),
    ({"l40s"}, 362e12),
    ({"4090"}, 165e12),
]


def flops_per_token(model: torch.nn.Module, block_size: int) -> float:
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    if config.tie_embeddings:
        n_params += model.lm_head.weight.numel()  # the tied head is still a full matmul
    n_params -= model.tok_emb.weight.numel()  # the lookup is free
    attention = 0
    for layer in config.layer_attention:
        span = block_size if layer.window is None else min(block_size, layer.window)
        attention += config.n_heads * config.head_dim * span
    return 6 * n_params + 12 * attention


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of the CUDA device, or None where unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def peak_flops_by_name(name: str) -> float | None:
    """The first `PEAK_BF16_FLOPS` entry whose words are all words of `name` (split at spaces and hyphens)."""
    words = set(re.split(r"[\s-]+", name.lower()))
    return next((peak for required, peak in PEAK_BF16_FLOPS if required <= words), None)


def cut_torn_line(path: Path) -> bool:
    """Remove an unfinished last line (no newline: the write was cut short); whether there was one."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
    return True


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl as one history: a "resume" row drops the earlier rows past its iteration (the
    process that wrote them stopped before its next checkpoint); unreadable (torn) lines are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("iter"), int):
            continue
        if row.get("kind") == "resume":
            rows = [r for r in rows if r["iter"] <= row["iter"]]
        rows.append(row)
    return rows


class MetricsLog:
    """Appends metric rows to out_dir/metrics.jsonl and, when enabled, to wandb."""

    def __init__(self, out_dir: Path, resume_from_iter: int | None, wandb_run: Any = None):
        self.path = out_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        try:
            self.cut_torn_line = resume_from_iter is not None and cut_torn_line(self.path)
        except OSError as e:
            raise os_error(self.path, "check the last line of", e, "the checkpoints on disk are kept") from None
        if resume_from_iter is not None:
            self.log("resume", resume_from_iter)

    def log(self, kind: str, iteration: int, **values: float) -> None:
        row = {"kind": kind, "iter": iteration, "time": round(time.time(), 3), **values}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a torn line it leaves is cut off at resume
            raise os_error(self.path, f"append the {kind} row to", e, "the checkpoints on disk are kept") from None
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in values.items()}, step=iteration)
