"""What a user sees of a run: start-up lines, a line per `log_interval`, evaluations, a progress bar, a summary.

Design choices:
- Rank 0 logs; every other rank gets a `NullLogger` with the same methods doing nothing, so the loop never asks
  which rank it is on before logging.
- Every figure goes to `out_dir/metrics.jsonl` (`training/metrics.py`), and to wandb when enabled; the console gets
  lines a person reads. The whole configuration goes to metrics.jsonl (and the checkpoint); the console shows only
  what differs from the defaults.
- The progress bar is drawn only on a terminal: redirected to a file, the log is plain lines, no bar frames.
- An iteration's time is measured from the end of the previous one, or from the end of the evaluation and
  checkpointing before it, so neither counts in tokens/s. The first iteration of a compiled run includes
  compilation; its time is logged as such.
- On CUDA each logged iteration also reports the peak memory the process's tensors have held (`peak_memory_gib`).
- Evaluations give each loss in nats per token and in bits per byte (bpb: nats / (ln 2 x the UTF-8 bytes of the
  targets' text)), which does not depend on the tokenizer: a GPT-2-vocabulary and a Gemma-vocabulary model trained
  on the same text compare by it.
- The summary at the end says where the run got (best val loss and where, the checkpoints on disk, time) and the
  commands to run next.
"""

import time

import torch
from tqdm import tqdm

from architecture import ModelConfig
from data.errors import UserError

from .config import TrainingConfig
from .metrics import MetricsLog, flops_per_token, peak_flops
from .optimizer import describe_optimizer
from .schedule import describe_schedule


def config_differences(values: dict, defaults: dict) -> str:
    """`key=value` for every setting that differs from its default, comma-separated; a list's runs of equal items
    are counted (layer_types=[5 x sliding_attention, full_attention]) so that the line stays readable."""
    changed = [f"{key}={compact(value)}" for key, value in values.items() if defaults.get(key) != value]
    return ", ".join(changed) or "none"


def compact(value) -> str:
    if not isinstance(value, list):
        return str(value)
    runs = [[value[0], 1]] if value else []
    for item in value[1:]:
        if item == runs[-1][0]:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return "[" + ", ".join(f"{n} x {item}" if n > 1 else str(item) for item, n in runs) + "]"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


class WandbError(UserError, RuntimeError):
    """wandb_log is on and wandb cannot start a run; the message says how to log in or turn it off."""


def start_wandb(run):
    """The run's wandb run, started before anything is logged. wandb missing, not logged in or unable to reach its
    server is one line (a UserError), raised inside `_train`'s try so that the out_dir's lock is released."""
    fix = "or pass --wandb_log=false"
    try:
        import wandb  # only where enabled: it is slow to import
    except ImportError:
        raise WandbError(f"wandb_log is true but wandb is not installed: pip install wandb, {fix}") from None
    try:
        return wandb.init(
            project=run.config.wandb_project,
            name=run.config.wandb_run_name or None,
            dir=str(run.out_dir),
            config={"model": run.model.config.to_dict(), "training": run.config.to_dict()},
        )
    except Exception as e:  # wandb's UsageError (no API key), CommError (no network), a bad WANDB_* variable...
        # pydantic's text for a bad setting takes three lines (what, which, why): one line keeps them all.
        reason = "; ".join(line.strip() for line in str(e).strip().splitlines()[:3]) or type(e).__name__
        raise WandbError(
            f"wandb cannot start a run ({reason}): run `wandb login`, set WANDB_MODE=offline, {fix}"
        ) from None


class NullLogger:
    """The logger of ranks other than 0: every call does nothing."""

    def start(self, run) -> None: ...
    def iteration(self, run, loss: float, lr: float, grad_norm: torch.Tensor) -> None: ...
    def evaluation(self, run, losses: dict, lr: float, improved: bool) -> None: ...
    def summary(self, run, stopped: bool) -> None: ...
    def close(self) -> None: ...


