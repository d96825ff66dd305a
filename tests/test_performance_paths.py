"""The fast paths agree with the plain ones on the CPU: blocked sliding-window attention, FlexAttention masks, the
chunked linear cross-entropy, activation checkpointing, and a training forward that torch.compile captures in one
graph."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_reference import tiny_config
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torch.utils._python_dispatch import TorchDispatchMode

from architecture import IGNORE_INDEX, Gemma3Model
from architecture.attention import (
    WindowBlocks,
    attend,
    resolve_backend,
    sliding_block_mask,
    sliding_mask,
    sliding_window_mask,
    sliding_window_mask_mod,
)
from architecture.loss import linear_cross_entropy


def batch(config, seq_len: int, batch_size: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("capability, expected", [((9, 0), "flex"), ((8, 0), "flex"), ((8, 6), "sdpa")])
def test_auto_backend_on_gpus(monkeypatch, capability, expected):
    """FlexAttention only where its head_dim-256 backward fits in shared memory (no GPU here: the capability is
    what the rule reads)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_backend("auto", torch.device("cuda")) == expected
    assert resolve_backend("sdpa", torch.device("cuda")) == "sdpa"


def test_cpu_defaults_to_the_blocked_sdpa_path():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert sliding_mask(64, 64, cpu) is None  # within the window: causal kernels, no mask
    blocks = sliding_mask(65, 64, cpu)
    assert isinstance(blocks, WindowBlocks) and blocks.mask.shape == (64, 128)  # not T x T
    assert isinstance(sliding_mask(65, 64, cpu, "flex"), BlockMask)
    with pytest.raises(ValueError, match="attention backend"):
        resolve_backend("dense", cpu)


@pytest.mark.parametrize(
    "batch_size, heads, kv_heads, seq_len, window",
    [(2, 4, 1, 83, 16), (1, 4, 2, 64, 16), (2, 2, 2, 17, 16), (1, 4, 1, 200, 7), (1, 2, 1, 2 * 64 + 1, 64)],
    ids=["mqa-ragged", "gqa-whole-blocks", "mha-two-blocks", "small-window", "one-past-two-blocks"],
)
def test_window_blocks_match_the_dense_mask(batch_size, heads, kv_heads, seq_len, window):
    """Blocked sliding-window attention equals SDPA under the full T x T mask, forward and gradients."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch_size, heads, seq_len, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(batch_size, kv_heads, seq_len, 8, generator=generator, requires_grad=True) for _ in "kv")
    cpu = torch.device("cpu")
    out = attend(q, k, v, sliding_mask(seq_len, window, cpu), scale=0.3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sliding_window_mask(seq_len, window, cpu), scale=0.3, enable_gqa=heads != kv_heads
    )
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("seq_len, window", [(83, 16), (1000, 128), (2048, 512)])
def test_block_mask_is_the_sliding_window_rule_and_skips_blocks(seq_len, window):
    cpu = torch.device("cpu")
    dense = create_mask(sliding_window_mask_mod(window), None, None, seq_len, seq_len, device=cpu)[0, 0]
    assert torch.equal(dense, sliding_window_mask(seq_len, window, cpu))
    block_mask = sliding_block_mask(seq_len, window, cpu)
    # Each 128-row query block touches at most the blocks its window spans: work grows as T x window, not T^2.
    visited = block_mask.kv_num_blocks + (
        block_mask.full_kv_num_blocks if block_mask.full_kv_num_blocks is not None else 0
    )
    assert visited.max().item() <= window // 128 + 2


@pytest.mark.parametrize("overrides", [{}, {"n_kv_groups": 1}], ids=["gqa", "mqa"])
def test_flex_forward_matches_sdpa_past_the_window(overrides):
    """FlexAttention runs forward-only on the CPU (its backward is CUDA-only in torch 2.13): compare logits."""
    config = tiny_config(**overrides)
    model = Gemma3Model(config).eval()
    idx = batch(config, 5 * config.sliding_window + 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": fine for a check
        model.attention_backend = "sdpa"
        expected = model(idx)[0]
        model.attention_backend = "flex"
        logits = model(idx)[0]
    assert (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pad_to", [1, 64], ids=["vocab-as-is", "vocab-padded"])
def test_linear_cross_entropy_matches_cross_entropy_in_chunks(pad_to):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(101, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=generator)
    targets[[3, 20, 21]] = IGNORE_INDEX
    expected = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(expected * 3, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8, pad_to=pad_to)  # 5 chunks, the last short
    grads = torch.autograd.grad(loss * 3, (hidden, weight))  # a scaled loss scales the stored gradients
    assert abs(loss.item() - expected.item()) <= 1e-5
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got - want).abs().max().item() <= 1e-6


def test_linear_cross_entropy_is_exact_where_the_target_probability_underflows_float32():
    # Logits 300 nats apart: p(target) = exp(-300) is 0 in float32, so -log p would be inf; the loss must not be.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[300.0, 0.0], [0.0, 0.0], [0.0, 300.0]], requires_grad=True)
    targets = torch.tensor([1, 0])  # row 0: 300 nats, row 1: 300 + log 2 nats
    expected = F.cross_entropy((hidden @ weight.t()).double(), targets)
    loss = linear_cross_entropy(hidden, weight, targets)
    assert torch.isfinite(loss) and abs(loss.item() - expected.item()) <= 1e-4 * expected.item()
    loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("precision", ["autocast-bf16", "bf16-weights"])
@pytest.mark.parametrize("pad_to", [1, 64], ids=["vocab-as-is", "vocab-padded"])
def test_linear_cross_entropy_in_lower_precision(precision, pad_to):
    """Both gradient-accumulation paths: autocast (bf16 matmuls, float32 sum) and plain bf16 tensors (in place)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator)
    weight = torch.randn(101, 16, generator=generator)
    targets = torch.randint(0, 101, (37,), generator=generator)
    if precision == "bf16-weights":
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    hidden.requires_grad_(), weight.requires_grad_()
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "autocast-bf16")
    with autocast:
        expected = F.cross_entropy((hidden @ weight.t()).float(), targets)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    with autocast:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8, pad_to=pad_to)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 1e-4
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype
        assert (
            got.float() - want.float()
        ).abs().max().item() <= 1e-2 * want.float().abs().max().item()  # a few bf16 steps


