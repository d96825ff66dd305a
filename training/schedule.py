"""Learning-rate schedules, each a linear warmup from 0 to the peak, then down to the floor at max_iters, held
after:
- cosine: a half cosine from the end of warmup to max_iters.
- wsd (warmup-stable-decay): the peak held until the last `decay_fraction` of max_iters, then a linear or 1-sqrt
  decay (Hagele et al. 2024, arXiv 2405.18392). A run still in its stable phase can be extended by resuming with a
  larger max_iters, and `pre_decay.pt`, written when the decay begins, branches longer runs (README).

Every parameter group follows the schedule from its own peak (`group["peak_lr"]`), its floor min_lr scaled by the
same ratio as the peak to learning_rate; a group at learning_rate gets exactly learning_rate's curve.
"""

import math

from .config import TrainingConfig


def learning_rate(iteration: int, config: TrainingConfig, peak: float | None = None) -> float:
    """The learning rate for optimizer update number `iteration` (0-based) of a group whose peak is `peak`
    (default: learning_rate)."""
    peak = config.learning_rate if peak is None else peak
    floor = config.min_lr * (peak / config.learning_rate)  # exactly min_lr for a group at learning_rate
    if iteration < config.warmup_steps:
        return peak * iteration / config.warmup_steps
    if iteration >= config.max_iters:
        return floor
    if config.lr_schedule == "wsd":
        start = config.decay_start
        if iteration < start:
            return peak
        progress = (iteration - start) / (config.max_iters - start)
        remaining = 1.0 - (progress if config.decay_shape == "linear" else math.sqrt(progress))  # 1 -> 0
    else:
        progress = (iteration - config.warmup_steps) / (config.max_iters - config.warmup_steps)
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return floor + remaining * (peak - floor)


def describe_schedule(config: TrainingConfig) -> str:
    """The schedule in words, for the start of the log."""
    warmup = f"warmup {config.warmup_steps} iteration{'s' * (config.warmup_steps != 1)}"
    if config.lr_schedule == "wsd":
        return (
            f"wsd: {warmup}, the peak held to iteration {config.decay_start}, then a {config.decay_shape} decay to "
            f"min_lr at {config.max_iters}"
        )
    return f"cosine: {warmup}, then a cosine decay to min_lr at {config.max_iters}"