class RunLogger(NullLogger):
    """Console, progress bar, metrics.jsonl and wandb for rank 0."""

    def __init__(self, run) -> None:
        config: TrainingConfig = run.config
        self.out_dir, self.config = run.out_dir, config
        self.wandb_run = start_wandb(run) if config.wandb_log else None  # first: a failure leaves metrics as they were
        self.metrics = MetricsLog(run.out_dir, run.iter_num if config.init_from == "resume" else None, self.wandb_run)
        tokens_per_process = config.tokens_per_iter / run.world.world_size
        self.flops_per_iter = flops_per_token(run.model, config.block_size) * tokens_per_process
        self.peak = peak_flops(run.device)
        self.start_iter = run.iter_num
        self.started = self.last = time.perf_counter()
        self.progress = tqdm(
            total=config.max_iters,
            initial=run.iter_num,
            unit="it",
            dynamic_ncols=True,
            disable=None,  # terminal only
        )

    def write(self, message: str) -> None:
        tqdm.write(message)  # above the progress bar, when there is one

    def start(self, run) -> None:
        model_config = run.model.config
        self.metrics.log("config", run.iter_num, model=model_config.to_dict(), training=self.config.to_dict())
        changed = config_differences(self.config.to_dict(), TrainingConfig().to_dict())
        self.write(
            f"training config {self.config.origin.source}, differences from the defaults (all of it in "
            f"{self.out_dir / 'metrics.jsonl'}): {changed}"
        )
        self.write(f"model: {config_differences(model_config.to_dict(), ModelConfig().to_dict())}")
        n_params = sum(p.numel() for p in run.model.parameters())
        shape = f"{self.config.batch_size} x {self.config.block_size} x {self.config.gradient_accumulation_steps}"
        device = str(run.device)
        if run.device.type == "cpu":  # on a shared CPU, fewer threads than cores can run several times faster
            threads = torch.get_num_threads()
            device += f" ({threads} thread{'s' * (threads > 1)}; --threads=N or OMP_NUM_THREADS to change)"
        self.write(
            f"{n_params / 1e6:.1f}M parameters, tokenizer {run.tokenizer}, device {device}; "
            f"{self.config.tokens_per_iter:,} tokens per iteration ({shape} micro-batches)"
        )
        self.write(f"optimizer: {describe_optimizer(run.optimizer)}; lr schedule {describe_schedule(self.config)}")
        if run.precision_note:
            self.write(run.precision_note)
        if run.iter_num:
            self.write(f"resumed from {self.out_dir / 'latest.pt'} at iteration {run.iter_num}")
        if self.metrics.cut_torn_line:
            self.write(f"note: {self.metrics.path} ended in a torn line (a crash or a full disk); it was cut off")
        if self.config.compile:
            self.write("torch.compile: the first iteration compiles the model (a minute or more)")

    def iteration(self, run, loss: float, lr: float, grad_norm: torch.Tensor) -> None:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.progress.update(1)
        first = run.iter_num == self.start_iter + 1
        if first and self.config.compile:
            self.write(f"torch.compile: first iteration took {dt:.1f} s, compilation included")
            self.metrics.log("compile", run.iter_num, first_iter_s=dt)
        if run.iter_num % self.config.log_interval and not first:
            return
        tokens_per_sec = self.config.tokens_per_iter / dt
        row = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_sec": tokens_per_sec,
            "ms_per_iter": dt * 1e3,
        }
        extra = ""
        if self.peak:
            row["mfu"] = self.flops_per_iter / dt / self.peak
            extra += f", MFU {row['mfu']:.1%}"
        if run.device.type == "cuda":  # the most this process's tensors have held, since the start
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
            extra += f", {row['peak_memory_gib']:.1f} GiB peak"
        self.metrics.log("train", run.iter_num, **row)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        self.write(
            f"iter {run.iter_num}: loss {loss:.4f}, lr {lr:.2e}, grad norm {row['grad_norm']:.3g}, "
            f"{tokens_per_sec:,.0f} tok/s, {dt * 1e3:.0f} ms{extra}"
        )

    def evaluation(self, run, losses: dict, lr: float, improved: bool) -> None:
        self.metrics.log(
            "eval",
            run.iter_num,
            train_loss=losses["train"],
            val_loss=losses["val"],
            train_bpb=losses["train_bpb"],
            val_bpb=losses["val_bpb"],
            lr=lr,
        )
        self.write(
            f"eval {run.iter_num}: train loss {losses['train']:.4f} ({losses['train_bpb']:.4f} bpb), "
            f"val loss {losses['val']:.4f} ({losses['val_bpb']:.4f} bpb)" + (" (best)" if improved else "")
        )
        self.last = time.perf_counter()  # the next iteration's time excludes evaluation and checkpointing

    def summary(self, run, stopped: bool) -> None:
        self.progress.close()
        done = run.iter_num - self.start_iter
        lines = [
            f"{'stopped' if stopped else 'finished'} at iteration {run.iter_num} of {self.config.max_iters} "
            f"({done} in this process, {duration(time.perf_counter() - self.started)})"
        ]
        if run.best_iter is not None:
            bpb = f" ({run.best_val_bpb:.4f} bpb)" if run.best_val_bpb is not None else ""
            lines.append(
                f"best val loss {run.best_val_loss:.4f}{bpb} at iteration {run.best_iter}: {self.out_dir / 'best.pt'}"
            )
        if (self.out_dir / "latest.pt").is_file():
            lines.append(f"latest: {self.out_dir / 'latest.pt'} (iteration {run.iter_num})")
        if stopped:
            lines.append("continue with --init_from=resume (and the same other settings)")
        lines += [
            "next:",
            f"  python sample.py --ckpt {self.out_dir}{' --chat' if run.config.batch_rows == 'conversation' else ''}",
            f"  python scripts/plot_loss.py {self.out_dir}",
            f"  python scripts/export_hf.py --ckpt {self.out_dir} --out exported/{self.out_dir.name}",
        ]
        self.write("\n".join(lines))

    def close(self) -> None:
        self.progress.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def make_logger(run) -> NullLogger:
    """A RunLogger on rank 0, a NullLogger elsewhere."""
    return RunLogger(run) if run.world.is_master else NullLogger()
