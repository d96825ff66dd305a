"""Hugging Face export: transformers loads it and computes the same logits; our loader reads back the same tensors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_reference import tiny_config
from test_sample_cli import TEXT, gpt2_config, trained_state
from transformers import AutoModelForCausalLM, AutoTokenizer

from architecture import Gemma3Model
from architecture.hf_export import export_hf
from data.tokenizer import gpt2
from training.checkpoint import load_model, save_checkpoint


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def random_model(config) -> Gemma3Model:
    """Every parameter random, norms included (their init is zero, which would hide a norm mix-up)."""
    model = Gemma3Model(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_loads_the_export_with_the_same_logits(tmp_path, tied):
    model = random_model(tiny_config(tie_embeddings=tied))
    export_hf(model, tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf_model).__name__ == "Gemma3ForCausalLM" and hf_model.dtype == torch.float32
    idx = torch.randint(0, 300, (2, 50), generator=torch.Generator().manual_seed(1))  # past the 16-token window
    with torch.no_grad():
        assert (hf_model(idx).logits - model(idx)[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_then_our_loader_gives_identical_tensors(tmp_path, dtype):
    model = random_model(tiny_config())
    export_hf(model, tmp_path, dtype)
    loaded = Gemma3Model.from_hf(str(tmp_path))
    assert loaded.config.to_dict() == {**model.config.to_dict(), "dtype": str(dtype).removeprefix("torch.")}
    loaded_params = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(loaded_params[name], p.detach().to(dtype).float()), name


def test_export_script_writes_model_and_gpt2_tokenizer(tmp_path):
    save_checkpoint(trained_state(gpt2_config(dtype="float32")), tmp_path / "run" / "latest.pt")  # exported in float32
    out = tmp_path / "hf"
    command = [sys.executable, "scripts/export_hf.py", "--ckpt", str(tmp_path / "run"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = TEXT + "Ünïcödé, 日本語, emoji 🚀, numbers 12345 and   spaces\n\n\tdef f(x):\n    return x**2"
    assert tokenizer.encode(text) == gpt2().encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text and tokenizer.eos_token_id == 50256

    state = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    ours = Gemma3Model(state["model_config"]).eval()
    ours.load_state_dict(state["model"])
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.tensor([gpt2().encode(TEXT)[:40]])
    with torch.no_grad():
        assert (hf_model(idx).logits - ours(idx)[0]).abs().max() <= 1e-4

    # sample.py --hf-dir reads the export back: same tokens, same end-of-text, same greedy continuation.
    loaded, tokenizer = load_model(out)
    assert tokenizer.identity()["vocab_size"] == 50257 and tokenizer.stop_ids == {50256}
    assert tokenizer.encode(TEXT) == gpt2().encode(TEXT) and tokenizer.decode(gpt2().encode(TEXT)) == TEXT
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert torch.equal(loaded.eval().generate(idx, 10, temperature=0), ours.generate(idx, 10, temperature=0))


def test_export_script_error_is_one_line(tmp_path):
    command = [sys.executable, "scripts/export_hf.py", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == f"error: checkpoint not found: {tmp_path / 'nope.pt'}\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "qk_norm, out, fragment",
    [
        (False, "hf", "a model without qk_norm has no Hugging Face Gemma 3 equivalent"),
        (True, "file.txt/hf", "Not a directory"),
    ],
    ids=["config-without-hf-equivalent", "out-inside-a-file"],
)
def test_export_script_error_while_writing_is_one_line(tmp_path, qk_norm, out, fragment):
    """A failure inside the export itself, after the checkpoint loaded, is one line and exit 2 too."""
    config = gpt2_config(qk_norm=qk_norm)
    save_checkpoint({"model": Gemma3Model(config).state_dict(), "model_config": config.to_dict()}, tmp_path / "m.pt")
    (tmp_path / "file.txt").write_text("")
    command = [sys.executable, "scripts/export_hf.py", "--ckpt", str(tmp_path / "m.pt"), "--out", str(tmp_path / out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr, result.stderr
    assert not (tmp_path / "hf").exists()  # refused before anything was written


def snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def run_export_hf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/export_hf.py", *args], capture_output=True, text=True, timeout=300)


def expect_refusal(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_export_script_refuses_a_directory_it_did_not_write_and_reports_what_it_writes(tmp_path):
    """A directory with other files (a run's out_dir, a user's notes) is refused without --force and left as it was;
    an earlier export is replaced; the report lists the files written, never the others."""
    save_checkpoint(trained_state(gpt2_config(dtype="float32")), tmp_path / "run" / "latest.pt")
    (tmp_path / "run" / ".lock").write_text("")
    ckpt = str(tmp_path / "run")
    before = snapshot(tmp_path / "run")
    expect_refusal(run_export_hf("--ckpt", ckpt, "--out", ckpt), "holds files an export does not write (.lock, latest")
    assert snapshot(tmp_path / "run") == before

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export's name: replaced
    result = run_export_hf("--ckpt", ckpt, "--out", str(out))
    assert result.returncode == 0, result.stderr
    written = "config.json, generation_config.json, merges.txt, model.safetensors, tokenizer.json, "
    assert result.stdout.endswith(f": {written}tokenizer_config.json, vocab.json\n"), result.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"

    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    expect_refusal(run_export_hf("--ckpt", ckpt, "--out", str(out)), "pass --force to write there anyway")
    assert snapshot(out) == before
    result = run_export_hf("--ckpt", ckpt, "--out", str(out), "--force")
    assert result.returncode == 0 and "notes.txt" not in result.stdout, result.stderr
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


@pytest.mark.slow
def test_export_script_file_system_errors_are_one_line(tmp_path):
    """A name too long, a path through a file and a full disk: one line naming --out, and nothing left behind."""
    from test_faults import tmpfs

    save_checkpoint(trained_state(gpt2_config(dtype="float32")), tmp_path / "m.pt")
    (tmp_path / "file").write_text("")
    ckpt = str(tmp_path / "m.pt")
    expect_refusal(run_export_hf("--ckpt", ckpt, "--out", str(tmp_path / ("x" * 300))), "(File name too long)")
    expect_refusal(run_export_hf("--ckpt", ckpt, "--out", str(tmp_path / "file" / "hf")), "(Not a directory)")
    disk = tmpfs(tmp_path / "small", "1m")  # the model alone is 6 MB
    try:
        (disk / "hf").mkdir()
        (disk / "hf" / "config.json").write_text("{}")  # an earlier export, kept when this one cannot be written
        result = run_export_hf("--ckpt", ckpt, "--out", str(disk / "hf"))
        expect_refusal(result, f"cannot write {disk / 'hf'} (No space left on device")
        assert result.stderr.endswith(f"; {disk / 'hf'} was left as it was\n")
        assert snapshot(disk / "hf") == {"config.json": b"{}"} and sorted(p.name for p in disk.iterdir()) == ["hf"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
