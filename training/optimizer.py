"""Optimizers, by the name a training config gives in `optimizer`: `build_optimizer` is what the trainer and the
training benchmark call, and `OPTIMIZERS` is the one table of names. Adding one is a function here and its entry.

The checkpoint records the name with the rest of the training config, and a resume with another optimizer is
refused (its state would not carry over; trainer.check_resume).

AdamW decays the 2-D weight matrices only (`decay_groups`):
Decayed: every Linear weight (attention, feed-forward, and an untied output head).
Not decayed: RMSNorm weights (decay would pull the (1 + w) scale towards 1 for no reason) and the token embedding.
The embedding is a lookup table: decoupled decay shrinks every row at every step while a rare token's row gets a
gradient only when that token appears, so rare embeddings would fade towards zero; and the model scales embeddings
by sqrt(emb_dim), which makes their norm part of the signal. A tied output head is the same tensor, so it follows
the embedding.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .device import fused_adamw_available

if TYPE_CHECKING:  # config.py reads OPTIMIZERS' names to validate the setting
    from .config import TrainingConfig


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: the weight matrices, decayed by `weight_decay`, and the rest, not decayed. Embeddings
    are found by module type, so transformers' Gemma 3 (benchmarks/bench_train.py) gets the same groups."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # a tied head is yielded once, as the embedding
        (decay if p.dim() == 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, config: "TrainingConfig", device_type: str) -> torch.optim.Optimizer:
    # The fused kernel does the whole update in a few launches (CUDA) or one pass per tensor (CPU) instead of a
    # dozen elementwise ops per parameter (figures: benchmarks/results/train_cpu.md).
    groups = decay_groups(model, config.weight_decay)
    fused = fused_adamw_available(device_type)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.betas), fused=fused)


OPTIMIZERS: dict[str, Callable[[torch.nn.Module, "TrainingConfig", str], torch.optim.Optimizer]] = {"adamw": adamw}


def build_optimizer(model: torch.nn.Module, config: "TrainingConfig", device_type: str) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, over `model`'s parameters, at `config.learning_rate` (the trainer
    sets each group's lr every iteration from the schedule)."""
    return OPTIMIZERS[config.optimizer](model, config, device_type)
