"""Permission denied on each file a command reads or writes: one line naming the file, exit 2, nothing changed.

Root reads and writes whatever it likes, and CI runs as root: there the commands run under `setpriv` without the two
capabilities that let root ignore file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a chmod-ed file denies
them as it denies any user."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import snapshot
from test_training import REPO, run_config, run_train

pytestmark = pytest.mark.slow


def unprivileged() -> list[str]:
    """The prefix that makes a command subject to file modes."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot deny anything")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A finished tiny run, copies of it, and files and directories that the commands below may not touch."""
    tmp = tmp_path_factory.mktemp("permissions")
    config = run_config(tmp, max_iters=3, eval_interval=3)
    run_train(config)
    for copy in ("latest_unreadable", "metrics_unreadable", "lock_read_only"):
        shutil.copytree(tmp / "run", tmp / copy)
    (tmp / "prompt.txt").write_text("Once upon a time")
    (tmp / "text.txt").write_text("Some text to prepare.")
    shutil.copy(tmp / "tiny_model.json", tmp / "model_unreadable.json")
    shutil.copy(config, tmp / "config_unreadable.json")
    (tmp / "read_only").mkdir()
    for unreadable in (
        "config_unreadable.json",
        "model_unreadable.json",
        "latest_unreadable/latest.pt",
        "metrics_unreadable/metrics.jsonl",
        "prompt.txt",
        "text.txt",
    ):
        (tmp / unreadable).chmod(0o000)
    (tmp / "lock_read_only" / ".lock").chmod(0o444)
    (tmp / "read_only").chmod(0o555)
    return tmp


CASES = {  # the command (with {t} for the place), and what its one line must say
    "config file": ("train.py --config {t}/config_unreadable.json", "cannot read config file {t}/config_unreadable"),
    "model config": (
        "train.py --config {t}/train.json --out_dir={t}/new --model_config={t}/model_unreadable.json",
        "cannot read config file {t}/model_unreadable.json (Permission denied)",
    ),
    "out_dir": (
        "train.py --config {t}/train.json --out_dir={t}/read_only/run",
        "{t}/read_only is read-only or not ours to write",
    ),
    "resume checkpoint": (
        "train.py --config {t}/train.json --out_dir={t}/latest_unreadable --init_from=resume --max_iters=6",
        "cannot read checkpoint {t}/latest_unreadable/latest.pt (Permission denied)",
    ),
    "resume metrics": (
        "train.py --config {t}/train.json --out_dir={t}/metrics_unreadable --init_from=resume --max_iters=6",
        "{t}/metrics_unreadable/metrics.jsonl (Permission denied); the checkpoints on disk are kept",
    ),
    "lock file": (
        "train.py --config {t}/train.json --out_dir={t}/lock_read_only --init_from=resume --max_iters=6",
        "cannot open the lock file {t}/lock_read_only/.lock (Permission denied)",
    ),
    "prompt file": (
        "sample.py --ckpt {t}/run --prompt-file {t}/prompt.txt",
        "cannot read prompt file {t}/prompt.txt (Permission denied)",
    ),
    "checkpoint": (
        "sample.py --ckpt {t}/latest_unreadable/latest.pt",
        "cannot read checkpoint {t}/latest_unreadable/latest.pt (Permission denied)",
    ),
    "export_hf --out": (
        "scripts/export_hf.py --ckpt {t}/run --out {t}/read_only/hf",
        "cannot write {t}/read_only/hf (Permission denied); nothing was written",
    ),
    "export_gguf --out": (
        "scripts/export_gguf.py --ckpt {t}/run --out {t}/read_only/m.gguf",
        "{t}/read_only is read-only or not ours to write",
    ),
    "plot metrics": (
        "scripts/plot_loss.py {t}/metrics_unreadable",
        "cannot read {t}/metrics_unreadable/metrics.jsonl (Permission denied)",
    ),
    "plot --out": (
        "scripts/plot_loss.py {t}/run --out {t}/read_only/loss.png",
        "cannot write {t}/read_only/loss.png (Permission denied)",
    ),
    "prepare --data-root": (
        "data/prepare.py pydocs --data-root {t}/read_only",
        "cannot create {t}/read_only/pydocs (Permission denied)",
    ),
    "prepare source": (
        "data/prepare.py {t}/text.txt --data-root {t}/data",
        "cannot read {t}/text.txt (Permission denied); nothing was written",
    ),
}


def files(place: Path) -> dict[Path, dict[str, bytes]]:
    """Every file's bytes by directory, but `.lock`'s: a run that takes the lock writes its pid there."""
    directories = [place, *(p for p in place.iterdir() if p.is_dir())]
    return {d: {name: data for name, data in snapshot(d).items() if name != ".lock"} for d in directories}


@pytest.mark.parametrize("command, message", CASES.values(), ids=CASES.keys())
def test_permission_denied_is_one_line_naming_the_file(place, command, message):
    before = files(place)
    args = [sys.executable, *command.format(t=place).split()]
    result = subprocess.run([*unprivileged(), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message.format(t=place) in errors[0], errors[0]
    assert files(place) == before
