"""Training recipes side by side: how many iterations, and how much time, each needs to reach the AdamW-cosine
baseline's final val loss on the demo.

    python benchmarks/bench_recipe.py                                     # adamw-cosine against muon-wsd, 3 seeds
    python benchmarks/bench_recipe.py --recipes adamw-cosine,adamw-wsd --seeds 1337
    python benchmarks/bench_recipe.py --recipes adamw-cosine:learning_rate=0.004,muon-wsd:muon_lr=0.04  # a sweep
    python benchmarks/bench_recipe.py --model-config benchmarks/deep_demo_model.json  # blocks hold most parameters

Each run is a real `train.py --config config/demo.json` process with the recipe's settings on top, `--seed`, the
same validation batches for every run (the trainer evaluates on fixed-seed batches; `--eval-iters`, 50 by
default) and an evaluation every `--eval-interval` iterations. A recipe is a name of RECIPES, optionally followed by
`:key=value` settings, each after its own colon (`adamw-cosine:learning_rate=0.004:min_lr=0.0004`). The first recipe
listed is the baseline: its mean final val loss over the seeds is the target, and each recipe reports
- its final val loss (mean and spread over seeds) and bits per byte,
- the iteration at which its val loss reached the target, interpolated between the evaluations around it (mean
  over the seeds that did; how many never did, or "never"), as a fraction of the baseline's iterations, and
- the training time to that iteration at the run's median time per iteration (from metrics.jsonl, evaluations
  excluded; the median, so that a stall or a busy neighbour in one iteration does not count), as a fraction of the
  baseline's whole training time, and that median.
`--jobs 2 --threads 1` runs two processes at once, one core each: every recipe then runs under the same
conditions. Finished runs are kept under `--work` and not run again, so a sweep can grow run by run. `--out FILE.md`
writes the table with the command, CPU, torch version and date, and FILE.png with the mean val curves.
"""

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.config import load_training_config  # noqa: E402  (after the path: the benchmark runs from anywhere)
from training.metrics import read_metrics  # noqa: E402
from training.trainer import RECIPE  # noqa: E402

RECIPES = {  # name: train.py settings on top of config/demo.json
    "adamw-cosine": {"optimizer": "adamw", "lr_schedule": "cosine"},
    "adamw-wsd": {"optimizer": "adamw", "lr_schedule": "wsd"},
    "muon-cosine": {"optimizer": "muon", "lr_schedule": "cosine"},
    "muon-wsd": {"optimizer": "muon", "lr_schedule": "wsd"},
}


def parse_recipe(spec: str) -> tuple[str, dict]:
    """'muon-wsd:muon_lr=0.04:decay_fraction=0.4' -> (the same string, its settings): commas separate recipes."""
    name, *extra = spec.split(":")
    if name not in RECIPES:
        raise SystemExit(f"error: unknown recipe '{name}'; known: {', '.join(RECIPES)}")
    settings = dict(RECIPES[name])
    for item in extra:
        key, _, value = item.partition("=")
        settings[key] = value
    return spec, settings


def run(spec: str, settings: dict, seed: int, args: argparse.Namespace) -> Path:
    """Train one recipe and seed (unless a finished run is already there); return its out_dir."""
    model = f"{args.model_config.stem}_" if args.model_config else ""  # the demo's model keeps the plain names
    out_dir = args.work / f"{model}{spec.replace(':', '_').replace('=', '-')}_seed{seed}"
    flags = {**settings, "seed": seed, "eval_iters": args.eval_iters, "eval_interval": args.eval_interval,
             "log_interval": 1, "max_iters": args.max_iters, "threads": args.threads, "out_dir": out_dir,
             "overwrite": "true", **({"model_config": args.model_config} if args.model_config else {})}  # fmt: skip
    if finished(out_dir, args.max_iters, flags):
        return out_dir
    command = [sys.executable, "train.py", "--config", "config/demo.json", *(f"--{k}={v}" for k, v in flags.items())]
    print(f"running {shlex.join(command[1:])}", flush=True)
    log = args.work / f"{out_dir.name}.log"
    with open(log, "w") as f:
        if subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: {spec} seed {seed} failed; see {log}")
    return out_dir


