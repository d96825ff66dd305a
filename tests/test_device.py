"""Devices and precision: `auto` selection, native-bf16 detection, the MPS guards (their logic, on the CPU: no Apple
hardware here), and training under CPU bf16 autocast (exact resume, compiled against eager)."""

import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_training import losses, run_config, run_train, train_process, wait_for_iteration

from architecture import attention
from training import device as device_module
from training.checkpoint import load_checkpoint
from training.device import (
    DeviceError,
    allow_tf32,
    autocast_dtype,
    cpu_has_native_bf16,
    fused_adamw_available,
    select_device,
)


@pytest.fixture
def machine(monkeypatch):
    """Pretend which accelerators exist: machine(cuda=..., mps=..., cuda_count=...)."""

    def pretend(cuda: bool = False, mps: bool = False, cuda_count: int = 1) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count if cuda else 0)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert select_device("auto").type == expected


@pytest.mark.parametrize(
    "name, cuda, mps, match",
    [
        ("tpu", False, False, "not one of auto, cuda, cuda:N, mps, cpu"),
        ("cuda", False, True, "CUDA is not available"),
        ("cuda:1", True, False, "has 1 CUDA device"),
        ("mps", True, False, "MPS is not available"),
    ],
)
def test_unavailable_devices_are_refused(machine, name, cuda, mps, match):
    machine(cuda=cuda, mps=mps)
    with pytest.raises(DeviceError, match=match):
        select_device(name)


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    for flags, native in [
        ({"avx2", "avx512f"}, False),
        ({"avx512_bf16"}, True),
        ({"amx_bf16"}, True),
        ({"fp", "asimd", "bf16"}, True),
    ]:
        monkeypatch.setattr(device_module, "cpu_flags", lambda flags=flags: flags)
        assert cpu_has_native_bf16() is native
        dtype, note = autocast_dtype(torch.device("cpu"), "bfloat16")
        assert (dtype is torch.bfloat16) is native and (note is None) is native
        if not native:
            assert "no native bf16" in note
    assert autocast_dtype(torch.device("cpu"), "float32") == (None, None)


@pytest.mark.parametrize(
    "capability, native",
    [
        ((6, 0), False),
        ((7, 0), False),
        ((7, 5), False),
        ((8, 0), True),
        ((8, 9), True),
        ((9, 0), True),
        ((10, 0), True),
    ],
    ids=["P100", "V100", "T4", "A100", "4090", "H100", "B200"],
)
def test_cuda_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, native):
    """A V100 or T4 emulates bf16 (torch.cuda.is_bf16_supported() says True by default): float32 runs there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    dtype, note = autocast_dtype(torch.device("cuda"), "bfloat16")
    assert (dtype is torch.bfloat16) is native
    if native:
        assert note is None
    else:
        assert note == (
            f"note: this GPU (compute capability {capability[0]}.{capability[1]}) has no native bf16 "
            "(8.0 or newer: Ampere and later); training in float32"
        )
    assert autocast_dtype(torch.device("cuda"), "float32") == (None, None)


def test_tf32_only_on_cuda():
    # Saved and restored by hand: the matmul flag is a property of torch's cuBLAS module object, which pytest 9.2's
    # monkeypatch sees as absent and so deletes at undo.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        allow_tf32(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        allow_tf32(torch.device("cuda", 1))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_mps_guards_fall_back_when_the_probe_fails(monkeypatch):
    for works in (True, False):
        monkeypatch.setattr(device_module, "mps_supports", lambda feature, works=works: works)
        dtype, note = autocast_dtype(torch.device("mps"), "bfloat16")
        assert (dtype is torch.bfloat16) is works and (note is None) is works
        assert fused_adamw_available("mps") is works
    assert fused_adamw_available("cpu") and fused_adamw_available("cuda")


@pytest.mark.parametrize(
    "masked, dtype, autocast, capability, shared",
    [
        (False, torch.bfloat16, False, (9, 0), True),  # bf16 weights, causal: flash takes grouped K/V
        (False, torch.float32, True, (8, 0), True),  # float32 tensors under bf16 autocast: flash, as autocast casts
        (True, torch.bfloat16, True, (9, 0), False),  # the blocked sliding path's mask: memory-efficient kernel
        (False, torch.float32, False, (9, 0), False),  # float32 training: no flash
        (False, torch.float16, False, (7, 0), False),  # a V100: no flash
    ],
    ids=["bf16-causal", "autocast-causal", "masked", "float32", "pre-ampere"],
)
def test_cuda_repeats_kv_heads_where_only_the_math_kernel_would_take_them(
    monkeypatch, masked, dtype, autocast, capability, shared
):
    """No GPU here: the device's facts are faked, and the rule is what is tested (tests/test_cuda.py runs SDPA with
    its math kernel disabled on a GPU)."""
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device=None: SimpleNamespace(major=capability[0], minor=capability[1]),
    )
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: autocast and device_type == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    q, k, v = torch.zeros(1, 4, 3, 8, dtype=dtype), *torch.zeros(2, 1, 1, 3, 8, dtype=dtype)
    k2, v2, gqa = attention.kv_heads_for_sdpa(q, k, v, masked=masked, device_type="cuda")
    assert gqa is shared and (k2.size(1), v2.size(1)) == ((1, 1) if shared else (4, 4))


def test_repeated_kv_heads_give_the_same_attention(monkeypatch):
    """The fallback (K/V repeated per query head, no enable_gqa) computes what enable_gqa computes."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8, generator=generator), *torch.randn(2, 2, 1, 9, 8, generator=generator)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert attention.kv_heads_for_sdpa(q, k, v) == (k, v, True)  # the CPU keeps K/V shared
    monkeypatch.setattr(attention, "mps_sdpa_has_gqa", lambda: False)
    k2, v2, gqa = attention.kv_heads_for_sdpa(q, k, v, device_type="mps")
    assert not gqa and k2.shape == q.shape
    assert torch.allclose(F.scaled_dot_product_attention(q, k2, v2, is_causal=True), expected, atol=1e-6)


native = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def bf16_straight(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bf16")
    output = run_train(run_config(tmp_path, dtype="bfloat16"))
    assert "no native bf16" not in output
    return tmp_path / "run"


@native
def test_bf16_ctrl_c_then_resume_gives_identical_losses(bf16_straight, tmp_path):
    config = run_config(tmp_path, dtype="bfloat16")
    process = train_process(config, start_new_session=True)
    wait_for_iteration(tmp_path / "run" / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"] < 12, output
    run_train(config, "--init_from=resume")
    assert losses(tmp_path / "run") == losses(bf16_straight)


@native
def test_bf16_compiled_run_matches_eager(bf16_straight, tmp_path):
    run_train(run_config(tmp_path, dtype="bfloat16"), "--compile=true")
    eager, compiled = losses(bf16_straight), losses(tmp_path / "run")
    assert eager.keys() == compiled.keys()
    for iteration in eager:  # bf16 rounding of fused and reordered operations
        assert compiled[iteration] == pytest.approx(eager[iteration], rel=2e-2), iteration
