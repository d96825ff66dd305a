"""Attention forward + backward of one sliding and one full layer: our dispatch against dense masked SDPA.

    python benchmarks/bench_attention.py                      # CPU: demo dims, T = 512 .. 4096, float32
    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.md   # CUDA: seed dims, to 32768

What is timed is the attention core of a layer: q (B, n_heads, T, head_dim), k and v (B, n_kv_groups, T,
head_dim), forward and backward, with the model config's heads, window and query scale. "ours" is
`architecture.attention` as the model calls it (`sliding_mask` + `attend` with `--backend`, by default "auto":
FlexAttention with a cached BlockMask for sliding layers past the window on A100 / H100 / B200, SDPA over
window-sized blocks elsewhere; SDPA's causal path for full layers). "dense" is SDPA with an explicit boolean
T x T mask for both layer types, as a masked implementation without sliding-window support runs it. Figures are
medians over `--steps` timed runs after warm-up (which compiles FlexAttention on CUDA); peak memory is CUDA's
max_memory_allocated above the inputs. On the CPU (no memory figures there) sliding layers take the blocked SDPA
path, as the model does: FlexAttention has no CPU backward in torch 2.13.
"""

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from architecture import REPO_ROOT, ModelConfig
from architecture.attention import BACKENDS, attend, resolve_backend, sliding_mask, sliding_window_mask
from training.device import DeviceError, select_device, synchronize


def dense_attend(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))


def measure(kind: str, layer: str, T: int, config: ModelConfig, args, device: torch.device) -> dict:
    """Median ms and peak memory (CUDA) of one forward + backward."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = lambda heads: (args.batch_size, heads, T, config.head_dim)
    q = torch.randn(shape(config.n_heads), device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape(config.n_kv_groups), device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape(config.n_kv_groups), device=device, dtype=dtype, requires_grad=True)
    scale = config.query_pre_attn_scalar**-0.5
    window = config.sliding_window if layer == "sliding" else T  # a full layer is a window of T: causal

    def step() -> None:
        if kind == "ours":
            out = attend(q, k, v, sliding_mask(T, window, device, args.backend), scale)
        else:  # the mask is built inside the step, as a masked implementation builds it every forward
            out = dense_attend(q, k, v, sliding_window_mask(T, window, device), scale)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    memory = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return {"ms": statistics.median(times) * 1e3, "mib": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", help="model JSON (default: demo model on CPU, the 270M model on CUDA)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda[:N], mps, cpu")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="ours for sliding layers (attention.py)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--min-T", type=int, default=512)
    parser.add_argument("--max-T", type=int, help="default: 32768 on CUDA, 4096 on CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as markdown to this file")
    args = parser.parse_args()
    try:
        device = select_device(args.device)
    except DeviceError as e:
        parser.error(str(e))
    cuda = device.type == "cuda"
    config_path = Path(args.model_config or REPO_ROOT / "config" / ("model_config.json" if cuda else "demo_model.json"))
    config = ModelConfig.from_json(config_path)
    max_T = args.max_T or (32768 if cuda else 4096)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    header = (
        f"{name}, torch {torch.__version__}, {date.today()}, {config_path.name} (heads {config.n_heads}, "
        f"kv heads {config.n_kv_groups}, head_dim {config.head_dim}, window {config.sliding_window}), "
        f"batch {args.batch_size}, {'bfloat16' if cuda else 'float32'}, forward + backward, "
        f"sliding backend {resolve_backend(args.backend, device)}"
    )
    print(header)
    lines = [
        "| layer | T | ours ms | dense ms | speed-up | ours MiB | dense MiB | memory ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    T = args.min_T
    while T <= max_T:
        for layer in ("sliding", "full"):
            ours = measure("ours", layer, T, config, args, device)
            dense = measure("dense", layer, T, config, args, device)
            mem = (
                f"{ours['mib']:.0f} | {dense['mib']:.0f} | {dense['mib'] / ours['mib']:.1f}x"
                if cuda
                else "n/a | n/a | n/a"
            )
            line = f"| {layer} | {T} | {ours['ms']:.2f} | {dense['ms']:.2f} | {dense['ms'] / ours['ms']:.2f}x | {mem} |"
            print(line)
            lines.append(line)
        T *= 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# Attention forward + backward\n\n{header}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
