"""Fault injection on real `train.py` and `prepare.py` processes: two runs on one out_dir, a torn metrics line,
SIGTERM, a crash between the two checkpoint writes, a loss spike, resume mismatches, a full disk, and a table of
bad inputs, each refused in one line naming the value and where it came from, with every file left as it was."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training import REPO, TINY_MODEL, losses, run_config, run_train, train_process, wait_for_iteration

from data.prepare import ensure_prepared
from data.tokenizer import gpt2
from training.checkpoint import load_checkpoint, save_checkpoint
from training.metrics import read_metrics


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()} if directory.exists() else {}


def expect_refusal(result_or_output: str, returncode: int, *fragments: str) -> None:
    assert returncode == 2, result_or_output
    lines = [line for line in result_or_output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result_or_output, result_or_output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def refused(config: Path, *args: str, fragments: tuple[str, ...] = (), env: dict | None = None) -> str:
    process = train_process(config, *args, env=env)
    output, _ = process.communicate(timeout=300)
    expect_refusal(output, process.returncode, *fragments)
    return output


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """12 iterations without a stop, evaluated every 3, by optimizer, each run on first use: the reference runs."""
    runs = {}

    def straight(optimizer: str) -> Path:
        if optimizer not in runs:
            tmp_path = tmp_path_factory.mktemp(f"straight-{optimizer}")
            run_train(run_config(tmp_path, eval_interval=3, optimizer=optimizer))
            runs[optimizer] = tmp_path / "run"
        return runs[optimizer]

    return straight


@pytest.fixture(scope="module")
def straight(straight_runs) -> Path:
    return straight_runs("adamw")


@pytest.mark.slow
def test_second_run_on_the_same_out_dir_is_refused_and_the_first_goes_on(tmp_path):
    config = run_config(tmp_path, max_iters=400, eval_interval=2)
    first = train_process(config, start_new_session=True)
    wait_for_iteration(tmp_path / "run" / "metrics.jsonl", 3, first)
    refused(config, "--seed=2", fragments=("is in use by another run (pid", "another --out_dir"))
    refused(config, "--init_from=resume", fragments=("is in use by another run",))
    first.send_signal(signal.SIGTERM)  # a scheduler's stop: finish the iteration, save, exit 0
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "SIGTERM: finishing this iteration" in output, output
    stopped_at = load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"]
    assert f"stopped at iteration {stopped_at}" in output
    assert not list((tmp_path / "run").glob("*.tmp"))

    # The same command again, without resume, would overwrite the run: refused, and nothing changes.
    before = snapshot(tmp_path / "run")
    refused(config, fragments=("already holds a run", "--init_from=resume", "--overwrite=true"))
    assert snapshot(tmp_path / "run") == before
    run_train(config, "--overwrite=true", "--max_iters=2")
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"] == 2
    assert [r["iter"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigterm_then_resume_gives_identical_losses(straight_runs, tmp_path, optimizer):
    config = run_config(tmp_path, eval_interval=3, optimizer=optimizer)
    process = train_process(config, start_new_session=True)
    wait_for_iteration(tmp_path / "run" / "metrics.jsonl", 4, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    run_train(config, "--init_from=resume")
    assert losses(tmp_path / "run") == losses(straight_runs(optimizer))


@pytest.mark.slow
def test_torn_metrics_line_then_resume(straight, tmp_path):
    config = run_config(tmp_path, eval_interval=3)
    process = train_process(config, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for_iteration(metrics, 5, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    history = metrics.read_bytes()
    with open(metrics, "ab") as f:
        f.write(b'{"kind": "train", "iter": 8, "')  # a full disk or kill -9 during an append
    output = run_train(config, "--init_from=resume")
    assert "ended in a torn line" in output
    assert metrics.read_bytes().startswith(history)  # history kept byte for byte; only the torn tail went
    assert losses(tmp_path / "run") == losses(straight)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_rows_past_the_checkpoint_are_superseded_not_deleted(straight_runs, tmp_path, optimizer):
    config = run_config(tmp_path, eval_interval=3, max_iters=12, optimizer=optimizer)
    process = train_process(config, start_new_session=True)
    wait_for_iteration(tmp_path / "run" / "metrics.jsonl", 5, process)
    process.kill()  # kill -9 after iteration 5: latest.pt is at 3, rows 4 and 5 belong to a lost future
    process.communicate()
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"] == 3
    logged = (tmp_path / "run" / "metrics.jsonl").read_text()
    run_train(config, "--init_from=resume")
    assert (tmp_path / "run" / "metrics.jsonl").read_text().startswith(logged)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_rows = [(r["iter"], r["loss"]) for r in rows if r["kind"] == "train"]
    assert train_rows == sorted(losses(straight_runs(optimizer)).items())  # one history, each iteration once


@pytest.mark.slow
def test_crash_between_latest_and_best_then_resume(tmp_path):
    config = run_config(tmp_path, eval_interval=3, max_iters=6)
    run_train(config)
    run_dir = tmp_path / "run"
    latest = load_checkpoint(run_dir / "latest.pt")
    assert latest["best_iter"] == 6  # val improved at the last evaluation
    # The crash: latest.pt was replaced, best.pt still holds an older state, and its temporary is left behind.
    save_checkpoint({**latest, "iter_num": 3, "best_iter": 3}, run_dir / "best.pt")
    (run_dir / "best.pt.999.tmp").write_bytes(b"half a checkpoint")
    output = run_train(config, "--init_from=resume", "--max_iters=7", "--eval_interval=100")
    assert "restored from latest.pt (iteration 6)" in output
    best_iter = load_checkpoint(run_dir / "latest.pt")["best_iter"]
    assert load_checkpoint(run_dir / "best.pt")["iter_num"] == best_iter and not (run_dir / "best.pt.999.tmp").exists()


def test_loss_spike_stops_before_saving_and_names_the_good_checkpoint(tmp_path):
    # lr 0 for the first two iterations (warmup from 0 over 100 iterations makes the first update tiny), then huge.
    config = run_config(
        tmp_path, max_iters=40, eval_interval=1, warmup_steps=20, learning_rate=1e4, min_lr=0.0, grad_clip=0.0
    )
    output = refused(config, fragments=("training diverged and stopped without saving",))
    good = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert f"the last good checkpoint is {tmp_path / 'run' / 'latest.pt'} (iteration {good['iter_num']})" in output
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    assert "spiked to" in output or "the loss is nan" in output or "the loss is inf" in output
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert max(r["loss"] for r in rows if r["iter"] <= good["iter_num"]) < 3 * rows[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--dataset=pystdlib"], ("trained on dataset 'pydocs'", "--dataset=pydocs")),
        (["--batch_size=2"], ("batch_size 4 -> 2", "--allow_batch_change=true")),
        (["--max_iters=3"], ("is at iteration 3 and max_iters is 3", "raise --max_iters")),
        (["--model_config=config/demo_model.json"], ("this run names model_config config/demo_model.json",)),
    ],
    ids=["dataset", "batch", "max-iters", "model-config-file"],
)
def test_resume_mismatches_are_refused(tmp_path, args, fragments):
    config = run_config(tmp_path, eval_interval=3, max_iters=3)
    run_train(config)
    before = snapshot(tmp_path / "run")
    given = {"--max_iters": "6"} | dict(arg.split("=", 1) for arg in args)  # a flag given twice would be refused
    refused(config, "--init_from=resume", *(f"{key}={value}" for key, value in given.items()), fragments=fragments)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_resume_with_another_optimizer_is_refused(tmp_path):
    config = run_config(tmp_path, eval_interval=3, max_iters=3)
    run_train(config)
    latest = tmp_path / "run" / "latest.pt"
    state = load_checkpoint(latest)
    assert state["training_config"]["optimizer"] == "adamw"  # recorded with the run
    state["training_config"]["optimizer"] = "lion"  # as a run of a version that has it would record
    save_checkpoint(state, latest)
    before = snapshot(tmp_path / "run")
    refused(
        config,
        "--init_from=resume",
        "--max_iters=6",
        fragments=("was trained with optimizer lion, this run names adamw", "--optimizer=lion"),
    )
    assert snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_resume_after_the_model_config_file_changed_and_an_allowed_batch_change(tmp_path):
    config = run_config(tmp_path, eval_interval=3, max_iters=3)
    run_train(config)
    model_file = tmp_path / "tiny_model.json"
    model_file.write_text(json.dumps({**TINY_MODEL, "hidden_dim": 96}))
    refused(config, "--init_from=resume", "--max_iters=6", fragments=("changed since", "hidden_dim 64 -> 96"))
    model_file.write_text(json.dumps(TINY_MODEL))
    output = run_train(config, "--init_from=resume", "--max_iters=6", "--batch_size=2", "--allow_batch_change=true")
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"] == 6, output


def tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True)
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root and a mount that permits it")
    return path


@pytest.mark.slow
def test_full_disk_on_checkpoint_and_prepare(tmp_path):
    disk = tmpfs(tmp_path / "small", "4m")  # the tiny model's checkpoint with its AdamW state is about 20 MB
    try:
        config = run_config(tmp_path, out_dir=str(disk / "run"), eval_interval=2, max_iters=4)
        refused(config, fragments=("cannot write", "latest.pt", "no latest.pt was written"))
        assert not list((disk / "run").glob("*.tmp"))
        command = [sys.executable, "data/prepare.py", "pystdlib", "--data-root", str(disk), "--num-proc", "1"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        expect_refusal(result.stderr, result.returncode, "cannot write", "nothing of this dataset was kept")
        assert not (disk / "pystdlib").exists()  # no empty folder left behind
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def bad_input_cases(tmp_path: Path) -> list[tuple[list[str], tuple[str, ...]]]:
    """(train.py arguments after --config, fragments of the one-line refusal)."""
    (tmp_path / "dup.json").write_text('{"batch_size": 2, "batch_size": 3}')
    (tmp_path / "latin1.json").write_bytes(b'{"wandb_run_name": "caf\xe9"}')
    (tmp_path / "betas.json").write_text('{"betas": [[0.9], 0.95]}')
    (tmp_path / "a_file").write_text("not a directory")
    nan_model = tmp_path / "nan_model.json"
    nan_model.write_text(json.dumps(TINY_MODEL).replace('"sliding_window"', '"rope_base": NaN, "sliding_window"'))
    return [
        (["--learning_rate=nan"], ("--learning_rate=nan (command line)", "'learning_rate' must be a finite number")),
        (["--learning_rate=inf"], ("--learning_rate=inf (command line)", "finite")),
        (["--weight_decay=nan"], ("--weight_decay=nan (command line)", "finite")),
        (["--grad_clip=nan"], ("--grad_clip=nan (command line)", "finite")),
        (["--seed=18446744073709551616"], ("--seed=18446744073709551616 (command line)", "below 2**63")),
        (
            ["--max_iters=99999999999999999999999"],
            ("--max_iters=99999999999999999999999 (command line)", "below 2**63"),
        ),
        (["--threads=100000"], ("--threads=100000 (command line)", "'threads' must be at most")),
        (["--min_lr=0.01"], ("--min_lr=0.01 (command line) with", "'min_lr' (0.01) is above")),
        (["--batch_size=x"], ("--batch_size=x: expected an integer",)),
        ([f"--out_dir={tmp_path / 'a_file'}"], ("exists and is not a directory",)),
        ([f"--model_config={nan_model}"], (str(nan_model), "'rope_base' must be a finite number")),
        (["--overwrite=true", "--init_from=resume"], ("'overwrite' and 'init_from' resume contradict",)),
        (["--block_size=5000"], ("--block_size=5000 (command line): 'block_size' (5000) exceeds the model's context",)),
        (
            ["--batch_size=10000000000"],
            ("--batch_size=10000000000 (command line) with", "GiB for what the backward keeps"),
        ),
    ]


@pytest.mark.slow
def test_bad_inputs_are_one_line_refusals_that_touch_nothing(tmp_path):
    config = run_config(tmp_path)
    cases = bad_input_cases(tmp_path)
    for name, fragment in [
        ("dup.json", "key 'batch_size' appears more than once"),
        ("latin1.json", "not UTF-8"),
        ("betas.json", "'betas' must be a list of numbers, got [[0.9], 0.95]"),
    ]:
        result = subprocess.run(
            [sys.executable, "train.py", "--config", str(tmp_path / name)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        expect_refusal(result.stderr, result.returncode, str(tmp_path / name), fragment)
    before = snapshot(tmp_path)
    for args, fragments in cases:
        refused(config, *args, fragments=fragments)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_checkpoints_and_datasets_are_refused_at_start(tmp_path):
    config = run_config(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "latest.pt").write_bytes(b"")
    refused(config, "--init_from=resume", fragments=("latest.pt is not a readable checkpoint",))
    save_checkpoint({"model": {}, "model_config": {}}, run_dir / "latest.pt")
    refused(config, "--init_from=resume", fragments=("lacks training_config", "not resumed"))

    data, names = REPO / "data", ("pytest-number-meta", "pytest-no-train", "pytest-short-val")
    pydocs = ensure_prepared("pydocs", gpt2())
    meta = json.loads((pydocs / "meta.json").read_text())
    try:
        for name in names:
            (data / name).mkdir(exist_ok=True)
        (data / "pytest-number-meta" / "meta.json").write_text("3")
        (data / "pytest-no-train" / "meta.json").write_text(json.dumps(meta))
        (data / "pytest-no-train" / "val.bin").write_bytes((pydocs / "val.bin").read_bytes())
        (data / "pytest-short-val" / "meta.json").write_text(json.dumps({**meta, "val_tokens": 10}))
        (data / "pytest-short-val" / "train.bin").write_bytes((pydocs / "train.bin").read_bytes())
        (data / "pytest-short-val" / "val.bin").write_bytes((pydocs / "val.bin").read_bytes()[:20])
        out = tmp_path / "fresh"
        refused(config, "--dataset=pytest-number-meta", f"--out_dir={out}", fragments=("holds int",))
        refused(config, "--dataset=pytest-no-train", f"--out_dir={out}", fragments=("train.bin is missing",))
        refused(config, "--dataset=pytest-short-val", f"--out_dir={out}", fragments=("val.bin has 10 tokens",))
        assert not out.exists()  # refused before any work that would be lost
    finally:
        for name in names:
            for p in (data / name).glob("*"):
                p.unlink()
            (data / name).rmdir()


@pytest.mark.slow
def test_prompt_file_that_is_not_utf8(straight, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"caf\xe9")
    result = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(straight), "--prompt-file", str(prompt)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    expect_refusal(result.stderr, result.returncode, f"prompt file {prompt} is not UTF-8 text")


# --- the out_dir's life: a run that died before saving, paths that are not a run's own, the filesystem, a vanished
# out_dir, signals during start-up ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_leaves_its_out_dir_free(tmp_path):
    config = run_config(tmp_path, eval_interval=100, max_iters=400)
    run_dir, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    process = train_process(config, start_new_session=True)
    wait_for_iteration(metrics, 2, process)
    process.kill()  # kill -9 before the first checkpoint: metrics.jsonl and .lock, no latest.pt
    process.communicate()
    before = snapshot(run_dir)
    refused(config, "--init_from=resume", fragments=("nothing to resume", "holds no latest.pt", "without --init_from"))
    refused(config, "--init_from=resume", f"--out_dir={tmp_path / 'none'}", fragments=("does not exist",))
    assert snapshot(run_dir) == before and not (tmp_path / "none").exists()
    output = run_train(config, "--max_iters=2", "--eval_interval=2")
    assert "moved them to metrics.jsonl.1.old" in output, output
    assert (run_dir / "metrics.jsonl.1.old").read_bytes() == before["metrics.jsonl"]
    assert [r["iter"] for r in read_metrics(metrics) if r["kind"] == "train"] == [1, 2]
    assert load_checkpoint(run_dir / "latest.pt")["iter_num"] == 2


def out_dir_cases(tmp_path: Path) -> list[tuple[str, str]]:
    """(out_dir, a fragment of its one-line refusal): places that are not a directory of the run's own."""
    (tmp_path / "a_file").write_text("not a directory")
    return [
        ("", "out_dir is empty"),
        (".", "the current directory"),
        ("./", "the current directory"),
        (str(REPO), "the current directory"),
        ("..", "a folder above the current directory"),
        ("/", "a folder above"),
        ("~/runs", "starts with '~'"),
        (str(tmp_path / "a_file" / "run"), f"{tmp_path / 'a_file'} is a file"),
        (str(tmp_path / ("n" * 300)), "File name too long"),
        (str(REPO / "config"), "holds files no run wrote (demo.json, demo_model.json, "),
    ]