@pytest.mark.parametrize("tie", [False, True], ids=["separate-head", "tied-head"])
def test_loss_without_logits_matches_the_public_path(tie):
    config = tiny_config(tie_embeddings=tie)
    model = Gemma3Model(config)
    idx, targets = batch(config, 40), batch(config, 40, seed=2)
    targets[0, :5] = IGNORE_INDEX
    logits, expected = model(idx, targets)
    assert logits.shape == (2, 40, config.vocab_size)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    no_logits, loss = model(idx, targets, return_logits=False)
    loss.backward()
    assert no_logits is None and abs(loss.item() - expected.item()) <= 1e-5
    for name, p in model.named_parameters():
        assert (p.grad - expected_grads[name]).abs().max().item() <= 1e-5, name
    with torch.no_grad():  # evaluation: no gradient work, same loss
        assert abs(model(idx, targets, return_logits=False)[1].item() - expected.item()) <= 1e-5


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products that reach the kernels while active, and records their output shapes."""

    def __init__(self):
        super().__init__()
        self.count, self.shapes = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
            self.shapes.append(tuple(out.shape))
        return out


def test_loss_under_no_grad_computes_no_gradients():
    """Evaluation runs the chunked loss under torch.no_grad: one product per chunk, not three, and the same loss."""
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(256, 32, generator=generator), torch.randn(500, 32, generator=generator)
    weight.requires_grad_()
    targets = torch.randint(0, 500, (256,), generator=generator)
    with torch.no_grad(), MatmulCounter() as counter:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)
    assert counter.count == 4 and not loss.requires_grad
    with MatmulCounter() as counter:
        with_grad = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)
    assert counter.count == 12 and torch.equal(loss, with_grad.detach())


def test_loss_without_logits_under_bf16_autocast():
    config = tiny_config()
    model = Gemma3Model(config)
    idx, targets = batch(config, 40), batch(config, 40, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(idx, targets)[1]
        loss = model(idx, targets, return_logits=False)[1]
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) <= 2e-2
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    model = Gemma3Model(config)
    idx = batch(config, 3 * config.sliding_window)  # past the window: the mask goes through checkpoint too
    losses, grads = [], []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        loss = model(idx, idx, return_logits=False)[1]
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for plain, recomputed in zip(*grads, strict=True):
        assert (plain - recomputed).abs().max().item() <= 1e-6
    model.eval()
    with torch.no_grad():  # generation never checkpoints (and keeps working with the flag on)
        assert model.generate(idx[:1, :4], max_new_tokens=3, temperature=0).shape == (1, 7)


@pytest.mark.parametrize(
    "backend, checkpointing",
    [("sdpa", False), ("sdpa", True), ("flex", False)],
    ids=["blocked-sdpa", "activation-checkpointing", "flex"],
)
def test_training_forward_is_one_graph(backend, checkpointing):
    """What `compile: true` compiles: the training forward past the window, with no graph break. FlexAttention
    (the CUDA path) is traced without gradients: it has no CPU backward."""
    config = tiny_config(n_kv_groups=1)
    model = Gemma3Model(config)
    model.attention_backend, model.activation_checkpointing = backend, checkpointing
    idx = batch(config, 2 * config.sliding_window + 5)
    torch._dynamo.reset()
    with torch.set_grad_enabled(backend != "flex"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's "called without torch.compile()"
        explanation = torch._dynamo.explain(model)(idx, idx, return_logits=False)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
