"""The optimizer component: chosen by name, the same parameter groups for our model and transformers' (which the
training benchmark builds through the same function), Muon's hidden matrices chosen by module, the config's
hyperparameters kept over a checkpoint's, and an unknown name refused by the config."""

import pytest
import torch
from hf_reference import random_hf_model, tiny_config

from architecture import Gemma3Model
from architecture.config import ConfigError
from training.config import TrainingConfig
from training.optimizer import OPTIMIZERS, MuonWithAdamW, build_optimizer, load_optimizer_state


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
    assert list(OPTIMIZERS) == ["adamw", "muon"]
    optimizer = build_optimizer(Gemma3Model(tiny_config()), TrainingConfig(learning_rate=3e-4), "cpu")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 3e-4
    assert [g["peak_lr"] for g in optimizer.param_groups] == [3e-4, 3e-4]
    with pytest.raises(ConfigError, match="'optimizer' is 'sgd'; use one of adamw, muon"):
        TrainingConfig(optimizer="sgd")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_muon_takes_the_blocks_linear_weights_and_adamw_the_rest_for_ours_and_transformers(tie):
    config = tiny_config(tie_embeddings=tie)
    settings = TrainingConfig(optimizer="muon", learning_rate=3e-4, min_lr=0.0, muon_lr=0.05, muon_weight_decay=0.02)
    model = Gemma3Model(config)
    optimizer = build_optimizer(model, settings, "cpu")
    assert isinstance(optimizer, MuonWithAdamW)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    projections = [f"attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {f"blocks.{i}.{n}.weight" for i in range(config.n_layers) for n in projections}
    # The embedding (2-D), an untied head (2-D) and every norm gain stay on AdamW, with today's decay groups.
    (decay, head), (no_decay, rest) = group_shapes(optimizer.adamw)
    assert (decay, no_decay) == (0.1, 0.0) and head == ([] if tie else [(config.vocab_size, config.emb_dim)])
    assert rest.count((config.vocab_size, config.emb_dim)) == 1 and len(rest) == 1 + 6 * config.n_layers + 1
    assert [(g["peak_lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.05, 0.02),
        (3e-4, 0.1),
        (3e-4, 0.0),
    ]
    every = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(list(model.parameters()))
    # transformers' Gemma 3 (the training benchmark's other model) splits the same way.
    assert group_shapes(optimizer.muon) + group_shapes(optimizer.adamw) == group_shapes(
        build_optimizer(random_hf_model(config), settings, "cpu")
    )


def test_a_resume_keeps_this_runs_hyperparameters_and_the_checkpoints_state():
    model = Gemma3Model(tiny_config())
    trained = build_optimizer(model, TrainingConfig(optimizer="muon", weight_decay=0.1), "cpu")
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    trained.step()
    resumed = build_optimizer(model, TrainingConfig(optimizer="muon", weight_decay=0.05, muon_lr=0.01), "cpu")
    load_optimizer_state(resumed, trained.state_dict())
    assert [(g["peak_lr"], g["weight_decay"]) for g in resumed.param_groups] == [
        (0.01, 0.01),
        (1e-4, 0.05),
        (1e-4, 0.0),
    ]
    buffers = [resumed.muon.state[p]["momentum_buffer"] for p in resumed.muon.param_groups[0]["params"]]
    assert all(b.abs().sum() > 0 for b in buffers) and resumed.adamw.state_dict()["state"]