def finished(out_dir: Path, max_iters: int, flags: dict) -> bool:
    """Whether out_dir holds a finished run of exactly this recipe: a run kept from before config/demo.json changed
    (its learning rate, say) would otherwise be reported as the recipe it no longer is."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    rows = read_metrics(path)
    recorded = next((r["training"] for r in rows if r["kind"] == "config"), {})
    expected = load_training_config(REPO / "config" / "demo.json", [f"--{k}={v}" for k, v in flags.items()]).to_dict()
    changed = [
        f"{k} {recorded.get(k)} -> {expected[k]}" for k in (*RECIPE, "max_iters") if recorded.get(k) != expected[k]
    ]
    if changed:
        raise SystemExit(
            f"error: {out_dir} was trained with other settings than {out_dir.name} means now ({', '.join(changed)}): "
            "rename it after what it ran, or remove it"
        )
    return any(r["kind"] == "eval" and r["iter"] == max_iters for r in rows)


def curves(out_dir: Path) -> tuple[list[dict], list[float]]:
    """The run's evaluation rows and each iteration's time in ms (index i: iteration i + 1)."""
    rows = read_metrics(out_dir / "metrics.jsonl")
    return [r for r in rows if r["kind"] == "eval"], [r["ms_per_iter"] for r in rows if r["kind"] == "train"]


def reached(evals: list[dict], times: list[float], target: float) -> tuple[float, float] | None:
    """(the iteration at which val loss reached target, the training seconds up to it), or None. The iteration is
    interpolated linearly between the evaluations before and at the first one at or below target: evaluations
    every 25 or 50 iterations would otherwise round every run up to the next one."""
    at = next((i for i, r in enumerate(evals) if r["val_loss"] <= target), None)
    if at is None:
        return None
    hit = float(evals[at]["iter"])
    if at > 0:
        (x0, y0), (x1, y1) = ((evals[j]["iter"], evals[j]["val_loss"]) for j in (at - 1, at))
        hit = x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return hit, hit * statistics.median(times) / 1000


def summarise(results: dict[str, list[Path]], max_iters: int) -> tuple[list[str], dict[str, dict[int, float]]]:
    """The table's rows and each recipe's mean val curve."""
    baseline = next(iter(results))
    data = {spec: [curves(d) for d in dirs] for spec, dirs in results.items()}
    target = statistics.mean(evals[-1]["val_loss"] for evals, _ in data[baseline])
    base_seconds = statistics.mean(len(times) * statistics.median(times) / 1000 for _, times in data[baseline])
    rows, mean_curves = [], {}
    for spec, runs in data.items():
        finals = [evals[-1]["val_loss"] for evals, _ in runs]
        spread = f" ± {statistics.stdev(finals):.3f}" if len(finals) > 1 else ""
        bpb = statistics.mean(evals[-1]["val_bpb"] for evals, _ in runs)
        hits = [reached(evals, times, target) for evals, times in runs]
        got = [h for h in hits if h]
        iters, when = "never", "-"
        if got:
            iteration, seconds = statistics.mean(i for i, _ in got), statistics.mean(s for _, s in got)
            iters, when = (
                f"{iteration:.0f} ({iteration / max_iters:.0%})",
                f"{seconds:.0f} s ({seconds / base_seconds:.0%})",
            )
        missed = f", {len(hits) - len(got)} of {len(hits)} seeds never" if 0 < len(got) < len(hits) else ""
        ms = statistics.median(t for _, times in runs for t in times)
        rows.append(
            f"| {spec} | {statistics.mean(finals):.3f}{spread} | {bpb:.3f} | {iters}{missed} | {when} | {ms:.0f} |"
        )
        # the iterations every seed evaluated: a mean over a changing set of seeds would zig-zag
        iterations = sorted(set.intersection(*({r["iter"] for r in evals} for evals, _ in runs)))
        mean_curves[spec] = {
            i: statistics.mean(r["val_loss"] for evals, _ in runs for r in evals if r["iter"] == i) for i in iterations
        }
    header = [
        f"Target: the baseline ({baseline}) mean final val loss, {target:.3f}; its training time {base_seconds:.0f} s.",
        "",
        "| recipe | final val loss | final val bpb | iterations to the target | training time to it | ms/iter |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    return header + rows, mean_curves


def plot(mean_curves: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for spec, curve in mean_curves.items():
        ax.plot(list(curve), list(curve.values()), "o-", markersize=3, label=spec)
    ax.set(xlabel="iteration", ylabel="val loss (nats/token), mean over seeds", title="Demo: val loss by recipe")
    ax.set_ylim(top=min(max(c[min(c)] for c in mean_curves.values()), 6.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="adamw-cosine,muon-wsd", help="the first is the baseline")
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--model-config", type=Path, help="another model than the demo's (config/demo_model.json)")
    parser.add_argument("--max-iters", type=int, default=350, help="the demo's")
    parser.add_argument("--eval-iters", type=int, default=50)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per run (0: torch's choice)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_recipe"), help="where the runs are kept")
    parser.add_argument("--out", type=Path, help="write the table here (markdown) and the curves beside it (.png)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recipes = dict(parse_recipe(spec) for spec in args.recipes.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {spec: [pool.submit(run, spec, s, seed, args) for seed in seeds] for spec, s in recipes.items()}
        results = {spec: [f.result() for f in runs] for spec, runs in futures.items()}
    table, mean_curves = summarise(results, args.max_iters)

    import torch

    from training.device import cpu_bf16_flags, cpu_model

    context = (
        f"`python benchmarks/bench_recipe.py {shlex.join(sys.argv[1:])}`, {date.today()}, {cpu_model()} "
        f"({cpu_bf16_flags()}), torch {torch.__version__}; model {args.model_config or 'config/demo_model.json'}; "
        f"seeds {args.seeds}, {args.eval_iters} val batches of the "
        f"demo's 8 x 256 every {args.eval_interval} iterations; {time.perf_counter() - start:.0f} s in all"
    )
    print(context, *table, sep="\n")
    if args.out:
        args.out.write_text("\n".join([context, "", *table, ""]))
        plot(mean_curves, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
