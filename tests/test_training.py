"""Training: config rules and overrides, LR schedule, checkpoints, exact resume after Ctrl-C, DDP on gloo,
torch.compile, divergence, and the demo's falling loss. Runs are real `train.py` processes on the offline pydocs
corpus."""

import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from architecture.config import ConfigError
from data.tokenizer import gpt2
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import DEFAULT_TRAINING_CONFIG, TrainingConfig, load_training_config, parse_overrides
from training.schedule import describe_schedule, learning_rate
from training.trainer import check_resume

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = {
    "vocab_size": 50257,
    "context_length": 128,
    "emb_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "hidden_dim": 64,
    "head_dim": 16,
    "n_kv_groups": 1,
    "query_pre_attn_scalar": 16,
    "sliding_window": 16,
    "tie_embeddings": True,
    "layer_types": ["sliding_attention", "full_attention"],
    "dtype": "float32",
}


def run_config(tmp_path: Path, **overrides) -> Path:
    """A training config for a tiny model on pydocs, block_size past the window, writing into tmp_path."""
    model_file = tmp_path / "tiny_model.json"
    model_file.write_text(json.dumps(TINY_MODEL))
    values = {
        "model_config": str(model_file),
        "dataset": "pydocs",
        "out_dir": str(tmp_path / "run"),
        "batch_size": 4,
        "block_size": 32,
        "gradient_accumulation_steps": 4,
        "max_iters": 12,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_interval": 6,
        "eval_iters": 2,
        "log_interval": 1,
        "device": "cpu",
        "dtype": "float32",
        "optimizer": "adamw",  # the tests' reference recipe; Muon and wsd are parametrized where they matter
        "lr_schedule": "cosine",
        **overrides,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(values))
    return path


def train_process(config: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", str(config), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def wait_for_iteration(metrics: Path, iteration: int, process: subprocess.Popen) -> None:
    """Wait until a running train.py has logged `iteration` to its metrics.jsonl."""
    deadline = time.time() + 120
    while not (metrics.exists() and f'"iter": {iteration},' in metrics.read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.05)


def run_train(config: Path, *args: str) -> str:
    process = train_process(config, *args)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["iter"]: row["loss"] for row in rows if row["kind"] == "train"}


# --- configuration and schedule -------------------------------------------------------------------------------


def test_shipped_config_is_the_seed_run_counted_in_updates():
    config = load_training_config(DEFAULT_TRAINING_CONFIG)
    assert (config.batch_size, config.block_size, config.gradient_accumulation_steps) == (32, 128, 32)
    assert (config.learning_rate, config.min_lr, config.max_iters) == (1e-4, 1e-5, 4690)
    # 150,000 micro-batches of 32 x 128 tokens, as the seed ran them, are ~4,690 updates of 131,072 tokens.
    assert config.tokens_per_iter == 131_072
    assert config.warmup_steps < config.eval_interval < config.max_iters
    load_training_config(REPO / "config" / "demo.json")


def test_shipped_json_is_complete_and_equals_the_dataclass_defaults():
    # Every key, as users edit it; the same values, so a changed default cannot silently disagree with the file.
    assert json.loads(DEFAULT_TRAINING_CONFIG.read_text()) == TrainingConfig().to_dict()


