"""The optimizer component: chosen by name, the same parameter groups for our model and transformers' (which the
training benchmark builds through the same function), and an unknown name refused by the config."""

import pytest
import torch
from hf_reference import random_hf_model, tiny_config

from architecture import Gemma3Model
from architecture.config import ConfigError
from training.config import TrainingConfig
from training.optimizer import OPTIMIZERS, build_optimizer


def group_shapes(optimizer: torch.optim.Optimizer) -> list[tuple[float, list[tuple[int, ...]]]]:
    return [(g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_decay_groups_are_the_matrices_less_the_embedding_for_ours_and_transformers(tie):
    config = tiny_config(tie_embeddings=tie)
    settings = TrainingConfig(weight_decay=0.05)
    groups = group_shapes(build_optimizer(Gemma3Model(config), settings, "cpu"))
    assert groups == group_shapes(build_optimizer(random_hf_model(config), settings, "cpu"))
    (decay, matrices), (no_decay, rest) = groups
    assert (decay, no_decay) == (0.05, 0.0)
    assert all(len(shape) == 2 for shape in matrices) and len(matrices) == 7 * config.n_layers + (not tie)
    # Not decayed: the embedding (and a head tied to it), four norms per block, q/k norms, the final norm.
    assert rest.count((config.vocab_size, config.emb_dim)) == 1 and len(rest) == 1 + 6 * config.n_layers + 1


def test_optimizer_is_a_named_choice():
    assert list(OPTIMIZERS) == ["adamw"]
    optimizer = build_optimizer(Gemma3Model(tiny_config()), TrainingConfig(learning_rate=3e-4), "cpu")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 3e-4
    with pytest.raises(ConfigError, match="'optimizer' is 'sgd'; use one of adamw"):
        TrainingConfig(optimizer="sgd")
