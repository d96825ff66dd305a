"""What only a CUDA GPU runs: FlexAttention's backward and compiled kernels at Gemma's head_dim of 256, SDPA's fused
kernels on the blocked sliding path, the chunked loss with CUDA's defaults, a compiled training step, cached and
compiled decoding, INT8, and the pinned loader copy. Skipped without CUDA; `bash scripts/gpu_check.sh` runs them
first on a GPU machine.

Errors are relative norms, ||got - want|| / ||want||. bf16 keeps 8 bits of mantissa (steps of 0.4%), so a bf16
result against a float32 reference is allowed 3%, and two bf16 computations that round in different orders 5% on
gradients (each gradient sums thousands of rounded products)."""

import json

import pytest
import torch
import torch.nn.functional as F
from hf_reference import tiny_config
from test_loader import make_dataset
from test_performance_paths import MatmulCounter
from test_training import run_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from torch.profiler import ProfilerActivity, profile

from architecture import IGNORE_INDEX, Gemma3Model
from architecture.attention import attend, sliding_mask, sliding_window_mask
from architecture.generate import compile_decode, generate, make_cache
from architecture.int8 import Int8Linear, quantize_int8
from architecture.loss import CE_CHUNK_ROWS, linear_cross_entropy
from data.loader import BatchLoader
from training.config import load_training_config
from training.metrics import peak_flops
from training.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
BF16_VS_FLOAT32, BF16_VS_BF16 = 3e-2, 5e-2


