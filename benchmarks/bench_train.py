"""Training throughput, ours against transformers' Gemma3ForCausalLM, in one process on the same settings.

    python benchmarks/bench_train.py                          # CPU: config/demo_model.json, batch 8 x 128
    python benchmarks/bench_train.py --block-size 1024 --batch-size 16 --compile   # GPU: the seed model

Both models get the same config (transformers' through `ModelConfig.to_hf_dict`, sdpa attention), the same
random token batch, AdamW with the same settings (fused on CUDA), and the same precision (bf16 autocast with
float32 weights on CUDA, float32 on the CPU). A step is forward + backward + optimizer step; the figures are the
median over timed steps after warm-up. MFU uses the formula in training/metrics.py. The last line reads
`ratio_vs_transformers=R`: our tokens/s over theirs.
"""

import argparse
import contextlib
import platform
import resource
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from architecture import Gemma3Model, ModelConfig  # noqa: E402
from training.metrics import flops_per_token, peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def build(implementation: str, config: ModelConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if implementation == "ours":
        return Gemma3Model(config).to(device)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_config = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return Gemma3ForCausalLM(Gemma3TextConfig(**hf_config, attn_implementation="sdpa")).to(device)


def time_training(implementation: str, config: ModelConfig, args, device: torch.device) -> dict:
    model = build(implementation, config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1), generator=generator).to(device)
    x, y = idx[:, :-1], idx[:, 1:]

    def step() -> None:
        with autocast:
            if implementation == "ours":
                loss = step_model(x, y)[1]
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
    seconds = statistics.median(times)
    tokens = args.batch_size * args.block_size
    peak = peak_flops(device)
    with torch.device("meta"):  # shapes only, for the FLOP count
        model_flops = flops_per_token(Gemma3Model(config), args.block_size) * tokens
    result = {
        "implementation": implementation,
        "tokens_per_sec": tokens / seconds,
        "ms_per_iter": seconds * 1e3,
        "first_step_s": first_step,
        "mfu": model_flops / seconds / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-config", help="model JSON (default: demo model on CPU, seed model on CUDA)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--skip-transformers", action="store_true", help="time ours only")
    parser.add_argument("--out", type=Path, help="append a markdown row per implementation to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default = "model_config.json" if device.type == "cuda" else "demo_model.json"
    config_path = Path(args.model_config or REPO / "config" / default)
    config = ModelConfig.from_json(config_path)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, {config_path.name}, batch {args.batch_size} x {args.block_size}, "
          f"compile {args.compile}")  # fmt: skip

    results = [time_training("ours", config, args, device)]
    if not args.skip_transformers:
        results.append(time_training("transformers", config, args, device))
    rows = []
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{r['implementation']:>12}: {r['tokens_per_sec']:>10,.0f} tok/s  {r['ms_per_iter']:8.1f} ms/iter  "
              f"MFU {mfu:>6}  peak memory {memory}  first step {r['first_step_s']:.1f} s")  # fmt: skip
        rows.append(f"| {date.today()} | {name} | torch {torch.__version__} | {config_path.name} | "
                    f"{args.batch_size} x {args.block_size} | {args.compile} | {r['implementation']} | "
                    f"{r['tokens_per_sec']:,.0f} | {r['ms_per_iter']:.1f} | {mfu} | {memory} |")  # fmt: skip
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(rows) + "\n")
    print(f"max RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if len(results) == 2:
        print(f"ratio_vs_transformers={results[0]['tokens_per_sec'] / results[1]['tokens_per_sec']:.2f}")


if __name__ == "__main__":
    main()
