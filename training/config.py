"""Training configuration: the `TrainingConfig` dataclass, its JSON file and `--key=value` overrides.

Design choices:
- An *iteration* is one optimizer update of batch_size x block_size x gradient_accumulation_steps tokens (the
  global batch, whatever the number of processes). max_iters, warmup_steps, eval_interval, log_interval count
  iterations, never micro-batches, so a run's budget in tokens is max_iters x tokens_per_iter whatever the
  accumulation.
- Each setting is described once, beside its default (`setting`), and `train.py --help` prints that line.
- The JSON file is loaded with the same strict loader as the model config (unknown keys suggest the closest one,
  types checked). Command-line overrides are parsed by the field's declared type; nothing is `eval`-ed.
- Imports without torch, so that train.py refuses a bad argument or config file at once rather than after torch's
  import (seconds, tens of them on a busy CPU); the one check that needs torch, the optimizer's name, comes last.
"""

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from architecture.config import (
    ATTENTION_BACKENDS,
    REPO_ROOT,
    TYPE_NAMES,
    CheckedConfig,
    ConfigError,
    Origin,
    load_dataclass,
    read_json,
)
from data.cli import MAX_WORKERS
from data.errors import DataError
from data.meta import BATCH_ROWS
from data.prepare import check_dataset_name

DEFAULT_TRAINING_CONFIG = REPO_ROOT / "config" / "training_config.json"


def is_device_name(name: str) -> bool:
    """Whether `name` is one of the device names this project takes: auto, cuda, cuda:N, mps, cpu (whether it
    exists on this machine is training/device.py's `select_device`, with torch)."""
    return name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and name[5:].isdigit())


def setting(default: Any, description: str) -> Any:
    """A `TrainingConfig` field: its default and the one line that `train.py --help` prints for it."""
    if isinstance(default, list):  # each config gets its own list
        return field(default_factory=lambda: list(default), metadata={"description": description})
    return field(default=default, metadata={"description": description})


