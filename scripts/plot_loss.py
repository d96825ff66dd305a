"""Plot a run's losses and learning rate: `python scripts/plot_loss.py checkpoints/RUN [--out FILE.png]`.

Reads RUN/metrics.jsonl (written by train.py) and draws train loss (every logged iteration), the evaluated
train and val losses, and the learning rate on a second axis; below them, the evaluations' bits per byte, when the
metrics have them (runs before it was measured do not). Writes RUN/loss.png unless --out says otherwise.

The loss axis shows the part of the curve that matters: its top is the highest loss after the first tenth of the
iterations (a run starts near ln(vocab), about 11, and would squash the rest flat), its bottom the lowest loss;
the first points run off the top, and the title says so. The legend sits below the axes, where it can cover no
curve whatever the run's shape.

--out naming a directory writes DIR/loss.png. An existing file is replaced only when matplotlib wrote it (an
earlier plot: PNG and SVG say so in their first bytes), or with --force; the plot goes to a temporary file renamed
when complete, so a failed write (a full disk) leaves what was there. The paths are checked before matplotlib and
training.metrics (which imports torch) are imported, so a mistyped run directory is answered at once.
"""

import os
import sys
from pathlib import Path

from architecture.config import file_problem
from data.cli import ArgumentParser


def loss_range(train: list[dict], evals: list[dict]) -> tuple[float, float, int]:
    """(bottom, top, points above the top) of the loss axis: the top is the highest loss after the first tenth of
    the iterations, so the early drop from ~11 does not flatten the rest of the curve."""
    points = [(r["iter"], r["loss"]) for r in train]
    points += [(r["iter"], r[key]) for r in evals for key in ("train_loss", "val_loss")]
    cutoff = max(i for i, _ in points) / 10
    later = [loss for i, loss in points if i > cutoff] or [loss for _, loss in points]
    low, high = min(loss for _, loss in points), max(later)
    margin = 0.05 * (high - low) or 0.1
    return low - margin, high + margin, sum(loss > high + margin for _, loss in points)


def clipped_note(clipped: int) -> str:
    """The title's note on the points above the loss axis: none, one, or several."""
    if clipped == 1:
        return " (the first point is above the axis)"
    return f" (the first {clipped} points are above the axis)" if clipped else ""


def plot(run_dir: Path, out: Path) -> None:
    metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    problem = file_problem(metrics, "metrics file")
    if problem:  # a device (/dev/null) or a path under a file is named as what it is, not as missing
        missing = problem.startswith("metrics file not found")
        hint = "pass a run's out_dir (train.py writes metrics.jsonl there)"
        raise FileNotFoundError(f"{metrics} not found: {hint}" if missing else f"{problem}; {hint}")
    from training.metrics import read_metrics

    rows = read_metrics(metrics)
    train, evals = [r for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"]
    if not train and not evals:
        raise ValueError(f"{metrics} holds no metrics yet")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt  # after matplotlib.use: pyplot picks its backend when imported

    bpb = [r for r in evals if "val_bpb" in r]  # metrics written before bits per byte was measured have none
    layout = dict(figsize=(9, 8), nrows=2, sharex=True, height_ratios=(2, 1)) if bpb else dict(figsize=(9, 5))
    fig, axes = plt.subplots(**layout, layout="constrained", squeeze=False)  # constrained: room for the legend
    loss_axis = axes[0, 0]
    loss_axis.plot([r["iter"] for r in train], [r["loss"] for r in train], alpha=0.4, label="train loss (batch)")
    loss_axis.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train loss (eval)")
    loss_axis.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    low, high, clipped = loss_range(train, evals)
    loss_axis.set_ylim(low, high)
    loss_axis.set_ylabel("cross-entropy loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["iter"] for r in train], [r["lr"] for r in train], "k--", alpha=0.5, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    if bpb:
        bpb_axis = axes[1, 0]
        for split, color in (("train", "C1"), ("val", "C2")):  # the colours of the losses above
            values = [r[f"{split}_bpb"] for r in bpb]
            bpb_axis.plot([r["iter"] for r in bpb], values, "o:", color=color, label=f"{split} bits per byte")
        bpb_axis.set_ylabel("bits per byte")
        handles += bpb_axis.get_legend_handles_labels()[0]
    axes[-1, 0].set_xlabel("iteration (optimizer update)")
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=min(len(handles), 4))
    loss_axis.set_title(str(run_dir) + clipped_note(clipped))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format=out.suffix[1:])
        os.replace(tmp, out)
    except OSError as e:  # a full disk, a read-only directory
        kept = f"{out} was left as it was" if out.exists() else "nothing was written"
        raise ValueError(f"cannot write {out} ({e.strerror or e}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}")


def output_path(run: Path, out: Path | None, force: bool) -> Path:
    """The file to write: RUN/loss.png by default, DIR/loss.png for a directory; refuse to replace a file this
    script did not write (without --force) and a name without an image type."""
    try:
        out = out or (run if run.is_dir() else run.parent)
        if out.is_dir():
            out = out / "loss.png"
        if not out.suffix:
            raise ValueError(f"--out {out} names no image type: give a file such as {out}.png, or a directory")
        if not out.parent.is_dir():
            what = "is not a directory" if out.parent.exists() else "does not exist"
            raise ValueError(f"--out {out}: {out.parent} {what}")
        if out.exists() and not out.is_file():  # a device or a fifo: even --force must not put a file in its place
            raise ValueError(f"{file_problem(out, '--out')}; name a file to write")
        if out.exists() and not force and b"matplotlib" not in out.read_bytes()[:4096].lower():
            raise ValueError(f"{out} exists and is not a plot this script wrote; pass --force to replace it")
    except OSError as e:  # a name too long, a file that cannot be read
        raise ValueError(f"cannot check {e.filename} ({e.strerror or e}); nothing was written") from None
    return out


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run's out_dir, or its metrics.jsonl")
    parser.add_argument(
        "--out",
        type=Path,
        help="image to write (PNG, or the type its suffix names), or a directory for DIR/loss.png (default: "
        "RUN/loss.png); a file matplotlib did not write is replaced only with --force",
    )
    parser.add_argument("--force", action="store_true", help="replace --out whatever it holds")
    args = parser.parse_args()
    try:
        plot(args.run, output_path(args.run, args.out, args.force))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # reading metrics.jsonl: no permission, a name too long, a path through a file
        print(f"error: cannot read {e.filename} ({e.strerror or e}); nothing was written", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
