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

`Muon` is torch.optim.Muon as we use it, with one choice added: the dtype of the Newton-Schulz iteration. torch's
always runs it in bf16, which a CPU without native bf16 emulates at under 1 GFLOP/s (float32: over 100), so the
demo's step took about twice AdamW's; `muon` picks bf16 where the device computes it natively (then it is torch's
update bit for bit) and float32 elsewhere (figures: benchmarks/results/muon_cpu.md).
"""

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .device import fused_adamw_available, native_bf16

if TYPE_CHECKING:  # config.py reads OPTIMIZERS' names to validate the setting
    from .config import TrainingConfig

MUON_MOMENTUM = 0.95
# torch.optim.Muon's Newton-Schulz defaults, Keller Jordan's: quintic coefficients tuned for the steepest slope at
# zero, so 5 steps bring all but the smallest singular values into roughly [0.7, 1.2], not to 1 exactly, which
# trains as well as the exact orthogonal factor.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


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


def orthogonalise(update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz's approximation of the orthogonal factor U V^T of `update` = U S V^T, computed in `dtype`:
    torch's _zeropower_via_newtonschulz, op for op, with the dtype as a choice."""
    a, b, c = NS_COEFFICIENTS
    tall = update.size(0) > update.size(1)
    x = update.to(dtype)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller square
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)  # the Frobenius norm bounds the spectral one: every singular value <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon with nesterov=True and adjust_lr_fn="original", its Newton-Schulz defaults, and its state
    (one `momentum_buffer` per matrix, so a checkpoint of either loads into the other), orthogonalising in
    `ns_dtype`. The dtype is the machine's, not the recipe's: it is not saved, and a resume elsewhere picks anew."""

    def __init__(self, params: list[dict], lr: float, weight_decay: float, momentum: float, ns_dtype: torch.dtype):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = orthogonalise(p.grad.lerp(buf, momentum), self.ns_dtype)  # Nesterov: a look ahead
                p.mul_(1 - lr * weight_decay)  # decoupled decay with the unscaled lr, as torch
                # Keller Jordan's shape scaling: a tall matrix's orthogonal update has a smaller RMS per entry.
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


class MuonWithAdamW:
    """Muon over the hidden matrices and AdamW over the rest, stepped as one optimizer: what the trainer uses of
    one (step, zero_grad, param_groups, state_dict, load_state_dict)."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
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
    ns_dtype = torch.bfloat16 if native_bf16(torch.device(device_type)) else torch.float32  # emulated bf16 is slow
    muon = Muon([group], config.muon_lr, config.muon_weight_decay, MUON_MOMENTUM, ns_dtype)
    return MuonWithAdamW(muon, adamw(model, config, device_type, skip=hidden))


Optimizer = torch.optim.Optimizer | MuonWithAdamW

OPTIMIZERS: dict[str, Callable[[torch.nn.Module, "TrainingConfig", str], Optimizer]] = {"adamw": adamw, "muon": muon}


def build_optimizer(model: torch.nn.Module, config: "TrainingConfig", device_type: str) -> Optimizer:
    """The optimizer `config.optimizer` names, over `model`'s parameters, each group at its peak lr (the trainer
    sets each group's lr every iteration from the schedule)."""
    return OPTIMIZERS[config.optimizer](model, config, device_type)


def describe_optimizer(optimizer: Optimizer) -> str:
    """What trains what, for the start of the log: 'Muon (peak lr 0.02, Newton-Schulz in float32) on 42 block
    matrices (1.4M parameters), AdamW (peak lr 0.002) on the rest (6.4M)'."""

    def count(groups: list[dict]) -> str:
        return f"{sum(p.numel() for g in groups for p in g['params']) / 1e6:.1f}M"

    if not isinstance(optimizer, MuonWithAdamW):
        return f"AdamW (peak lr {optimizer.param_groups[0]['peak_lr']:g}) on every parameter"
    muon, adamw = optimizer.muon, optimizer.adamw
    matrices = sum(len(g["params"]) for g in muon.param_groups)
    precision = str(muon.ns_dtype).removeprefix("torch.").replace("bfloat16", "bf16")
    return (
        f"Muon (peak lr {muon.param_groups[0]['peak_lr']:g}, Newton-Schulz in {precision}) on {matrices} block "
        f"matrices ({count(muon.param_groups)} parameters), AdamW (peak lr {adamw.param_groups[0]['peak_lr']:g}) "
        f"on the rest ({count(adamw.param_groups)})"
    )


def load_optimizer_state(optimizer: Optimizer, state: dict) -> None:
    """Restore a checkpoint's optimizer state (moments, momentum, step counts) but keep the hyperparameters this
    run's config gave each group: torch's load_state_dict would bring back the checkpoint's, so a learning rate,
    decay or betas changed on purpose at a resume (--allow_recipe_change) would be silently undone."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, settings, strict=True):
        group.update(values)
