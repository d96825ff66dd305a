"""Tokenization throughput of data/prepare.py's workers, with 1 process and with all cores.

    python benchmarks/tokenize_throughput.py [--num-proc N] [--repeats R] [--corpus pystdlib|pydocs]

Design choices:
- Measures exactly what prepare runs (`document_batches` into `tokenize_stream`: batches of BATCH_CHARS
  characters through its worker pool, results in order), on the offline pystdlib + pydocs
  corpora, so it runs on any machine.
- The corpus is read into memory first, so the figures are tokenization plus inter-process
  transfer and pool start-up (milliseconds with fork), without disk I/O noise.
- Best of --repeats rounds: on a shared machine the fastest run is the least disturbed one.
"""

import argparse
import os
import time

from data import sources
from data.prepare import BATCH_CHARS, document_batches, tokenize_stream
from data.tokenizer import gpt2


def load_batches(corpus: str) -> tuple[list[list[tuple[str, bool]]], int]:
    """The corpus as prepare's batches of (text, is_val) documents, and its size in UTF-8 bytes."""
    names = ("pystdlib", "pydocs") if corpus == "both" else (corpus,)
    batches = [batch for name in names for batch in document_batches(sources.resolve(name), 0.0, 0)]
    return batches, sum(len(text.encode()) for batch in batches for text, _ in batch)


def best_of(runs: dict, repeats: int) -> dict:
    """{key: (fastest seconds, token count)} over repeats rounds of every run() -> token count."""
    best = {key: (float("inf"), 0) for key in runs}
    for _ in range(repeats):
        # Rounds alternate between the runs, so a burst of load elsewhere hits them alike.
        for key, run in runs.items():
            start = time.perf_counter()
            tokens = run()
            best[key] = min(best[key], (time.perf_counter() - start, tokens))
    return best


def busy_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes meanwhile, from /proc/stat (None where there is none)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # busy (all but idle, iowait), total

    if not os.path.exists("/proc/stat"):
        return None
    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corpus", choices=("both", "pystdlib", "pydocs"), default="both")
    args = parser.parse_args()
    tokenizer = gpt2()  # loaded once here; forked workers inherit it
    batches, nbytes = load_batches(args.corpus)
    print(f"corpus: {args.corpus}, {nbytes / 1e6:.1f} MB in {len(batches)} batches of ~{BATCH_CHARS} chars")
    if (busy := busy_cores()) is not None and busy > 0.2:
        print(f"warning: other processes keep {busy:.1f} of {os.cpu_count()} cores busy; multi-process figures suffer")

    def run(num_proc: int) -> int:
        return sum(len(train) + len(val) for _, (train, val) in tokenize_stream(iter(batches), num_proc, tokenizer))

    results = best_of({n: lambda n=n: run(n) for n in sorted({1, args.num_proc})}, args.repeats)
    for n, (seconds, tokens) in results.items():
        print(
            f"{n:>2} process{'es' if n > 1 else '  '}: {nbytes / 1e6 / seconds:7.2f} MB/s"
            f"  {tokens / seconds / 1e6:6.2f} M tokens/s  ({seconds:.2f} s, {tokens:,} tokens)"
        )
    if args.num_proc > 1:
        speedup = results[1][0] / results[args.num_proc][0]
        print(f"speed-up {speedup:.2f}x on {args.num_proc} processes: {speedup / args.num_proc:.0%} of linear scaling")


if __name__ == "__main__":
    main()
