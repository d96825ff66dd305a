"""Optimizers, by the name a training config gives in `optimizer`: `build_optimizer` is what the trainer and the
training benchmark call, and `OPTIMIZERS` is the one table of names. Adding one is a function here and its entry.

The checkpoint records the name with the rest of the training config, and a resume with another optimizer is
refused (its state would not carry over; trainer.check_resume).

Every parameter group records its peak learning rate in `group["peak_lr"]`; the trainer sets each group's lr from
its own peak every iteration (schedule.py).

AdamW decays the 2-D weight matrices only (`decay_groups`):
Decayed: every Linear weight (attention, feed-forward, and an untied output head).
Not decayed: RMSNorm weights (decay would pull the (1 + w) scale towards 1 for no reason) and the token embedding.
The embedding is a lookup table: decoupled decay shrinks every row at every step while a rare token's row gets a
gradient only when that token appears, so rare embeddings would fade towards zero; and the model scales embeddings
by sqrt(emb_dim), which makes their norm part of the signal. A tied output head is the same tensor, so it follows
the embedding.

Muon (`muon`) orthogonalises the momentum of each hidden weight matrix: the Linear weights inside the transformer
blocks, found by module (an nn.Linear that is not the output head), never by shape alone: the embedding is 2-D too.
Everything else (the embedding, an untied head, every norm gain) stays on AdamW with the groups above. Its defaults
are Keller Jordan's (github.com/KellerJordan/Muon, the optimizer of the modded-nanogpt speedruns): peak lr 0.02
with his shape scaling sqrt(max(1, fan_out / fan_in)) (torch's adjust_lr_fn="original"), Nesterov momentum 0.95,
decoupled weight decay 0.01, which torch applies with the unscaled lr (lr x decay per step).
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .device import fused_adamw_available

if TYPE_CHECKING:  # config.py reads OPTIMIZERS' names to validate the setting
    from .config import TrainingConfig

MUON_MOMENTUM = 0.95


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of every nn.Linear but the output head, `lm_head` in our model and in transformers' Gemma 3:
    the attention projections and the feed-forward of each block."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]


def decay_groups(model: torch.nn.Module, weight_decay: float, peak_lr: float, skip: tuple = ()) -> list[dict]:
    """Two parameter groups over the parameters not in `skip`: the weight matrices, decayed by `weight_decay`, and
    the rest, not decayed. Embeddings are found by module type, so transformers' Gemma 3
    (benchmarks/bench_train.py) gets the same groups."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skipped = {id(p) for p in skip}
    decay, no_decay = [], []
    for p in model.parameters():  # a tied head is yielded once, as the embedding
        if id(p) not in skipped:
            (decay if p.dim() == 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "peak_lr": peak_lr},
        {"params": no_decay, "weight_decay": 0.0, "peak_lr": peak_lr},
    ]


def adamw(
    model: torch.nn.Module, config: "TrainingConfig", device_type: str, skip: tuple = ()
) -> torch.optim.Optimizer:
    # The fused kernel does the whole update in a few launches (CUDA) or one pass per tensor (CPU) instead of a
    # dozen elementwise ops per parameter (figures: benchmarks/results/train_cpu.md).
    groups = decay_groups(model, config.weight_decay, config.learning_rate, skip)
    fused = fused_adamw_available(device_type)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.betas), fused=fused)


class MuonWithAdamW:
    """Muon over the hidden matrices and AdamW over the rest, stepped as one optimizer: what the trainer uses of
    one (step, zero_grad, param_groups, state_dict, load_state_dict)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def muon(model: torch.nn.Module, config: "TrainingConfig", device_type: str) -> MuonWithAdamW:
    hidden = hidden_matrices(model)
    group = {"params": hidden, "peak_lr": config.muon_lr}
    muon = torch.optim.Muon(
        [group],
        lr=config.muon_lr,
        weight_decay=config.muon_weight_decay,
        momentum=MUON_MOMENTUM,
        nesterov=True,
        adjust_lr_fn="original",
    )
    return MuonWithAdamW(muon, adamw(model, config, device_type, skip=hidden))


Optimizer = torch.optim.Optimizer | MuonWithAdamW

OPTIMIZERS: dict[str, Callable[[torch.nn.Module, "TrainingConfig", str], Optimizer]] = {"adamw": adamw, "muon": muon}


def build_optimizer(model: torch.nn.Module, config: "TrainingConfig", device_type: str) -> Optimizer:
    """The optimizer `config.optimizer` names, over `model`'s parameters, each group at its peak lr (the trainer
    sets each group's lr every iteration from the schedule)."""
    return OPTIMIZERS[config.optimizer](model, config, device_type)


def load_optimizer_state(optimizer: Optimizer, state: dict) -> None:
    """Restore a checkpoint's optimizer state (moments, momentum, step counts) but keep the hyperparameters this
    run's config gave each group: torch's load_state_dict would bring back the checkpoint's, so a learning rate,
    decay or betas changed on purpose at a resume (--allow_recipe_change) would be silently undone."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, settings, strict=True):
        group.update(values)