def gemma_attention_config(**overrides):
    """Gemma 3 270M's attention (4 query heads over one K/V head of 256, a 512-token window) in a narrow model."""
    values = dict(
        vocab_size=1000,
        context_length=2048,
        emb_dim=256,
        hidden_dim=512,
        n_layers=3,
        n_heads=4,
        n_kv_groups=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    return tiny_config(**{**values, **overrides})


def gemma_model(**overrides) -> Gemma3Model:
    torch.manual_seed(0)
    return Gemma3Model(gemma_attention_config(**overrides)).to(CUDA)


def tokens(batch: int, length: int, vocab: int = 1000, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(CUDA)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def training_step(model: torch.nn.Module, parameters: list, x, y) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients of one bf16 autocast step, as the trainer runs it (no logits)."""
    for p in parameters:
        p.grad = None
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(x, y, return_logits=False)[1]
    loss.backward()
    return loss.item(), [p.grad.clone() for p in parameters]


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, BF16_VS_FLOAT32), (torch.float32, 5e-3)])
def test_flex_attention_at_head_dim_256_matches_dense_float32_past_the_window(dtype, tolerance):
    """Forward and backward of the compiled FlexAttention kernels (bf16: the training path; float32: --dtype=float32)
    against SDPA's math kernel under the dense T x T sliding-window mask."""
    generator = torch.Generator(device=CUDA).manual_seed(0)
    T, window, scale = 1100, 512, 256**-0.5
    q = torch.randn(2, 4, T, 256, device=CUDA, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 1, T, 256, device=CUDA, generator=generator, requires_grad=True) for _ in "kv")
    upstream = torch.randn(2, 4, T, 256, device=CUDA, generator=generator)
    mask = sliding_mask(T, window, CUDA, backend="flex")
    assert isinstance(mask, BlockMask)
    with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = attend(q, k, v, mask, scale)
    grads = torch.autograd.grad((out.float() * upstream).sum(), (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        dense = sliding_window_mask(T, window, CUDA)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=True)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    assert out.dtype == dtype and relative_error(out, expected) <= tolerance
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        assert relative_error(got, want) <= tolerance, name


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_compiled_training_step_with_fullgraph_matches_eager(backend):
    """`--compile=true` past the window: one graph (fullgraph=True raises at any break, the choice of kernels by
    the GPU's capability included), the same loss and gradients. "auto" is FlexAttention on data-center GPUs."""
    model = gemma_model()
    model.attention_backend = backend
    parameters = list(model.parameters())
    idx = tokens(2, 1101)
    x, y = idx[:, :-1], idx[:, 1:]
    eager_loss, eager_grads = training_step(model, parameters, x, y)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = training_step(torch.compile(model, fullgraph=True), parameters, x, y)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)
    for (name, _), got, want in zip(model.named_parameters(), compiled_grads, eager_grads, strict=True):
        assert relative_error(got, want) <= BF16_VS_BF16, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("seq_len", [256, 1100], ids=["within-window", "past-window"])
def test_sdpa_paths_run_on_fused_kernels(dtype, seq_len):
    """The causal path and the blocked sliding path (backend "sdpa", the default on GPUs without flex) never need
    SDPA's math kernel: with it disabled, SDPA raises "No available kernel" where it would have been chosen."""
    model = gemma_model()
    model.attention_backend = "sdpa"
    idx = tokens(2, seq_len + 1)
    with sdpa_kernel(FUSED_SDPA), torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)[1]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_linear_cross_entropy_with_cuda_defaults_under_bf16_autocast():
    """The 50,257-row head padded to 50,304, chunks of CE_CHUNK_ROWS["cuda"] rows, against plain cross-entropy."""
    generator = torch.Generator(device=CUDA).manual_seed(0)
    rows = 2 * CE_CHUNK_ROWS["cuda"] + 300  # two whole chunks and a short one
    hidden = torch.randn(rows, 640, device=CUDA, generator=generator, requires_grad=True)
    weight = (torch.randn(50257, 640, device=CUDA, generator=generator) * 0.05).requires_grad_()
    targets = torch.randint(0, 50257, (rows,), device=CUDA, generator=generator)
    targets[::7] = IGNORE_INDEX
    with torch.autocast("cuda", torch.bfloat16):
        expected = F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    with torch.autocast("cuda", torch.bfloat16), MatmulCounter() as products:
        loss = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert (CE_CHUNK_ROWS["cuda"], 50304) in products.shapes and (300, 50304) in products.shapes
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-3)
    for got, want in zip(grads, expected_grads, strict=True):
        assert got.dtype == want.dtype and relative_error(got, want) <= BF16_VS_BF16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_prefill_and_decode_logits_match_the_full_forward(dtype):
    model = gemma_model(sliding_window=64).to(dtype).eval()  # a short window: the rings wrap within the test
    idx = tokens(2, 200)
    cache = make_cache(model, batch_size=2, max_len=220)
    with torch.no_grad():
        expected = model(idx)[0]
        pieces = [model(idx[:, :90], cache=cache)[0]]  # a prefill past the window
        pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(90, 170)]  # decoding, the rings wrap
        pieces.append(model(idx[:, 170:], cache=cache)[0])  # a second chunk on wrapped rings
    assert relative_error(torch.cat(pieces, dim=1), expected) <= (1e-5 if dtype == torch.float32 else BF16_VS_BF16)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_compiled_decode_equals_eager_and_recomputation(int8):
    model = gemma_model(sliding_window=64).eval()
    if int8:
        quantize_int8(model)
        assert all(layer.weight.is_cuda for layer in model.modules() if isinstance(layer, Int8Linear))
    prompt = tokens(2, 20)
    expected = model.generate(prompt, 100, temperature=0, use_cache=False)  # past the window: the rings wrap
    assert torch.equal(model.generate(prompt, 100, temperature=0), expected)
    decode = compile_decode(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(generate(model, prompt, 100, temperature=0, decode=decode), expected)


def test_int8_logits_stay_close_to_the_float_model():
    model = gemma_model().eval()
    quantized = gemma_model().eval()
    quantize_int8(quantized)
    idx = tokens(2, 64)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            error = relative_error(quantized.to(dtype)(idx)[0], model.to(dtype)(idx)[0])
        assert error <= 0.05, dtype  # the CPU test's bound (test_int8.py)


def test_loader_copies_batches_from_pinned_memory_without_blocking(tmp_path):
    dataset = make_dataset(tmp_path / "ds")
    on_cpu = BatchLoader(dataset, "train", 8, 128, seed=5)
    on_gpu = BatchLoader(dataset, "train", 8, 128, device="cuda", seed=5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.cuda._sleep(200_000_000)  # about 0.1 s of queued GPU work: a blocking copy would wait for it
            x, y = on_gpu.next_batch()
            assert not torch.cuda.current_stream().query()  # the batch is on its way; the GPU is still busy
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies and all("Pinned" in name for name in copies), copies
    expected = [on_cpu.next_batch() for _ in range(3)][-1]
    assert x.is_cuda and torch.equal(x.cpu(), expected[0]) and torch.equal(y.cpu(), expected[1])


def test_training_run_on_cuda_logs_mfu_and_peak_memory(tmp_path, monkeypatch):
    """The trainer on a GPU, in bf16 (the loop, the loader's copies, the logger's CUDA figures)."""
    for flags in (torch.backends.cuda.matmul, torch.backends.cudnn):  # the trainer turns TF32 on; the tests after
        monkeypatch.setattr(flags, "allow_tf32", flags.allow_tf32)  # this one get the setting back
    config = load_training_config(run_config(tmp_path, device="cuda", dtype="bfloat16", max_iters=4, eval_interval=4))
    losses = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert len(train_rows) == 4 and all(row["peak_memory_gib"] > 0 for row in train_rows)
    assert all("mfu" in row for row in train_rows) == (peak_flops(CUDA) is not None)
    assert losses["val"] < train_rows[0]["loss"]
