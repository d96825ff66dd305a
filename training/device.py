"""Devices and precision: `auto` picks CUDA, then Apple's MPS, then the CPU; bf16 only where the hardware does it.

Design choices:
- One place decides, for training, sample.py and the benchmarks, so they agree.
- bf16 autocast (float32 master weights) runs on CUDA GPUs with native bf16 (compute capability 8.0 or newer:
  Ampere, Ada, Hopper, Blackwell) and on CPUs with native bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on
  Arm), read from the CPU's flags rather than guessed from its name; elsewhere bf16 would be emulated and slower
  than float32, so float32 runs, with a one-line note saying why. `torch.cuda.is_bf16_supported()` is not the
  test: by default it counts emulation, so a T4 or V100 would train in emulated bf16, on SDPA's math kernel.
- MPS has known gaps that change between torch releases (bf16 autocast, SDPA's `enable_gqa`, fused AdamW). Each
  is probed once with a tiny operation on the device, and a missing one falls back (float32, repeated K/V, the
  unfused optimizer) instead of failing mid-run. No Apple hardware was available to test these paths.
"""

import ctypes
import functools
import platform
from pathlib import Path

import torch

from data.errors import UserError

from .config import is_device_name

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # /proc/cpuinfo: x86 AVX512-BF16 / AMX, Arm BF16
NATIVE_BF16_CUDA_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose tensor cores compute bf16


class DeviceError(UserError, ValueError):
    """The requested device does not exist here; the message says what does."""


def select_device(name: str) -> torch.device:
    """`auto` (CUDA, then MPS, then the CPU), `cuda`, `cuda:N`, `mps` or `cpu`, checked to exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if not is_device_name(name):
        raise DeviceError(f"device '{name}' is not one of auto, cuda, cuda:N, mps, cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}': CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps': Apple's MPS is not available on this machine")
    return torch.device(name)


def cpuinfo_value(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of `keys` (Linux; None elsewhere or if absent)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(keys):
            return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features"; empty where unknown)."""
    return set((cpuinfo_value("flags", "Features") or "").split())


def cpu_has_native_bf16() -> bool:
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def native_bf16(device: torch.device) -> bool:
    """Whether a CUDA device or the CPU computes bf16 natively (MPS is probed separately, by `mps_supports`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CUDA_CAPABILITY
    return device.type == "cpu" and cpu_has_native_bf16()


def decode_dtype(device: torch.device, int8: bool = False) -> torch.dtype:
    """The fastest activation dtype for decoding on `device`, what sample.py's `--dtype auto` picks (measured per CPU
    class in benchmarks/results/generate_cpu.md). A decode step reads every weight once and computes little, so on
    a CPU bf16 weights (half the bytes) decode faster than float32 ones even without native bf16, which converts
    them in registers. With int8 weights: bf16 activations where bf16 is native (PyTorch's int8-weight matmul),
    else float32 ones (the compiled int8 word kernel, architecture/int8.py). CUDA: bf16 where native; MPS: float32."""
    if device.type == "cpu":
        return torch.float32 if int8 and not cpu_has_native_bf16() else torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else torch.float32


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    return cpuinfo_value("model name") or platform.processor() or platform.machine()


def cpu_bf16_flags() -> str:
    """The CPU's native-bf16 flags, for benchmark reports: e.g. "avx512_bf16", or "no native bf16"."""
    return " ".join(sorted(NATIVE_BF16_FLAGS & cpu_flags())) or "no native bf16"


def autocast_dtype(device: torch.device, requested: str) -> tuple[torch.dtype | None, str | None]:
    """(the autocast dtype, or None for float32; a note when bf16 was asked for and float32 runs instead)."""
    if requested != "bfloat16":
        return None, None
    if device.type in ("cuda", "cpu") and native_bf16(device):
        return torch.bfloat16, None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return None, (
            f"note: this GPU (compute capability {major}.{minor}) has no native bf16 (8.0 or newer: "
            "Ampere and later); training in float32"
        )
    if device.type == "cpu":
        return None, (
            "note: this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16); training in float32, about half as "
            "fast as bf16 autocast on a CPU that has it (the demo's time per CPU class: README, Quick start)"
        )
    if mps_supports("autocast_bf16"):
        return torch.bfloat16, None
    return None, "note: this torch has no bf16 autocast on MPS; training in float32"


@functools.cache
def mps_supports(feature: str) -> bool:
    """Whether a tiny MPS operation using `feature` runs with the installed torch (probed once)."""
    if not torch.backends.mps.is_available():
        return False
    try:
        x = torch.ones(1, 2, 4, 8, device="mps")
        if feature == "autocast_bf16":
            with torch.autocast("mps", dtype=torch.bfloat16):
                (x @ x.transpose(-1, -2)).sum().item()
        elif feature == "fused_adamw":
            p = torch.nn.Parameter(torch.ones(2, device="mps"))
            p.grad = torch.ones(2, device="mps")
            torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def keep_freed_memory_for_reuse() -> bool:
    """Have glibc keep large freed blocks for the next allocation instead of returning them to the OS; whether it
    could be set. By default glibc unmaps a freed block above a (dynamic) threshold and page-faults a fresh one in
    at the next request, and a training step on the CPU frees and re-allocates the same large temporaries every
    iteration (the loss's chunks, the gradients): measured on the demo, 510 ms a step against 412 ms with this set
    (benchmarks/results/demo_cpu.md). Only where glibc is the allocator (Linux)."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    return bool(libc.mallopt(m_mmap_threshold, 2**28)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA and MPS run asynchronously; the CPU has nothing queued): what a
    timer must do before it reads the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions run on TF32 tensor cores (float32 range, 10-bit mantissa
    products, float32 sums), as nanoGPT does: the float32 work of a bf16 autocast step, and all of a float32 one,
    several times faster. Elsewhere nothing changes (the CPU's float32 matmuls stay exact)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fused_adamw_available(device_type: str) -> bool:
    return device_type in ("cuda", "cpu") or (device_type == "mps" and mps_supports("fused_adamw"))
