"""Learning-rate schedule: linear warmup from 0, cosine decay to min_lr at max_iters, constant after."""

import math

from .config import TrainingConfig


def learning_rate(iteration: int, config: TrainingConfig) -> float:
    """The learning rate for optimizer update number `iteration` (0-based)."""
    if iteration < config.warmup_steps:
        return config.learning_rate * iteration / config.warmup_steps
    if iteration >= config.max_iters:
        return config.min_lr
    progress = (iteration - config.warmup_steps) / (config.max_iters - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)
