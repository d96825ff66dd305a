"""Training throughput, ours against transformers' Gemma3ForCausalLM, in one process on the same settings.

    python benchmarks/bench_train.py                          # CPU: config/demo_model.json, batch 8 x 128
    python benchmarks/bench_train.py --block-size 512         # CPU, past the demo's 64-token window
    python benchmarks/bench_train.py --compile                # GPU: the 270M model at blocks 128, 1024 and 8192
    python benchmarks/bench_train.py --implementations ours   # one model per process: max RSS is its own

Both models get the same config (transformers' through `ModelConfig.to_hf_dict`, sdpa attention), the same
random token batch, AdamW with the same settings (fused, as in the trainer), and the same precision (bf16
autocast with float32 weights on CUDA, float32 on the CPU). Ours runs the way the trainer runs it: `return_logits=False`
(chunked linear cross-entropy) and, past the window, the attention backend "auto" picks (attention.py). A step is
forward + backward + optimizer step. The two implementations alternate for `--rounds` rounds (each round
builds a fresh model, warms up, then times `--steps` steps), so a noisy machine slows both alike; the figures
are medians over every timed step. "first step" is the first step's time: torch.compile's compilation with
--compile. MFU (CUDA only) = model FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s, model FLOPs
as in training/metrics.py: 6 N + 12 sum over layers of n_heads * head_dim * span, per token (N: parameters
less the embedding lookup; span: block_size for full layers, min(block_size, window) for sliding ones).
The last line reads `ratio_vs_transformers=R`: our tokens/s over theirs (the last block size's, with several).
"""

import argparse
import contextlib
import platform
import resource
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from architecture import REPO_ROOT, Gemma3Model, ModelConfig
from training.device import select_device
from training.metrics import flops_per_token, peak_flops


def build(implementation: str, config: ModelConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if implementation == "ours":
        return Gemma3Model(config).to(device)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_config = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return Gemma3ForCausalLM(Gemma3TextConfig(**hf_config, attn_implementation="sdpa")).to(device)


def time_training(implementation: str, config: ModelConfig, args, device: torch.device, block_size: int,
                  batch_size: int) -> dict:  # fmt: skip
    model = build(implementation, config, device)
    if args.activation_checkpointing:
        if implementation == "ours":
            model.activation_checkpointing = True
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    step_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
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

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    synchronize()
    first_step = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"times": times, "first_step_s": first_step, "peak_memory_gib": memory}


def summarize(implementation: str, rounds: list[dict], config: ModelConfig, device, block_size, batch_size) -> dict:
    seconds = statistics.median(t for r in rounds for t in r["times"])
    tokens = batch_size * block_size
    peak = peak_flops(device)
    with torch.device("meta"):  # shapes only, for the FLOP count
        model_flops = flops_per_token(Gemma3Model(config), block_size) * tokens
    memory = [r["peak_memory_gib"] for r in rounds if r["peak_memory_gib"] is not None]
    return {
        "implementation": implementation,
        "block_size": block_size,
        "batch_size": batch_size,
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
    parser.add_argument("--block-size", type=int, nargs="+", help="default: 128 on CPU, 128 1024 8192 on CUDA")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the implementations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks (both models)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda[:N], mps, cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--implementations", nargs="+", default=["ours", "transformers"],
                        choices=["ours", "transformers"])  # fmt: skip
    parser.add_argument("--out", type=Path, help="append a markdown row per implementation to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    default = "model_config.json" if device.type == "cuda" else "demo_model.json"
    config_path = Path(args.model_config or REPO_ROOT / "config" / default)
    config = ModelConfig.from_json(config_path)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    block_sizes = args.block_size or ([128, 1024, 8192] if device.type == "cuda" else [128])
    print(f"{name}, torch {torch.__version__}, {config_path.name}, compile {args.compile}, "
          f"activation checkpointing {args.activation_checkpointing}")  # fmt: skip

    rows, ratio = [], None
    for block_size in block_sizes:
        batch_size = args.batch_size or (CUDA_BATCH.get(block_size, 1) if device.type == "cuda" else 8)
        rounds = {impl: [] for impl in args.implementations}
        for _ in range(args.rounds):
            for impl in args.implementations:
                rounds[impl].append(time_training(impl, config, args, device, block_size, batch_size))
        results = [summarize(impl, rounds[impl], config, device, block_size, batch_size) for impl in rounds]
        for r in results:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a"
            print(f"{batch_size:>3} x {block_size:<5} {r['implementation']:>12}: {r['tokens_per_sec']:>10,.0f} tok/s  "
                  f"{r['ms_per_iter']:8.1f} ms/iter  MFU {mfu:>6}  peak memory {memory}  "
                  f"first step {r['first_step_s']:.1f} s")  # fmt: skip
            rows.append(f"| {date.today()} | {name} | torch {torch.__version__} | {config_path.name} | "
                        f"{batch_size} x {block_size} | {args.compile} | {r['implementation']} | "
                        f"{r['tokens_per_sec']:,.0f} | {r['ms_per_iter']:.1f} | {mfu} | {memory} |")  # fmt: skip
        if len(results) == 2:
            ratio = results[0]["tokens_per_sec"] / results[1]["tokens_per_sec"]
            print(f"block {block_size}: ours / transformers = {ratio:.2f}")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(rows) + "\n")
    print(f"max RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if ratio is not None:  # the last block size's
        print(f"ratio_vs_transformers={ratio:.2f}")


if __name__ == "__main__":
    main()
