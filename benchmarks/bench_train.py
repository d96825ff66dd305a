"""Training throughput, ours against transformers' Gemma3ForCausalLM, in one process on the same settings.

    python benchmarks/bench_train.py                          # CPU: config/demo_model.json, the demo's 8 x 256
    python benchmarks/bench_train.py --block-size 512         # CPU, further past the demo's 64-token window
    python benchmarks/bench_train.py --compile                # GPU: the 270M model at blocks 128, 1024 and 8192
    python benchmarks/bench_train.py --implementations ours   # one model per process: max RSS is its own

Both models get the same config (transformers' through `ModelConfig.to_hf_dict`, sdpa attention), the same
random token batch and the trainer's optimizer (`--optimizer`, built by training/optimizer.py's `build_optimizer`
with the default training config's settings: AdamW, fused, weight decay on the matrices only). Each runs in every
precision of `--dtypes`: float32, and bf16 autocast with float32 weights (the trainer's `dtype: bfloat16`; on the
CPU only where it has native bf16, as the trainer decides). Each side is then judged by its fastest precision. Ours runs
the way the trainer runs it: `return_logits=False` (chunked linear cross-entropy) and, past the window, the
attention backend "auto" picks (attention.py). A step is forward + backward + optimizer step. The
implementations and precisions alternate for `--rounds` rounds (each round builds a fresh model, warms up, then
times `--steps` steps), so a noisy machine slows all alike; the figures are medians over every timed step.
"first step" is the first step's time: torch.compile's compilation with --compile.
MFU = model FLOPs per step / step time / peak matmul FLOP/s in that precision. Model FLOPs as in
training/metrics.py: 6 N + 12 sum over layers of n_heads * head_dim * span, per token (N: parameters less the
embedding lookup; span: block_size for full layers, min(block_size, window) for sliding ones). The peak is the
GPU's dense bf16 figure from its spec sheet on CUDA; on the CPU the benchmark measures it: the best of 10
products of 2048 x 2048 matrices in the precision (float32, or bfloat16 as autocast runs it).
The last line reads `ratio_vs_transformers=R`: our best tokens/s over theirs (the last block size's).
"""

import argparse
import math
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from architecture import REPO_ROOT, Gemma3Model, ModelConfig
from training.config import TrainingConfig
from training.device import (
    DeviceError,
    allow_tf32,
    autocast_dtype,
    cpu_bf16_flags,
    cpu_model,
    keep_freed_memory_for_reuse,
    select_device,
    synchronize,
)
from training.metrics import flops_per_token, peak_flops
from training.optimizer import OPTIMIZERS, build_optimizer


def build(implementation: str, config: ModelConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if implementation == "ours":
        return Gemma3Model(config).to(device)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_config = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return Gemma3ForCausalLM(Gemma3TextConfig(**hf_config, attn_implementation="sdpa")).to(device)


def time_training(
    implementation: str, config: ModelConfig, args, device: torch.device, block_size: int, batch_size: int, dtype: str
) -> dict:
    model = build(implementation, config, device)
    if args.activation_checkpointing:
        if implementation == "ours":
            model.activation_checkpointing = True
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    optimizer = build_optimizer(model, TrainingConfig(optimizer=args.optimizer), device.type)  # as the trainer does
    step_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16")
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch_size, block_size + 1), generator=generator).to(device)
    x, y = idx[:, :-1], idx[:, 1:]

    def step() -> None:
        with autocast:
            if implementation == "ours":
                loss = step_model(x, y, return_logits=False)[1]
            else:  # transformers shifts labels itself, so it gets the sequence and sees block_size - 1 targets
                loss = step_model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    synchronize(device)
    first_step = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"times": times, "first_step_s": first_step, "peak_memory_gib": memory}


