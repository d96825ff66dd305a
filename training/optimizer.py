"""AdamW with weight decay on the 2-D weight matrices only.

Decayed: every Linear weight (attention, feed-forward, and an untied output head).
Not decayed: RMSNorm weights (decay would pull the (1 + w) scale towards 1 for no reason) and the token embedding.
The embedding is a lookup table: decoupled decay shrinks every row at every step while a rare token's row gets a
gradient only when that token appears, so rare embeddings would fade towards zero; and the model scales embeddings
by sqrt(emb_dim), which makes their norm part of the signal. A tied output head is the same tensor, so it follows
the embedding.
"""

import torch

from .config import TrainingConfig
from .device import fused_adamw_available


def configure_optimizer(model: torch.nn.Module, config: TrainingConfig, device_type: str) -> torch.optim.AdamW:
    embedding = model.tok_emb.weight
    decay, no_decay = [], []
    for p in model.parameters():  # a tied head is yielded once, as the embedding
        (decay if p.dim() == 2 and p is not embedding else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in a few launches (CUDA) or one pass per tensor (CPU) instead of a
    # dozen elementwise ops per parameter (figures: benchmarks/results/train_cpu.md).
    fused = fused_adamw_available(device_type)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.betas), fused=fused)