@dataclass
class TrainingConfig(CheckedConfig):
    model_config: str = setting("config/model_config.json", "model JSON, relative to the repository root")
    dataset: str = setting("tinystories", "data/<dataset>/, prepared on first use if it is a known source")
    out_dir: str = setting("checkpoints/tinystories", "latest.pt, best.pt, metrics.jsonl, config.json go here")
    init_from: str = setting("scratch", "scratch, resume (out_dir/latest.pt), or a Hugging Face Gemma 3 dir or id")

    batch_size: int = setting(32, "sequences per micro-batch, per process")
    block_size: int = setting(128, "tokens per sequence")
    gradient_accumulation_steps: int = setting(32, "micro-batches per iteration, across all processes")
    max_iters: int = setting(4690, "iterations (optimizer updates)")
    batch_rows: str = setting(
        "random",
        "random (a window anywhere), bos (<bos> + a window), doc (from a <bos>), conversation (chat data, one a row)",
    )

    learning_rate: float = setting(1e-4, "peak, reached at the end of warmup (with muon: the AdamW groups' peak)")
    min_lr: float = setting(1e-5, "floor of the decay, held after max_iters (muon's: x muon_lr / learning_rate)")
    warmup_steps: int = setting(100, "iterations of linear warmup from 0")
    lr_schedule: str = setting("wsd", "wsd (warmup, stable, decay at the end) or cosine (decays from warmup on)")
    decay_fraction: float = setting(0.2, "wsd: the last fraction of max_iters, decaying to min_lr")
    decay_shape: str = setting("linear", "wsd: the decay's shape, linear or 1-sqrt (Hagele et al. 2024)")
    optimizer: str = setting("muon", "a name in training/optimizer.py's OPTIMIZERS: muon, or adamw")
    muon_lr: float = setting(0.02, "muon: the hidden matrices' peak lr (Keller Jordan's default)")
    muon_weight_decay: float = setting(0.01, "muon: decoupled decay of the hidden matrices, applied as lr x decay")
    weight_decay: float = setting(0.1, "AdamW's decoupled decay, on the weight matrices only")
    betas: list[float] = setting([0.9, 0.95], "AdamW's two moment decays")
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")

    eval_interval: int = setting(250, "iterations between evaluations (and `latest` checkpoints)")
    eval_iters: int = setting(50, "batches averaged per split in each evaluation")
    log_interval: int = setting(10, "iterations between log lines")

    overwrite: bool = setting(False, "start a new run in an out_dir that holds one, removing its checkpoints")
    allow_batch_change: bool = setting(False, "resume with another batch_size / block_size / accumulation (not exact)")
    allow_recipe_change: bool = setting(False, "resume with another learning rate, seed, dtype, ... (not exact)")

    seed: int = setting(1337, "seeds the model's initialisation and the batches drawn")
    device: str = setting("cuda", "auto (CUDA, then MPS, then the CPU), cuda, cuda:N, mps or cpu")
    threads: int = setting(0, "CPU threads torch computes with; 0: torch's choice, which honours OMP_NUM_THREADS")
    dtype: str = setting("bfloat16", "bf16 autocast (float32 master weights) where the hardware has bf16, else float32")
    compile: bool = setting(False, "torch.compile the model")
    activation_checkpointing: bool = setting(False, "recompute each block in the backward: long blocks, less memory")
    attention_backend: str = setting("auto", "sliding layers past the window: auto, sdpa or flex (attention.py)")

    wandb_log: bool = setting(False, "log to Weights & Biases")
    wandb_project: str = setting("gemma3-from-scratch", "the W&B project")
    wandb_run_name: str = setting("", "the W&B run's name; empty: wandb picks one")

    def validate(self) -> None:
        self._require_positive(
            "batch_size",
            "block_size",
            "gradient_accumulation_steps",
            "max_iters",
            "learning_rate",
            "muon_lr",
            "eval_interval",
            "eval_iters",
            "log_interval",
        )
        self._require_positive(
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "muon_weight_decay",
            "grad_clip",
            "seed",
            "threads",
            allow_zero=True,
        )
        if self.threads > MAX_WORKERS:
            self._fail(
                "threads", message=f"'threads' must be at most {MAX_WORKERS} (4 x the CPU count), got {self.threads}"
            )
        if self.overwrite and self.init_from == "resume":
            self._fail(
                "overwrite", "init_from", message="'overwrite' and 'init_from' resume contradict each other: choose one"
            )
        if self.min_lr > self.learning_rate:
            self._fail(
                "min_lr",
                "learning_rate",
                message=(
                    f"'min_lr' ({self.min_lr}) is above 'learning_rate' ({self.learning_rate}): the cosine "
                    "decay would climb; set min_lr to at most learning_rate (often learning_rate / 10)"
                ),
            )
        if self.warmup_steps > self.max_iters:
            self._fail(
                "warmup_steps",
                "max_iters",
                message=f"'warmup_steps' ({self.warmup_steps}) exceeds 'max_iters' ({self.max_iters})",
            )
        self._check_wsd()
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            self._fail("betas", message=f"'betas' must be two numbers in [0, 1), got {self.betas}")
        if self.batch_rows not in BATCH_ROWS:
            self._fail("batch_rows", message=f"'batch_rows' is '{self.batch_rows}'; use one of {', '.join(BATCH_ROWS)}")
        if self.dtype not in ("float32", "bfloat16"):
            self._fail("dtype", message=f"'dtype' is '{self.dtype}'; use bfloat16 (CUDA autocast) or float32")
        if not is_device_name(self.device):
            self._fail("device", message=f"'device' is '{self.device}'; use auto, cuda, cuda:N, mps or cpu")
        if self.attention_backend not in ATTENTION_BACKENDS:
            self._fail(
                "attention_backend",
                message=f"'attention_backend' is '{self.attention_backend}'; use one of "
                f"{', '.join(ATTENTION_BACKENDS)}",
            )
        try:
            check_dataset_name(self.dataset)
        except DataError as e:
            self._fail("dataset", message=f"'dataset': {e}")
        from .optimizer import OPTIMIZERS  # needs torch: last, so that every other mistake is answered before it loads

        if self.optimizer not in OPTIMIZERS:
            self._fail("optimizer", message=f"'optimizer' is '{self.optimizer}'; use one of {', '.join(OPTIMIZERS)}")

    def _check_wsd(self) -> None:
        if self.lr_schedule not in ("cosine", "wsd"):
            self._fail("lr_schedule", message=f"'lr_schedule' is '{self.lr_schedule}'; use cosine or wsd")
        if not 0.0 < self.decay_fraction <= 1.0:
            self._fail("decay_fraction", message=f"'decay_fraction' must be in (0, 1], got {self.decay_fraction}")
        if self.decay_shape not in ("linear", "1-sqrt"):
            self._fail("decay_shape", message=f"'decay_shape' is '{self.decay_shape}'; use linear or 1-sqrt")
        if self.lr_schedule == "wsd" and self.warmup_steps > self.decay_start:
            self._fail(
                "warmup_steps",
                "decay_fraction",
                "max_iters",
                "lr_schedule",
                message=(
                    f"'warmup_steps' ({self.warmup_steps}) runs past the wsd decay's start (iteration "
                    f"{self.decay_start}, the last {self.decay_fraction} of max_iters {self.max_iters}); lower "
                    "warmup_steps or decay_fraction, or raise max_iters"
                ),
            )

    @property
    def tokens_per_iter(self) -> int:
        return self.batch_size * self.block_size * self.gradient_accumulation_steps

    @property
    def decay_start(self) -> int:
        return decay_start(self.max_iters, self.decay_fraction)