def matmul_peak(device: torch.device, dtype: str) -> float:
    """FLOP/s of the fastest of 10 products of 2048 x 2048 matrices in `dtype` (bf16 inputs as autocast feeds
    the matmuls), after one warm-up: the peak that the CPU's MFU is measured against."""
    a, b = (torch.randn(2048, 2048, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def summarize(rounds: list[dict], config: ModelConfig, block_size: int, batch_size: int, peak: float | None) -> dict:
    seconds = statistics.median(t for r in rounds for t in r["times"])
    tokens = batch_size * block_size
    with torch.device("meta"):  # shapes only, for the FLOP count
        model_flops = flops_per_token(Gemma3Model(config), block_size) * tokens
    memory = [r["peak_memory_gib"] for r in rounds if r["peak_memory_gib"] is not None]
    return {
        "tokens_per_sec": tokens / seconds,
        "ms_per_iter": seconds * 1e3,
        "first_step_s": rounds[0]["first_step_s"],
        "mfu": model_flops / seconds / peak if peak else None,
        "peak_memory_gib": max(memory) if memory else None,
    }


# Batch per block size on CUDA: the default run's 32 x 128, then about the same tokens per step as long as it fits.
CUDA_BATCH = {128: 32, 1024: 16, 8192: 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", help="model JSON (default: demo model on CPU, the 270M model on CUDA)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: 8 on CPU, CUDA_BATCH)")
    parser.add_argument("--block-size", type=int, nargs="+", help="default: 256 on CPU, 128 1024 8192 on CUDA")
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16"], help="default: both where bf16 is native, else float32"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the implementations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="training/optimizer.py's")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks (both models)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda[:N], mps, cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--implementations", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"]
    )
    parser.add_argument("--out", type=Path, help="append a markdown row per implementation and dtype to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = select_device(args.device)
    except DeviceError as e:
        parser.error(str(e))
    if device.type == "cpu":
        keep_freed_memory_for_reuse()  # as the trainer does on the CPU, for both implementations
    default = "model_config.json" if device.type == "cuda" else "demo_model.json"
    config_path = Path(args.model_config or REPO_ROOT / "config" / default)
    config = ModelConfig.from_json(config_path)
    native_bf16 = autocast_dtype(device, "bfloat16")[0] is not None
    dtypes = args.dtypes or (["bfloat16"] if device.type == "cuda" else ["float32"] + ["bfloat16"] * native_bf16)
    if device.type == "cuda":
        allow_tf32(device)
        name = torch.cuda.get_device_name(device)
        peaks = {dtype: peak_flops(device) for dtype in dtypes}
    else:
        name = f"{cpu_model()} ({cpu_bf16_flags()}), {torch.get_num_threads()} threads"
        peaks = {dtype: matmul_peak(device, dtype) for dtype in dtypes}
    block_sizes = args.block_size or ([128, 1024, 8192] if device.type == "cuda" else [256])
    print(
        f"{name}, torch {torch.__version__}, {config_path.name}, compile {args.compile}, "
        f"activation checkpointing {args.activation_checkpointing}"
    )
    for dtype, peak in peaks.items():
        source = "measured: 2048 x 2048 matmuls" if device.type == "cpu" else "spec sheet"
        print(f"peak matmul {dtype}: {peak / 1e9:,.0f} GFLOP/s ({source})" if peak else f"peak {dtype}: unknown")

    rows, ratio = [], None
    for block_size in block_sizes:
        batch_size = args.batch_size or (CUDA_BATCH.get(block_size, 1) if device.type == "cuda" else 8)
        settings = [(impl, dtype) for impl in args.implementations for dtype in dtypes]
        rounds = {setting: [] for setting in settings}
        for _ in range(args.rounds):
            for impl, dtype in settings:
                rounds[impl, dtype].append(time_training(impl, config, args, device, block_size, batch_size, dtype))
        best = {}
        for (impl, dtype), timed in rounds.items():
            r = summarize(timed, config, block_size, batch_size, peaks[dtype])
            if r["tokens_per_sec"] > best.get(impl, (0, None))[0]:
                best[impl] = (r["tokens_per_sec"], dtype)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a"
            print(
                f"{batch_size:>3} x {block_size:<5} {impl:>12} {dtype:>8}: {r['tokens_per_sec']:>10,.0f} tok/s  "
                f"{r['ms_per_iter']:8.1f} ms/iter  MFU {mfu:>6}  peak memory {memory}  "
                f"first step {r['first_step_s']:.1f} s"
            )
            rows.append(
                f"| {date.today()} | {name} | torch {torch.__version__} | {config_path.name} | "
                f"{batch_size} x {block_size} | {args.compile} | {impl} | {dtype} | "
                f"{r['tokens_per_sec']:,.0f} | {r['ms_per_iter']:.1f} | {mfu} | {memory} |"
            )
        if len(best) == 2:
            (ours, our_dtype), (theirs, their_dtype) = best["ours"], best["transformers"]
            ratio = ours / theirs
            print(
                f"block {block_size}: ours ({our_dtype}) / transformers ({their_dtype}), each at its fastest = "
                f"{ratio:.2f}"
            )
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(rows) + "\n")
    print(f"max RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if ratio is not None:  # the last block size's
        print(f"ratio_vs_transformers={ratio:.2f}")


if __name__ == "__main__":
    main()