@pytest.mark.slow
def test_out_dirs_that_are_not_a_run_s_own_are_refused(tmp_path):
    config = run_config(tmp_path)
    cases, before = out_dir_cases(tmp_path), snapshot(tmp_path)
    for out_dir, fragment in cases:
        refused(config, f"--out_dir={out_dir}", fragments=(fragment,))
    assert snapshot(tmp_path) == before
    for place in (REPO, REPO.parent, Path("/")):  # nothing of a run written where the refused paths point
        assert not any((place / name).exists() for name in (".lock", "latest.pt", "best.pt", "metrics.jsonl"))


@pytest.mark.slow
def test_read_only_out_dir_and_full_disk_while_appending_metrics(tmp_path):
    disk = tmpfs(tmp_path / "small", "1m")
    try:
        config = run_config(tmp_path, out_dir=str(disk / "run"), eval_interval=100, max_iters=4000)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        refused(config, fragments=(f"out_dir {disk / 'run'} cannot be written: {disk} is read-only",))
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        process = train_process(config, start_new_session=True)
        wait_for_iteration(disk / "run" / "metrics.jsonl", 1, process)
        fill(disk / "filler")
        output, _ = process.communicate(timeout=300)
        expect_refusal(output, process.returncode, "cannot append the train row to", "(the disk is full)", "kept")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def fill(path: Path) -> None:
    """Write to `path` until the disk is full, to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**16, 2**12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_an_out_dir_moved_away_mid_run_stops_the_run_and_keeps_its_checkpoint(tmp_path):
    config = run_config(tmp_path, eval_interval=2, max_iters=400)
    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    first = train_process(config, start_new_session=True)
    wait_for_iteration(run_dir / "metrics.jsonl", 3, first)
    os.rename(run_dir, moved)  # as `mv` or `rm -r` would; a second run may now start at the old path
    second = run_train(config, "--max_iters=2")
    output, _ = first.communicate(timeout=120)
    expect_refusal(output, first.returncode, f"{run_dir / '.lock'} was removed or replaced", "stopped without saving")
    assert load_checkpoint(moved / "latest.pt")["iter_num"] % 2 == 0  # the first run's last checkpoint, whole
    assert load_checkpoint(run_dir / "latest.pt")["iter_num"] == 2, second  # the second run's, untouched by the first
    assert [r["iter"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (the SigCgt mask of /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_start_up_is_one_line(tmp_path, signum):
    config = run_config(tmp_path)
    process = train_process(config, start_new_session=True)
    deadline = time.time() + 60
    while not catches(process.pid, signum):  # train.py's first act; torch's import (seconds) comes after
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.01)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in output, output
    assert output.strip().splitlines()[-1].startswith("interrupted: stopped without saving"), output
    assert not (tmp_path / "run").exists()


# Each argparse entry point with a flag given twice, as typed (`--flag value`, `--flag=value`, an abbreviation, a
# store_true flag, one of a mutually exclusive group), and what its refusal names; every path lies under {tmp}.
DUPLICATED_FLAGS = {
    "train.py --config": (
        ["train.py", "--config", "config/demo.json", "--conf=config/demo.json"],
        "--config config/demo.json and --conf=config/demo.json both set --config",
    ),
    "sample.py": (
        ["sample.py", "--ckpt", "{tmp}/ckpt.pt", "--temperature", "0.5", "--temp=0.9"],
        "--temperature 0.5 and --temp=0.9 both set --temperature; keep one",
    ),
    "sample.py store_true": (["sample.py", "--hf-dir", "{tmp}/hf", "--int8", "--int8"], "--int8 and --int8 both set"),
    "prepare.py": (
        ["data/prepare.py", "{tmp}/a.txt", "--data-root", "{tmp}/data", "--name", "a", "--name=b"],
        "--name a and --name=b both set --name",
    ),
    "export_gguf.py": (
        ["scripts/export_gguf.py", "--ckpt", "{tmp}/a.pt", "--ckpt={tmp}/b.pt", "--out", "{tmp}/x.gguf"],
        "--ckpt {tmp}/a.pt and --ckpt={tmp}/b.pt both set --ckpt",
    ),
    "export_hf.py": (
        ["scripts/export_hf.py", "--ckpt", "{tmp}/a.pt", "--out", "{tmp}/a", "--out", "{tmp}/b"],
        "--out {tmp}/a and --out {tmp}/b both set --out",
    ),
    "plot_loss.py": (["scripts/plot_loss.py", "{tmp}/run", "--force", "--f"], "--force and --f both set --force"),
    "python -m architecture": (
        ["-m", "architecture", "--config", "{tmp}/a.json", "--conf={tmp}/b.json"],
        "--config {tmp}/a.json and --conf={tmp}/b.json both set --config",
    ),
}


@pytest.mark.parametrize("args, message", DUPLICATED_FLAGS.values(), ids=DUPLICATED_FLAGS.keys())
def test_a_flag_given_twice_is_refused_by_every_entry_point(tmp_path, args, message):
    """As train.py refuses --max_iters=5 --max_iters=7 (one of the values would be lost without a word), so does
    every other entry point: one line, before any work, and before torch where the script defers it."""
    command = [sys.executable, "-X", "importtime", *(arg.format(tmp=tmp_path) for arg in args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree's packages, wherever `pip install -e` points
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    stderr = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    expect_refusal(stderr, result.returncode, message.format(tmp=tmp_path))
    assert len(stderr.splitlines()) == 1 and not result.stdout, stderr
    assert "torch" not in imported or args[0] == "-m"  # python -m architecture imports torch with its package
    assert not any(tmp_path.iterdir())


# --- settings accepted then misbehaving, resume that changes the run, data changed under a run ----------------------


def test_values_that_would_misbehave_are_one_line_refusals(tmp_path):
    config = run_config(tmp_path)
    huge = tmp_path / "huge_model.json"
    huge.write_text(json.dumps({**TINY_MODEL, "vocab_size": 10**12}))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases = [
        (["--max_iters=5", "--max_iters=6"], ("--max_iters=5 and --max_iters=6 both set 'max_iters'",)),
        (["--seed", "-5"], ("cannot read argument '--seed'", "--key=value")),
        (["--seed=-5"], ("--seed=-5 (command line)", "'seed' must not be negative")),
        ([f"--model_config={huge}"], (str(huge), "'vocab_size' 1,000,000,000,000, 'emb_dim' 32", "GiB of memory")),
        (["--dataset=.."], ("--dataset=.. (command line)", "invalid dataset name '..'")),
        (["--dataset=assets"], ("invalid dataset name 'assets'",)),
        (["--dataset=__pycache__"], ("invalid dataset name '__pycache__'",)),
    ]
    before = snapshot(tmp_path)
    for args, fragments in cases:
        refused(config, *args, fragments=fragments)
    output = subprocess.run(
        [sys.executable, "train.py", "--config", str(deep)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    expect_refusal(output.stderr, output.returncode, str(deep), "nested too deeply")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_that_cannot_start_is_one_line_and_releases_the_out_dir(tmp_path):
    config = run_config(tmp_path, wandb_log=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    refused(config, env=env, fragments=("wandb cannot start a run", "wandb login", "--wandb_log=false"))
    bad_mode = env | {"WANDB_MODE": "bogus"}  # wandb's settings refuse it with pydantic's three-line error
    refused(config, env=bad_mode, fragments=("wandb cannot start a run (1 validation error", "input_value='bogus'"))
    no_wandb = tmp_path / "no_wandb" / "wandb"
    no_wandb.mkdir(parents=True)
    (no_wandb / "__init__.py").write_text("raise ImportError('no wandb here')")
    env["PYTHONPATH"] = str(no_wandb.parent)
    # Run again on the same out_dir: the first run's lock was released (else: "in use by another run").
    refused(config, env=env, fragments=("wandb is not installed", "--wandb_log=false"))
    assert not (tmp_path / "run").exists()  # a run that wrote nothing removes its .lock and the out_dir it made
    (tmp_path / "run").mkdir()
    refused(config, env=env, fragments=("wandb is not installed",))
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())  # a directory given stays


@pytest.mark.slow
def test_resume_with_another_recipe_is_refused_unless_meant(tmp_path):
    config = run_config(tmp_path, eval_interval=3, max_iters=3)
    run_train(config)
    before = snapshot(tmp_path / "run")
    for args, fragment in [
        (["--learning_rate=0.01"], "learning_rate 0.003 -> 0.01"),
        (["--seed=7"], "seed 1337 -> 7"),
        (["--betas=[0.9,0.99]"], "betas [0.9, 0.95] -> [0.9, 0.99]"),
        (["--dtype=bfloat16", "--warmup_steps=1"], "warmup_steps 2 -> 1, dtype float32 -> bfloat16"),
    ]:
        fragments = ("trained with another recipe", fragment, "--allow_recipe_change=true")
        refused(config, "--init_from=resume", "--max_iters=6", *args, fragments=fragments)
    assert snapshot(tmp_path / "run") == before
    output = run_train(config, "--init_from=resume", "--max_iters=6", "--min_lr=0.0001", "--allow_recipe_change=true")
    assert "note: resuming with another recipe on purpose: min_lr 0.0003 -> 0.0001" in output
    assert "note: max_iters 3 -> 6: the cosine decay now ends at iteration 6" in output
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"] == 6


@pytest.mark.slow
def test_train_bin_truncated_mid_run_is_one_line_and_the_checkpoint_stays(tmp_path):
    pydocs, dataset = ensure_prepared("pydocs", gpt2()), REPO / "data" / "pytest-truncated"
    dataset.mkdir(exist_ok=True)
    try:
        for name in ("meta.json", "train.bin", "val.bin"):
            (dataset / name).write_bytes((pydocs / name).read_bytes())
        config = run_config(tmp_path, dataset=dataset.name, max_iters=400, eval_interval=2)
        process = train_process(config, start_new_session=True)
        wait_for_iteration(tmp_path / "run" / "metrics.jsonl", 3, process)
        with open(dataset / "train.bin", "r+b") as f:
            f.truncate(1000)  # as a re-prepare, a full disk or a careless `> train.bin` would leave it
        output, _ = process.communicate(timeout=120)
        expect_refusal(output, process.returncode, str(dataset / "train.bin"), "--force")  # in a batch or an eval
        assert load_checkpoint(tmp_path / "run" / "latest.pt")["iter_num"] >= 2  # whole, at an iteration boundary
    finally:
        for p in dataset.glob("*"):
            p.unlink()
        dataset.rmdir()