def decay_start(max_iters: int, decay_fraction: float) -> int:
    """The first iteration of wsd's decay, which takes the last `decay_fraction` of `max_iters`: before it the
    learning rate holds at its peak."""
    return max_iters - round(decay_fraction * max_iters)


def _parse_value(key: str, text: str, annotation: Any) -> Any:
    """Turn the text of `--key=text` into the field's type (JSON syntax for lists)."""
    try:
        if annotation is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation == list[float]:
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError
            return [float(v) for v in values]
        return text
    except (ValueError, TypeError, RecursionError):  # RecursionError: a list nested thousands deep
        kind = "a JSON list like [0.9,0.95]" if annotation == list[float] else TYPE_NAMES[annotation]
        raise ConfigError(f"--{key}={text}: expected {kind}") from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--max_iters=100", "--compile=true"]` -> {"max_iters": 100, "compile": True}, typed by TrainingConfig."""
    hints = {f.name: f.type for f in dataclasses.fields(TrainingConfig)}
    overrides, flags = {}, {}  # flags: the argument that set each key
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument '{arg}': overrides are written --key=value")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            raise ConfigError(f"--{key}: unknown setting" + (f"; did you mean --{close[0]}?" if close else ""))
        if key in flags:  # refused as a duplicate JSON key is: one of the two values would be silently lost
            raise ConfigError(f"{flags[key]} and {arg} both set '{key}'; keep one")
        overrides[key], flags[key] = _parse_value(key, text, hints[key]), arg
    return overrides


def load_training_config(path: str | Path = DEFAULT_TRAINING_CONFIG, overrides: list[str] = ()) -> TrainingConfig:
    """Read the JSON file at `path` and apply `--key=value` overrides on top."""
    values, given = read_json(path), parse_overrides(list(overrides))
    if isinstance(values, dict):
        values.update(given)
    return load_dataclass(TrainingConfig, values, Origin(str(path), frozenset(given)))


def settings_help(path: str | Path) -> str:
    """Every setting as `--key=value  description`, with the value the config file at `path` gives it (the default
    where the file is silent): what `train.py --help` prints. The file is read, not checked, so that help comes
    whatever it holds; one line says so when it cannot be read."""
    try:
        values = read_json(path)
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, got {type(values).__name__}")
        header = f"settings, with the values {path} gives them (the defaults where it is silent):"
    except ConfigError as e:
        values, header = {}, f"settings, with their defaults: the config file cannot be read ({e}):"
    fields = dataclasses.fields(TrainingConfig)
    flags = [f"--{f.name}={_flag_text(values.get(f.name, _default(f)))}" for f in fields]
    width = min(max(map(len, flags)), 40)
    lines = [f"  {flag:<{width}}  {f.metadata['description']}" for flag, f in zip(flags, fields, strict=True)]
    return "\n".join(
        [header, *lines, "change any with --key=value (lists in JSON, without spaces: --betas=[0.9,0.99])"]
    )


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _flag_text(value: Any) -> str:
    """A value as `--key=value` takes it: strings as they are, the rest in JSON (true, 1e-05, [0.9,0.95])."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