def test_schedule_corners():
    config = TrainingConfig(lr_schedule="cosine", learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_iters=110)
    assert learning_rate(0, config) == 0.0
    assert learning_rate(5, config) == pytest.approx(5e-4)
    assert learning_rate(10, config) == pytest.approx(1e-3)
    assert learning_rate(60, config) == pytest.approx((1e-3 + 1e-4) / 2)
    assert learning_rate(110, config) == pytest.approx(1e-4)
    assert learning_rate(500, config) == pytest.approx(1e-4)
    decay = [learning_rate(i, config) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_cosine_is_unchanged_bit_for_bit_and_each_group_follows_its_own_peak():
    config = TrainingConfig(lr_schedule="cosine", learning_rate=3e-3, min_lr=3e-4, warmup_steps=7, max_iters=50)
    for i in range(60):  # the formula of the version before per-group peaks
        progress = (i - 7) / (50 - 7)
        before = 3e-3 * i / 7 if i < 7 else 3e-4 if i >= 50 else 3e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * 27e-4
        assert learning_rate(i, config) == learning_rate(i, config, 3e-3) == before
        assert learning_rate(i, config, 0.03) == pytest.approx(10 * before)  # min_lr scaled by the same ratio


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_the_peak_then_decays_to_min_lr(shape):
    config = TrainingConfig(
        lr_schedule="wsd", decay_shape=shape, learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_iters=110
    )
    assert config.decay_start == 88  # the last 0.2 of max_iters (22 iterations) decays
    assert learning_rate(0, config) == 0.0 and learning_rate(5, config) == pytest.approx(5e-4)
    assert all(learning_rate(i, config) == 1e-3 for i in range(10, 89))  # the stable phase, and the decay's start
    remaining = {"linear": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert learning_rate(99, config) == pytest.approx(1e-4 + remaining * 9e-4)
    assert learning_rate(110, config) == learning_rate(500, config) == pytest.approx(1e-4)
    decay = [learning_rate(i, config) for i in range(88, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert learning_rate(99, config, 0.02) == pytest.approx(20 * learning_rate(99, config))  # a Muon group


def test_the_log_describes_the_schedule():
    wsd = TrainingConfig(lr_schedule="wsd", decay_shape="1-sqrt", warmup_steps=1, max_iters=110)
    assert describe_schedule(wsd) == (
        "wsd: warmup 1 iteration, the peak held to iteration 88, then a 1-sqrt decay to min_lr at 110"
    )
    cosine = TrainingConfig(lr_schedule="cosine", warmup_steps=10, max_iters=110)
    assert describe_schedule(cosine) == "cosine: warmup 10 iterations, then a cosine decay to min_lr at 110"


def test_schedule_and_muon_settings_are_checked(tmp_path):
    cases = [
        (dict(lr_schedule="step"), "'lr_schedule' is 'step'; use cosine or wsd"),
        (dict(decay_fraction=0.0), "'decay_fraction' must be in (0, 1], got 0.0"),
        (dict(decay_fraction=1.5), "'decay_fraction' must be in (0, 1], got 1.5"),
        (dict(decay_shape="cosine"), "'decay_shape' is 'cosine'; use linear or 1-sqrt"),
        (
            dict(lr_schedule="wsd", warmup_steps=100, max_iters=110),
            "'warmup_steps' (100) runs past the wsd decay's start (iteration 88, the last 0.2 of max_iters 110)",
        ),
        (dict(muon_lr=0.0), "'muon_lr' must be positive, got 0.0"),
        (dict(muon_weight_decay=-0.1), "'muon_weight_decay' must not be negative, got -0.1"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError) as refusal:
            TrainingConfig(**values)
        assert message in str(refusal.value)
    TrainingConfig(lr_schedule="cosine", warmup_steps=100, max_iters=110)  # cosine has no stable phase to run past
    with pytest.raises(ConfigError, match=r"--decay_shape=sqrt \(command line\): 'decay_shape' is 'sqrt'"):
        load_training_config(run_config(tmp_path), ["--decay_shape=sqrt"])


def test_min_lr_above_learning_rate_is_rejected():
    with pytest.raises(ConfigError, match=r"'min_lr' \(0.0005\) is above 'learning_rate' \(0.0001\)"):
        TrainingConfig(learning_rate=1e-4, min_lr=5e-4)


def test_overrides_are_typed_and_checked(tmp_path):
    assert parse_overrides(["--max_iters=7", "--compile=true", "--betas=[0.9,0.99]", "--device=cpu"]) == {
        "max_iters": 7,
        "compile": True,
        "betas": [0.9, 0.99],
        "device": "cpu",
    }
    config = load_training_config(run_config(tmp_path), ["--learning_rate=0.01", "--min_lr=1e-3"])
    assert config.learning_rate == 0.01 and config.min_lr == 1e-3
    with pytest.raises(ConfigError, match=r"--max_iters=ten: expected an integer"):
        parse_overrides(["--max_iters=ten"])
    with pytest.raises(ConfigError, match=r"--compile=maybe: expected true or false"):
        parse_overrides(["--compile=maybe"])
    with pytest.raises(ConfigError, match=r"--max_iter: unknown setting; did you mean --max_iters\?"):
        parse_overrides(["--max_iter=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'; did you mean 'learning_rate'\?"):
        load_training_config(run_config(tmp_path, learning_rat=1.0))
    with pytest.raises(ConfigError, match=r"'attention_backend' is 'dense'; use one of auto, sdpa, flex"):
        load_training_config(run_config(tmp_path), ["--attention_backend=dense"])


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(run_config(tmp_path)), "--device=cuda"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert result.returncode == 2
    assert "CUDA is not available" in result.stderr and "config/demo.json" in result.stderr
    assert "Traceback" not in result.stderr


def train_without_torch(*args: str) -> subprocess.CompletedProcess:
    """train.py with torch made unimportable: an answer without a traceback is one given before torch loads."""
    code = "import runpy, sys; sys.modules['torch'] = None; runpy.run_path('train.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_bad_arguments_and_config_values_are_refused_before_torch_loads(tmp_path):
    cases = {
        ("--config", "nope.json"): "config file not found: nope.json",
        ("--max_iters=abc",): "--max_iters=abc: expected an integer",
        ("--max_iter=3",): "--max_iter: unknown setting; did you mean --max_iters?",
        ("--threads=-1",): "--threads=-1 (command line): 'threads' must not be negative",
        ("--config", str(run_config(tmp_path, min_lr=1.0))): "'min_lr' (1.0) is above 'learning_rate' (0.003)",
    }
    for args, message in cases.items():
        result = train_without_torch(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result


def test_help_describes_every_setting_with_the_config_files_values():
    result = train_without_torch("--config", "config/demo.json", "--help")
    assert result.returncode == 0, result.stderr
    assert "settings, with the values config/demo.json gives them" in result.stdout
    lines = {line.split("=")[0].strip(): line for line in result.stdout.splitlines() if line.startswith("  --")}
    for setting in dataclasses.fields(TrainingConfig):
        assert lines[f"--{setting.name}"].endswith(setting.metadata["description"])
    demo = json.loads((REPO / "config" / "demo.json").read_text())
    assert lines["--max_iters"].startswith(f"  --max_iters={demo['max_iters']} ")
    assert lines["--threads"].startswith("  --threads=0 ")  # demo.json is silent: the default

    unreadable = train_without_torch("--config", "nope.json", "--help")
    assert unreadable.returncode == 0, unreadable.stderr
    assert "the config file cannot be read (config file not found: nope.json)" in unreadable.stdout
    assert "  --max_iters=4690 " in unreadable.stdout


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_checkpoint_writes_are_atomic_and_reads_are_safe(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_config": {}, "iter_num": 1}, path)
    good = path.read_bytes()
    # A write that fails half-way (here: an object torch.save cannot pickle) leaves the old file as it was.
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint({"model": {"w": torch.ones(3)}, "model_config": {}, "bad": lambda: 0}, path)
    assert path.read_bytes() == good and not path.with_name("latest.pt.tmp").exists()
    assert load_checkpoint(path)["iter_num"] == 1

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is not a readable checkpoint"):
        load_checkpoint(truncated)
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")


# --- real runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """12 iterations without a stop, by optimizer, each run on first use: the references for resume and DDP."""
    runs = {}

    def straight(optimizer: str) -> tuple[Path, str]:
        if optimizer not in runs:
            tmp_path = tmp_path_factory.mktemp(f"straight-{optimizer}")
            runs[optimizer] = tmp_path / "run", run_train(run_config(tmp_path, optimizer=optimizer))
        return runs[optimizer]

    return straight


@pytest.fixture(scope="module")
def straight_run(straight_runs):
    return straight_runs("adamw")


def test_run_logs_evaluates_and_checkpoints(straight_run):
    run_dir, output = straight_run
    assert "iter 12: loss" in output and "tok/s" in output and "eval 12: train loss" in output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "eval"] == [6, 12]
    assert all({"loss", "lr", "tokens_per_sec", "ms_per_iter"} <= r.keys() for r in rows if r["kind"] == "train")
    checkpoint = load_checkpoint(run_dir / "latest.pt")  # weights_only=True inside
    assert checkpoint["iter_num"] == 12 and checkpoint["tokenizer"] == gpt2().record()
    assert checkpoint["model_config"]["emb_dim"] == 32 and checkpoint["training_config"]["max_iters"] == 12
    assert load_checkpoint(run_dir / "best.pt")["best_val_loss"] == checkpoint["best_val_loss"]


def test_evaluations_report_bits_per_byte_over_every_evaluated_byte(straight_run):
    """val_bpb and train_bpb are the evaluation's nats over ln 2 x the UTF-8 bytes of its targets, counted here
    apart from the run: the same fixed-seed batches, decoded to bytes by tiktoken itself."""
    from data.loader import BatchLoader
    from data.prepare import DATA_ROOT
    from training.trainer import EVAL_SEED

    run_dir, output = straight_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = next(r for r in rows if r["kind"] == "config")["training"]
    evals = [r for r in rows if r["kind"] == "eval"]
    encoding = gpt2().encoding
    for split in ("train", "val"):
        shape = {key: config[key] for key in ("batch_size", "block_size")}
        loader = BatchLoader(DATA_ROOT / config["dataset"], split, **shape, seed=EVAL_SEED, tokenizer=gpt2())
        targets = torch.cat([loader.next_batch()[1].flatten() for _ in range(config["eval_iters"])])
        n_bytes = len(encoding.decode_bytes([t for t in targets.tolist() if t != encoding.eot_token]))
        for row in evals:
            expected = row[f"{split}_loss"] * len(targets) / (math.log(2) * n_bytes)
            assert row[f"{split}_bpb"] == pytest.approx(expected, rel=1e-5)
    last = evals[-1]
    assert f"val loss {last['val_loss']:.4f} ({last['val_bpb']:.4f} bpb)" in output
    assert load_checkpoint(run_dir / "best.pt")["best_val_bpb"] == min(evals, key=lambda r: r["val_loss"])["val_bpb"]


def test_evaluation_counts_only_the_targets_that_count_and_sums_over_all_of_them(monkeypatch):
    """Masked targets (IGNORE_INDEX) add neither nats nor bytes, and loss and bits per byte are sums over every
    evaluated target, not means of per-batch figures: the batches here count 64, 44, 4 and 0 targets."""
    import contextlib

    import torch.nn.functional as F

    from architecture import IGNORE_INDEX, Gemma3Model, ModelConfig
    from training import trainer

    generator = torch.Generator().manual_seed(0)
    batches = []
    for masked in (0, 20, 60, 64):
        x, y = torch.randint(0, 50257, (2, 2, 32), generator=generator)
        y.view(-1)[:masked] = IGNORE_INDEX
        batches.append((x, y))

    class Loader:  # what evaluate reads, in place of the dataset's batches
        def __init__(self, **_):
            self.device, self.batches = torch.device("cpu"), iter(batches)

        def next_batch(self):
            return next(self.batches)

    monkeypatch.setattr(trainer, "BatchLoader", Loader)
    model = Gemma3Model(ModelConfig(**TINY_MODEL))
    loader_args = {"tokenizer": gpt2(), "device": torch.device("cpu")}
    losses = trainer.evaluate(model, loader_args, len(batches), contextlib.nullcontext())
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).flatten()
    with torch.no_grad():
        nats = F.cross_entropy(model(x)[0].flatten(0, 1), y, ignore_index=IGNORE_INDEX, reduction="sum").item()
    targets = [t for t in y.tolist() if t != IGNORE_INDEX]
    n_bytes = len(gpt2().encoding.decode_bytes([t for t in targets if t != gpt2().eos_id]))
    for split in ("train", "val"):
        assert losses[split] == pytest.approx(nats / len(targets), rel=1e-5)
        assert losses[f"{split}_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_the_log_reports_the_gradient_norm_before_clipping(straight_run):
    run_dir, output = straight_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in rows if r["kind"] == "train"]
    assert len(norms) == 12 and all(math.isfinite(n) and n > 0 for n in norms)
    assert any(n > 1.0 for n in norms)  # above grad_clip (1.0): the figure is the norm before clipping
    assert f"grad norm {norms[-1]:.3g}," in output


def test_redirected_log_is_plain_lines_with_config_differences_and_a_summary(straight_run):
    run_dir, output = straight_run
    assert "\r" not in output and "it/s" not in output  # no progress-bar frames in a redirected log
    config_line = next(line for line in output.splitlines() if "differences from the defaults" in line)
    assert "eval_interval=6" in config_line and "weight_decay" not in config_line and "betas" not in config_line
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config_row = next(r for r in rows if r["kind"] == "config")
    assert config_row["training"]["weight_decay"] == 0.1 and config_row["model"]["emb_dim"] == 32  # all of it
    checkpoint = load_checkpoint(run_dir / "best.pt")
    summary = output[output.index("finished at iteration 12 of 12") :]
    best = f"best val loss {checkpoint['best_val_loss']:.4f} ({checkpoint['best_val_bpb']:.4f} bpb)"
    assert f"{best} at iteration {checkpoint['best_iter']}" in summary
    assert f"python sample.py --ckpt {run_dir}" in summary and f"python scripts/plot_loss.py {run_dir}" in summary


def test_the_log_says_how_many_cpu_threads_the_run_uses(straight_run, tmp_path):
    assert "device cpu (1 thread; --threads=N or OMP_NUM_THREADS to change)" in straight_run[1]  # OMP_NUM_THREADS=1
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(run_config(tmp_path, max_iters=1, warmup_steps=0)), "--threads=1"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device cpu (1 thread; --threads=N or OMP_NUM_THREADS to change)" in result.stdout + result.stderr


def test_plot_range_leaves_out_the_first_drop():
    from scripts.plot_loss import loss_range

    train = [{"iter": i, "loss": 11.0 if i < 5 else 4.0 - i / 100} for i in range(1, 101)]
    evals = [{"iter": 50, "train_loss": 3.6, "val_loss": 3.7}, {"iter": 100, "train_loss": 3.0, "val_loss": 3.2}]
    low, high, clipped = loss_range(train, evals)
    after_first_tenth = [r["loss"] for r in train if r["iter"] > 10] + [3.6, 3.7, 3.0, 3.2]
    assert low <= min(after_first_tenth) and max(after_first_tenth) <= high < 4.0  # the 11s are off the axis
    assert clipped == sum(r["loss"] > high for r in train) >= 4


def test_plot_title_counts_the_points_above_the_axis_in_words():
    from scripts.plot_loss import clipped_note

    assert clipped_note(0) == ""
    assert clipped_note(1) == " (the first point is above the axis)"
    assert clipped_note(3) == " (the first 3 points are above the axis)"


@pytest.mark.slow
def test_plot_draws_bits_per_byte_below_the_losses_when_the_metrics_have_it(tmp_path):
    """A second panel for eval rows with train_bpb / val_bpb; metrics written before bpb was measured plot as before."""
    from scripts.plot_loss import plot

    rows = [{"kind": "train", "iter": i, "loss": 10 / i, "lr": 1e-3} for i in range(1, 9)]
    evals = [{"kind": "eval", "iter": i, "train_loss": 9 / i, "val_loss": 10 / i} for i in (4, 8)]
    heights = {}
    for name, extra in (("old", {}), ("new", {"train_bpb": 1.2, "val_bpb": 1.3})):
        (tmp_path / name).mkdir()
        lines = [json.dumps(r) for r in rows + [{**r, **extra} for r in evals]]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        plot(tmp_path / name, tmp_path / name / "loss.png")
        png = (tmp_path / name / "loss.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        heights[name] = int.from_bytes(png[20:24], "big")  # the IHDR chunk's height
    assert heights["new"] > 1.5 * heights["old"]  # the bits-per-byte panel below the losses


def ctrl_c_after(config: Path, iteration: int) -> tuple[int, str]:
    """Run train.py on `config` and press Ctrl-C once it has logged `iteration`: the iteration its latest.pt holds,
    and its output."""
    run_dir = Path(json.loads(config.read_text())["out_dir"])
    process = train_process(config, start_new_session=True)
    wait_for_iteration(run_dir / "metrics.jsonl", iteration, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    return load_checkpoint(run_dir / "latest.pt")["iter_num"], output


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ctrl_c_then_resume_gives_identical_losses(straight_runs, tmp_path, optimizer):
    config = run_config(tmp_path, optimizer=optimizer)
    stopped_at, output = ctrl_c_after(config, 3)
    assert 3 <= stopped_at < 12, output
    assert f"stopped at iteration {stopped_at}" in output

    run_train(config, "--init_from=resume")
    assert losses(tmp_path / "run") == losses(straight_runs(optimizer)[0])  # bit-identical, iteration by iteration


@pytest.fixture(scope="module")
def straight_wsd(tmp_path_factory) -> Path:
    """20 iterations of wsd, decaying from iteration 16: what an extended or a branched shorter run must give."""
    tmp_path = tmp_path_factory.mktemp("straight-wsd")
    run_train(run_config(tmp_path, lr_schedule="wsd", max_iters=20))
    return tmp_path / "run"


@pytest.mark.slow
def test_a_wsd_run_extended_in_its_stable_phase_is_the_longer_run(straight_wsd, tmp_path):
    config = run_config(tmp_path, lr_schedule="wsd", max_iters=12)  # decays from iteration 10
    stopped_at, output = ctrl_c_after(config, 3)
    assert stopped_at < 10, output

    output = run_train(config, "--init_from=resume", "--max_iters=20")  # no --allow_recipe_change: nothing changes
    assert "note: max_iters 12 -> 20: the wsd decay starts at iteration 16 (was 10); the" in output
    assert losses(tmp_path / "run") == losses(straight_wsd)  # bit-identical, iteration by iteration


@pytest.mark.slow
def test_a_longer_run_branched_from_pre_decay_is_the_longer_run(straight_wsd, tmp_path):
    config = run_config(tmp_path, lr_schedule="wsd", max_iters=12)
    run_train(config)
    run_dir, branch = tmp_path / "run", tmp_path / "branch"
    assert load_checkpoint(run_dir / "pre_decay.pt")["iter_num"] == 10
    # The finished run is past its decay's start: a new max_iters would reshape that decay, so it is refused.
    process = train_process(config, "--init_from=resume", "--max_iters=20")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2 and "reshape a decay already begun" in output, output
    assert f"branch a longer run from {run_dir / 'pre_decay.pt'}" in output

    branch.mkdir()  # the README's recipe: pre_decay.pt as a new out_dir's latest.pt, resumed with a larger max_iters
    shutil.copyfile(run_dir / "pre_decay.pt", branch / "latest.pt")
    run_train(config, "--init_from=resume", f"--out_dir={branch}", "--max_iters=20")
    straight = losses(straight_wsd)
    assert losses(branch) == {i: straight[i] for i in range(11, 21)}
    assert {i: loss for i, loss in losses(run_dir).items() if i <= 10} == {i: straight[i] for i in range(1, 11)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer, compile, port, tolerance",
    [("adamw", False, 29731, 1e-5), ("adamw", True, 29732, 1e-4), ("muon", False, 29733, 1e-5)],
    ids=["eager", "compiled", "muon"],
)
def test_two_process_ddp_matches_one_process(straight_runs, tmp_path, optimizer, compile, port, tolerance):
    """2 micro-batches per process per update: the first under no_sync, the second all-reduced. Compiled, DDP is
    inside torch.compile (dynamo cuts the graph at DDP's gradient buckets). Each rank's Muon orthogonalises the same
    all-reduced gradients, so its ranks stay in step as AdamW's do."""
    config = run_config(tmp_path, optimizer=optimizer)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "train.py",
        "--config",
        str(config),
        f"--compile={str(compile).lower()}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    single, ddp = losses(straight_runs(optimizer)[0]), losses(tmp_path / "run")
    assert single.keys() == ddp.keys()
    for iteration in single:  # same data and update; the order of float additions differs (and inductor fuses)
        assert ddp[iteration] == pytest.approx(single[iteration], rel=tolerance), iteration


@pytest.mark.slow
def test_compiled_run_matches_eager(straight_run, tmp_path):
    """`--compile=true` through inductor (the blocked sliding layers and the chunked loss included): same losses."""
    output = run_train(run_config(tmp_path), "--compile=true")
    assert "torch.compile: first iteration took" in output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "compile"] == [1]
    eager, compiled = losses(straight_run[0]), losses(tmp_path / "run")
    assert eager.keys() == compiled.keys()
    for iteration in eager:  # inductor fuses and reorders float operations
        assert compiled[iteration] == pytest.approx(eager[iteration], rel=1e-4), iteration


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Iteration 0 has lr 0 (warmup), so the checkpoint after it is good; the next updates blow the model up.
    config = run_config(
        tmp_path, max_iters=40, eval_interval=1, warmup_steps=20, learning_rate=1e6, min_lr=0.0, grad_clip=0.0
    )
    process = train_process(config)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output
    assert "training diverged and stopped without saving" in output and "Traceback" not in output
    good = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert good["iter_num"] >= 1 and math.isfinite(good["best_val_loss"])
    assert all(torch.isfinite(t).all() for t in good["model"].values())


@pytest.mark.slow
def test_demo_config_loss_falls(tmp_path):
    output = run_train(
        REPO / "config" / "demo.json",
        f"--out_dir={tmp_path}",
        "--max_iters=30",
        "--eval_interval=30",
        "--warmup_steps=5",
        "--eval_iters=4",
        "--log_interval=5",
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    assert train[-1] < train[0] - 1.0, output
    assert [r for r in rows if r["kind"] == "eval"][-1]["val_loss"] < 9.0


@pytest.mark.slow
def test_wandb_offline_and_loss_plot(tmp_path):
    config = run_config(tmp_path, max_iters=4, eval_interval=2, wandb_log=True, wandb_run_name="test")
    process = train_process(config, env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0

    plot = subprocess.run(
        [sys.executable, "scripts/plot_loss.py", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True
    )
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_offline_dataset_fails_fast_with_the_data_message(tmp_path):
    from data.sources import host_reachable

    if host_reachable("huggingface.co"):
        pytest.skip("the Hugging Face hub is reachable from here")
    start = time.time()
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(run_config(tmp_path)), "--dataset=tinystories"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "pydocs" in result.stderr and "Traceback" not in result.stderr
    assert time.time() - start < 60


def test_config_differences_count_runs_in_lists():
    from training.run_logger import config_differences

    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    line = config_differences({"layer_types": layer_types, "n_layers": 6, "qk_norm": True}, {"qk_norm": True})
    assert line == "layer_types=[5 x sliding_attention, full_attention], n_layers=6"


def test_a_setting_given_twice_is_refused_as_a_duplicate_json_key_is():
    with pytest.raises(ConfigError, match=r"--max_iters=5 and --max-iters=6 both set 'max_iters'; keep one"):
        parse_overrides(["--max_iters=5", "--max-iters=6"])


def test_dataset_names_follow_prepares_rule(tmp_path):
    from data.errors import DataError
    from data.prepare import prepare

    for name in ("..", ".", ".hidden", "assets", "__pycache__", "prepare.py", "a/b", "/tmp", ""):
        with pytest.raises(ConfigError, match=r"'dataset': invalid dataset name"):
            TrainingConfig(dataset=name)
        if name:  # prepare names an empty --name after its source
            with pytest.raises(DataError, match=r"invalid dataset name"):
                prepare("pydocs", name, data_root=tmp_path)
    assert not any(tmp_path.iterdir())
    TrainingConfig(dataset="my-data_2.v1")


def test_deeply_nested_config_is_one_config_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"deep.json: brackets nested too deeply to read"):
        load_training_config(path)
    with pytest.raises(ConfigError, match=r"expected a JSON list"):
        parse_overrides(["--betas=" + "[" * 100_000 + "]" * 100_000])


def plot_command(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/plot_loss.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_plot_out_is_the_file_it_says_and_replaces_only_its_own(tmp_path):
    """--out DIR writes DIR/loss.png and says so; a file the script did not write is refused without --force; a
    name too long, a name with no image type and a path through a file are one line each; nothing else changes."""
    rows = [{"kind": "train", "iter": i, "loss": 10 / i, "lr": 1e-3} for i in range(1, 9)]
    rows += [{"kind": "eval", "iter": 8, "train_loss": 1.3, "val_loss": 1.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "plots").mkdir()
    result = plot_command(str(tmp_path), "--out", str(tmp_path / "plots"))
    assert result.returncode == 0 and result.stdout == f"wrote {tmp_path / 'plots' / 'loss.png'}\n", result.stderr
    assert plot_command(str(tmp_path), "--out", str(tmp_path / "plots")).returncode == 0  # its own plot: replaced

    (tmp_path / "mine.png").write_bytes(b"\x89PNG\r\n\x1a\n a photo")
    (tmp_path / "file").write_text("")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for out, fragment in [
        ("mine.png", "mine.png exists and is not a plot this script wrote; pass --force"),
        ("x" * 300 + ".png", "(File name too long); nothing was written"),
        ("file", "names no image type"),
        ("file/loss.png", "file is not a directory"),
    ]:
        result = plot_command(str(tmp_path), "--out", str(tmp_path / out))
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    os.mkfifo(tmp_path / "fifo.png")  # not a file: even --force leaves it (as /dev/null must be left)
    result = plot_command(str(tmp_path), "--out", str(tmp_path / "fifo.png"), "--force")
    assert (
        result.returncode == 2
        and result.stderr == f"error: --out {tmp_path}/fifo.png is not a regular file; name a file to write\n"
    )
    assert stat.S_ISFIFO((tmp_path / "fifo.png").stat().st_mode)
    assert plot_command(str(tmp_path), "--out", str(tmp_path / "mine.png"), "--force").returncode == 0
    assert b"Matplotlib" in (tmp_path / "mine.png").read_bytes()[:200]


def test_a_config_path_that_is_a_directory_or_a_device_says_so(tmp_path):
    (tmp_path / "file").write_text("{}")
    cases = [
        (tmp_path, "is a directory"),
        ("/dev/null", "is not a regular file"),
        (tmp_path / "file" / "c.json", f"cannot exist: {tmp_path / 'file'} is a file, not a directory"),
    ]
    for path, what in cases:
        result = train_without_torch("--config", str(path))
        assert result.returncode == 2 and result.stderr == f"error: config file {path} {what}\n", result.stderr


# --- batch rows ----------------------------------------------------------------------------------------------------


def test_batch_rows_is_checked():
    with pytest.raises(ConfigError, match="'batch_rows' is 'window'; use one of random, bos, doc"):
        TrainingConfig(batch_rows="window")


@pytest.mark.slow
@pytest.mark.parametrize("batch_rows", ["bos", "doc", "conversation"])
def test_ctrl_c_then_resume_gives_identical_losses_with_document_rows(tmp_path, batch_rows):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    chat = {"dataset": "pychat", "block_size": 128} if batch_rows == "conversation" else {}  # a chat dataset
    run_train(run_config(straight, batch_rows=batch_rows, **chat))
    config = run_config(stopped, batch_rows=batch_rows, **chat)
    process = train_process(config, start_new_session=True)
    wait_for_iteration(stopped / "run" / "metrics.jsonl", 3, process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and load_checkpoint(stopped / "run" / "latest.pt")["iter_num"] < 12, output

    other = train_process(config, "--init_from=resume", "--batch_rows=random")  # other rows: another run
    output, _ = other.communicate(timeout=300)
    assert other.returncode == 2 and f"another recipe (batch_rows {batch_rows} -> random)" in output, output
    run_train(config, "--init_from=resume")
    assert losses(stopped / "run") == losses(straight / "run")  # bit-identical, iteration by iteration


def test_a_checkpoint_from_before_a_setting_resumes_as_it_ran():
    """A checkpoint written before lr_schedule and batch_rows existed ran cosine and random windows: resuming it
    with wsd or document rows changes the run, and is refused as any other recipe change."""
    config = TrainingConfig(
        dataset="pydocs", model_config="x.json", lr_schedule="wsd", batch_rows="bos", warmup_steps=0, max_iters=9
    )
    old = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("lr_schedule", "batch_rows")}
    checkpoint = {"training_config": old, "iter_num": 3}
    with pytest.raises(ConfigError, match=r"another recipe \(lr_schedule cosine -> wsd, batch_rows random -> bos\)"):
        check_resume(config, None, checkpoint)
