"""The optimizer component: chosen by name, the same parameter groups for our model and transformers' (which the
training benchmark builds through the same function), Muon's hidden matrices chosen by module, the config's
hyperparameters kept over a checkpoint's, and an unknown name refused by the config. Our Muon is torch's bit for bit
when it orthogonalises in bf16, and near the exact orthogonal factor in float32, which a CPU without native bf16
gets."""

import copy

import pytest
import torch
from hf_reference import random_hf_model, tiny_config

from architecture import Gemma3Model
from architecture.config import ConfigError
from training import optimizer as optimizer_module
from training.config import TrainingConfig
from training.device import native_bf16
from training.optimizer import (
    OPTIMIZERS,
    Muon,
    MuonWithAdamW,
    build_optimizer,
    describe_optimizer,
    load_optimizer_state,
    orthogonalise,
)


def group_shapes(optimizer: torch.optim.Optimizer) -> list[tuple[float, list[tuple[int, ...]]]]:
    return [(g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_decay_groups_are_the_matrices_less_the_embedding_for_ours_and_transformers(tie):
    config = tiny_config(tie_embeddings=tie)
    settings = TrainingConfig(optimizer="adamw", weight_decay=0.05)
    groups = group_shapes(build_optimizer(Gemma3Model(config), settings, "cpu"))
    assert groups == group_shapes(build_optimizer(random_hf_model(config), settings, "cpu"))
    (decay, matrices), (no_decay, rest) = groups
    assert (decay, no_decay) == (0.05, 0.0)
    assert all(len(shape) == 2 for shape in matrices) and len(matrices) == 7 * config.n_layers + (not tie)
    # Not decayed: the embedding (and a head tied to it), four norms per block, q/k norms, the final norm.
    assert rest.count((config.vocab_size, config.emb_dim)) == 1 and len(rest) == 1 + 6 * config.n_layers + 1


def test_optimizer_is_a_named_choice():
    assert list(OPTIMIZERS) == ["adamw", "muon"]
    optimizer = build_optimizer(
        Gemma3Model(tiny_config()), TrainingConfig(optimizer="adamw", learning_rate=3e-4), "cpu"
    )
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


def test_muon_in_bf16_is_torchs_bit_for_bit_and_resumes_exactly():
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]  # tall (transposed, lr scaled by sqrt(3)), wide, square
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=0.02, weight_decay=0.01, momentum=0.95)
    muon = Muon([{"params": ours}], **settings, ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon(theirs, **settings, nesterov=True, adjust_lr_fn="original")
    for step in range(5):
        if step == 3:  # a resume: a new optimizer given the state dict continues the same path
            muon = Muon([{"params": ours}], **settings, ns_dtype=torch.bfloat16)
            muon.load_state_dict(copy.deepcopy(reference.state_dict()))  # torch's state is ours (a copy, as a file)
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        muon.step()
        reference.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)], ids=["wide", "tall"])
def test_float32_newton_schulz_approximates_the_orthogonal_factor(shape):
    update = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    ortho = orthogonalise(update, torch.float32)
    assert ortho.dtype == torch.float32 and ortho.shape == shape
    # Five quintic steps leave singular values in a band around 1, not at 1 (torch's docstring), and the same
    # singular vectors as U V^T; bf16 lands in the same place, less precisely.
    singular = torch.linalg.svdvals(ortho)
    assert 0.6 < singular.min() and singular.max() < 1.2
    assert torch.nn.functional.cosine_similarity(ortho.flatten(), (u @ vh).flatten(), dim=0) > 0.97
    torch.testing.assert_close(orthogonalise(update, torch.bfloat16).float(), ortho, atol=0.02, rtol=0)


@pytest.mark.parametrize("native", [False, True], ids=["emulated bf16", "native bf16"])
def test_muon_orthogonalises_in_bf16_only_where_the_device_computes_it(native, monkeypatch):
    model = Gemma3Model(tiny_config())
    expected = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
    assert build_optimizer(model, TrainingConfig(optimizer="muon"), "cpu").muon.ns_dtype == expected  # this CPU's
    monkeypatch.setattr(optimizer_module, "native_bf16", lambda device: native)
    chosen = build_optimizer(model, TrainingConfig(optimizer="muon"), "cpu").muon.ns_dtype
    assert chosen == (torch.bfloat16 if native else torch.float32)


def test_the_log_says_what_trains_what():
    model = Gemma3Model(tiny_config())
    n_hidden = sum(p.numel() for p in optimizer_module.hidden_matrices(model))
    rest = sum(p.numel() for p in model.parameters()) - n_hidden
    muon = build_optimizer(model, TrainingConfig(optimizer="muon", learning_rate=3e-4, min_lr=0.0, muon_lr=0.05), "cpu")
    assert describe_optimizer(muon) == (
        f"Muon (peak lr 0.05, Newton-Schulz in {'bf16' if muon.muon.ns_dtype == torch.bfloat16 else 'float32'}) on "
        f"{7 * tiny_config().n_layers} block matrices ({n_hidden / 1e6:.1f}M parameters), AdamW (peak lr 0.0003) on "
        f"the rest ({rest / 1e6:.1f}M)"
    )
    adamw = build_optimizer(model, TrainingConfig(optimizer="adamw", learning_rate=3e-4), "cpu")
    assert describe_optimizer(adamw) == "AdamW (peak lr 0.0003) on every parameter"
