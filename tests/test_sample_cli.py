"""sample.py end to end on a checkpoint made by a few real training steps, and every error it reports."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_reference import random_hf_model, tiny_config
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import sample
from architecture import REPO_ROOT, Gemma3Model, gguf_export
from data.tokenizer import gpt2
from scripts import export_gguf
from training import device
from training.checkpoint import load_model, save_checkpoint

encode, decode, EOT_ID = gpt2().encode, gpt2().decode, gpt2().eos_id

TEXT = (
    "The model reads a prompt, then writes one token at a time. Each token is chosen from the logits of the "
    "last position. A cache keeps the keys and values of earlier tokens, so each step is cheap. "
) * 4


def gpt2_config(**overrides):
    values = dict(
        vocab_size=50257,
        context_length=64,
        emb_dim=32,
        n_heads=2,
        n_kv_groups=1,
        head_dim=16,
        hidden_dim=64,
        n_layers=2,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        tie_embeddings=True,
    )
    values.update(overrides)
    return tiny_config(**values)


def trained_state(config) -> dict:
    """A few AdamW steps on real GPT-2 token ids, saved with the keys sample.py reads."""
    torch.manual_seed(0)
    model = Gemma3Model(config)
    ids = torch.tensor(encode(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(5):
        x = torch.stack([ids[i : i + 32] for i in range(step, step + 40, 8)])
        y = torch.stack([ids[i + 1 : i + 33] for i in range(step, step + 40, 8)])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "model": model.state_dict(),
        "model_config": config.to_dict(),
        "tokenizer": "gpt2",
        "iter_num": 5,
        "best_val_loss": loss.item(),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(trained_state(gpt2_config()), path / "best.pt")
    return path


def run_main(capsys, *argv):
    """sample.py's main on the CPU (these tests mean the CPU's paths; `--device auto` would take a GPU where there
    is one); `argv` naming a device too is refused, as any flag given twice is."""
    sample.main(["--device", "cpu", *argv])
    return capsys.readouterr()


def expect_error(capsys, match: str, *argv):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err
    assert "Traceback" not in err and "KeyError" not in err  # a bare KeyError: torch's legacy reader, noise


def test_cli_streams_greedy_text_and_reports_speed(run_dir):
    command = [
        sys.executable,
        "sample.py",
        "--ckpt",
        str(run_dir),
        "--prompt",
        "The model",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--num-samples",
        "2",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    state = torch.load(run_dir / "best.pt", weights_only=True)
    model = Gemma3Model(state["model_config"]).eval()
    model.load_state_dict(state["model"])
    prompt = torch.tensor([encode("The model")])
    new_ids = model.generate(prompt, 12, temperature=0)[0, prompt.size(1) :].tolist()
    if EOT_ID in new_ids:
        new_ids = new_ids[: new_ids.index(EOT_ID)]
    expected = "The model" + decode(new_ids)
    assert result.stdout == f"{expected}\n---------------\n{expected}\n"
    assert "tokens/s" in result.stderr and "cpu, 1 thread, float32" in result.stderr


def test_seeded_sampling_is_reproducible_and_int8_runs(run_dir, capsys):
    args = ["--ckpt", str(run_dir / "best.pt"), "--max-new-tokens", "10", "--top-k", "50", "--top-p", "0.9"]
    first = run_main(capsys, *args, "--seed", "3").out
    assert first == run_main(capsys, *args, "--seed", "3").out
    assert "float32 + int8 weights" in run_main(capsys, *args, "--int8", "--dtype", "float32").err


def test_compiled_decode_step_streams_the_same_text(run_dir, capsys):
    args = ["--ckpt", str(run_dir), "--prompt", "The model", "--max-new-tokens", "40", "--temperature", "0"]
    eager = run_main(capsys, *args, "--dtype", "float32")
    compiled = run_main(capsys, *args, "--dtype", "float32", "--compile")
    assert compiled.out == eager.out
    assert "compiled the decode step in" in compiled.err and "float32, compiled)" in compiled.err


def test_a_failed_compilation_falls_back_to_the_uncompiled_step(run_dir, capsys):
    args = ["--ckpt", str(run_dir), "--prompt", "The model", "--max-new-tokens", "12", "--temperature", "0"]
    eager = run_main(capsys, *args, "--dtype", "float32")
    torch._dynamo.reset()  # nothing cached from other tests: the compiler really runs
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler",)}):  # a machine without a C++ compiler
        failed = run_main(capsys, *args, "--dtype", "float32", "--compile")
    assert failed.out == eager.out
    assert "note: --compile failed, decoding uncompiled:" in failed.err and "compiled)" not in failed.err
    assert "Traceback" not in failed.err


def test_int8_refuses_a_width_its_layout_cannot_split_in_one_line(tmp_path, capsys):
    save_checkpoint(trained_state(gpt2_config(emb_dim=30, hidden_dim=62)), tmp_path / "best.pt")
    args = ["--device", "cpu", "--ckpt", str(tmp_path), "--prompt", "a", "--max-new-tokens", "2", "--int8"]
    expect_error(capsys, "--int8: Int8Linear needs in_features divisible by 4, got 30", *args)


def test_auto_dtype_is_the_fastest_to_decode_on_each_cpu_class(monkeypatch):
    """bfloat16 on every CPU (a decode step reads bytes), but float32 activations for int8 weights where bf16 is not
    native: there the compiled int8 kernel takes float32 (benchmarks/results/generate_cpu.md)."""
    for flags, int8, expected in [
        ({"avx2"}, False, torch.bfloat16),
        ({"avx2"}, True, torch.float32),
        ({"avx512f", "avx512_bf16"}, False, torch.bfloat16),
        ({"avx512f", "avx512_bf16"}, True, torch.bfloat16),
    ]:
        monkeypatch.setattr(device, "cpu_flags", lambda flags=flags: flags)
        assert sample.resolve_device("cpu", "auto", int8) == (torch.device("cpu"), expected)
    assert sample.resolve_device("cpu", "float32")[1] == torch.float32


def test_generation_stops_at_end_of_text(run_dir, capsys, monkeypatch):
    tokens = [encode(" one")[0], encode(" two")[0], EOT_ID, encode(" three")[0]]
    generate = sys.modules["architecture.generate"]  # the module: the package's `generate` is the function
    monkeypatch.setattr(generate, "generate_stream", lambda *args, **kwargs: (torch.tensor([[t]]) for t in tokens))
    out = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "zero")
    assert out.out == "zero one two\n" and out.err.startswith("2 tokens in")


def test_empty_prompt_and_too_long_prompt(run_dir, capsys, tmp_path):
    assert run_main(capsys, "--ckpt", str(run_dir), "--max-new-tokens", "3").err.startswith("3 tokens")
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text(TEXT)  # about 150 tokens, context_length is 64
    out = run_main(capsys, "--ckpt", str(run_dir), "--prompt-file", str(prompt_file), "--max-new-tokens", "3")
    assert f"the prompt has {len(encode(TEXT))} tokens; keeping its last 64" in out.err
    assert out.out.startswith(decode(encode(TEXT)[-64:]))


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad")
    (path / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, path / "other.pt")
    state = trained_state(gpt2_config())
    save_checkpoint({**state, "model_config": gpt2_config(hidden_dim=96).to_dict()}, path / "disagrees.pt")
    save_checkpoint({**state, "model_config": {**state["model_config"], "emb_dimm": 3}}, path / "badconfig.pt")
    small = gpt2_config(vocab_size=300)
    save_checkpoint({"model": Gemma3Model(small).state_dict(), "model_config": small.to_dict()}, path / "smallvocab.pt")
    (path / "empty_run").mkdir()
    return path


@pytest.mark.parametrize(
    "name, match",
    [
        ("missing.pt", "checkpoint not found"),
        ("empty_run", "holds no best.pt or latest.pt"),
        ("notes.txt", "not a readable checkpoint (truncated, another format, or holding objects other than tensors"),
        ("other.pt", "not a checkpoint of this project"),
        ("disagrees.pt", "model_config disagrees with the weights: blocks.0.mlp.gate_proj.weight is (64, 32), "),
        ("badconfig.pt", "unknown key 'emb_dimm'; did you mean 'emb_dim'?"),
        ("smallvocab.pt", "the model's vocab_size is 300 but its tokenizer (gpt2) has 50,257 tokens"),
    ],
)
def test_checkpoint_errors(bad_checkpoints, capsys, name, match):
    expect_error(capsys, match, "--ckpt", str(bad_checkpoints / name))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt-file", "nowhere.txt"], "prompt file not found: nowhere.txt"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nodevice"], "--device"),
    ],
)
def test_option_errors(run_dir, capsys, extra, match):
    expect_error(capsys, match, "--ckpt", str(run_dir), *extra)


def test_dtype_defaults_to_the_model_configs(run_dir, capsys, monkeypatch, tmp_path):
    """Without --dtype, the checkpoint's model config names the dtype; its bfloat16 means auto, the fastest to
    decode on this CPU class."""
    save_checkpoint(trained_state(gpt2_config(dtype="float16")), tmp_path / "best.pt")
    args = ["--max-new-tokens", "3"]
    assert "threads, float16)" in run_main(capsys, "--ckpt", str(tmp_path), *args).err
    assert "threads, float32)" in run_main(capsys, "--ckpt", str(tmp_path), *args, "--dtype", "float32").err
    for flags, int8, expected in [
        ({"avx2"}, [], "bfloat16"),
        ({"avx2"}, ["--int8"], "float32 + int8 weights"),
        ({"avx512f", "avx512_bf16"}, ["--int8"], "bfloat16 + int8 weights"),
    ]:
        monkeypatch.setattr(device, "cpu_flags", lambda flags=flags: flags)
        err = run_main(capsys, "--ckpt", str(run_dir), *args, *int8).err  # its config: bfloat16
        assert f"threads, {expected})" in err


def word_tokenizer(words: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_model = random_hf_model(tiny_config())
    hf_model.config.eos_token_id = [1, 2]
    hf_model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    words = ["<unk>", "<eos>", "<end>", "<stop>"] + [f"w{i}" for i in range(296)]
    word_tokenizer(words).save(str(path / "tokenizer.json"))
    return path


def test_hf_dir_generates_with_its_own_tokenizer_and_eos_ids(hf_dir, capsys):
    model, tokenizer = load_model(hf_dir)
    assert tokenizer.stop_ids == {1, 2, 3} and tokenizer.prompt_ids("w0 w5") == [4, 9]
    out = run_main(capsys, "--hf-dir", str(hf_dir), "--prompt", "w0 w5", "--max-new-tokens", "5")
    assert out.out.startswith("w0 w5") and "tokens/s" in out.err


def test_hf_dir_errors(hf_dir, capsys, tmp_path):
    expect_error(capsys, "is not a Hugging Face model directory (no config.json)", "--hf-dir", str(tmp_path / "none"))
    big = tmp_path / "big"
    big.mkdir()
    for name in ("config.json", "model.safetensors"):
        (big / name).write_bytes((hf_dir / name).read_bytes())
    expect_error(capsys, "no tokenizer.json, so the model's tokenizer is unknown", "--hf-dir", str(big))
    word_tokenizer(["<unk>"] + [f"w{i}" for i in range(400)]).save(str(big / "tokenizer.json"))
    expect_error(capsys, "the model's vocab_size is 300 but its tokenizer (tokenizer.json ", "--hf-dir", str(big))
    expect_error(capsys, "has 401 tokens; the model cannot read", "--ckpt", str(big))


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("sample.py", ["--ckpt", "nope"], "checkpoint not found: nope"),
        ("sample.py", ["--hf-dir", "nope"], "--hf-dir nope is not a Hugging Face model directory"),
        ("sample.py", ["--ckpt", "nope", "--top-k", "0"], "--top-k must be >= 1, got 0"),
        ("sample.py", ["--ckpt", "nope", "--threads", "0"], "--threads must be 1 to "),
        ("sample.py", ["--ckpt", "nope", "--threads", "100000"], "(4 x the CPU count), got 100000"),
        (
            "sample.py",
            ["--ckpt", "nope", "--num-samples", "1000000000"],
            "--num-samples must be 1 to 1000, got 1000000000",
        ),
        ("sample.py", ["--ckpt", ".", "--prompt-file", "nowhere.txt"], "prompt file not found: nowhere.txt"),
        ("sample.py", ["--ckpt", "nope", "--dtype", "int4"], "invalid choice: 'int4'"),
        ("scripts/export_hf.py", ["--ckpt", "nope", "--out", "exported/x"], "checkpoint not found: nope"),
        ("scripts/export_hf.py", ["--ckpt", ".", "--out", "README.md"], "--out README.md exists and is not a direc"),
        ("scripts/export_gguf.py", ["--hf-dir", "nope", "--out", "x.gguf"], "is not a Hugging Face model directory"),
        ("scripts/export_gguf.py", ["--ckpt", ".", "--out", "no/x.gguf"], "must be a file in an existing directory"),
        ("scripts/export_gguf.py", ["--ckpt", ".", "--out", "/dev/null", "--force"], "/dev/null is not a regular file"),
        ("scripts/plot_loss.py", ["nope"], "nope not found: pass a run's out_dir"),
        ("scripts/plot_loss.py", ["/dev/null"], "metrics file /dev/null is not a regular file; pass a run's out_dir"),
    ],
)
def test_bad_arguments_are_refused_before_torch_is_imported(script, args, message):
    """Importing torch takes seconds (tens on a busy machine): a typo is answered without it. `-X importtime` lists
    every module the process imported, so a torch line means the refusal waited for it."""
    command = [sys.executable, "-X", "importtime", script, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this tree's packages, wherever `pip install -e` points
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2 and message in errors[-1], result.stderr[-2000:]
    assert "torch" not in imported and "transformers" not in imported


def test_export_gguf_names_the_librarys_dtypes():
    """export_gguf.py names the GGUF types itself, to check --dtype before torch is imported; they are the same."""
    assert export_gguf.DTYPES == gguf_export.DTYPES


def sample_command(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "sample.py", "--device", "cpu", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def expect_one_line_refusal(result: subprocess.CompletedProcess, fragment: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_paths_and_values_that_are_not_what_they_look_like(tmp_path):
    """A prompt file that is a directory, a device, under a file or too long to name; a temperature that is not
    finite; a seed torch's generator cannot take: each one line, before torch is imported."""
    (tmp_path / "file").write_text("")
    cases = [
        (["--prompt-file", str(tmp_path)], f"prompt file {tmp_path} is a directory"),
        (["--prompt-file", "/dev/null"], "prompt file /dev/null is not a regular file"),
        (["--prompt-file", str(tmp_path / "file" / "p.txt")], f"cannot exist: {tmp_path / 'file'} is a file, not a"),
        (["--prompt-file", str(tmp_path / ("p" * 300))], "(File name too long)"),
        (["--temperature", "inf"], "--temperature must be >= 0 and finite, got inf"),
        (["--temperature", "nan"], "--temperature must be >= 0 and finite, got nan"),
        (["--seed", str(2**64)], "--seed must be in [0, 2**64 - 1], got 18446744073709551616"),
        (["--seed", "-5"], "--seed must be in [0, 2**64 - 1], got -5"),
    ]
    for args, fragment in cases:
        expect_one_line_refusal(sample_command("--ckpt", ".", *args), fragment)
    checkpoints = [  # --ckpt itself: too long to name, a device, under a file
        (str(tmp_path / ("c" * 300)), "cannot read checkpoint"),
        ("/dev/null", "checkpoint /dev/null is not a regular file"),
        (str(tmp_path / "file" / "c.pt"), f"checkpoint {tmp_path / 'file' / 'c.pt'} cannot exist: {tmp_path / 'file'}"),
    ]
    for ckpt, fragment in checkpoints:
        expect_one_line_refusal(sample_command("--ckpt", ckpt), fragment)


def test_too_many_new_tokens_are_refused_and_passing_the_context_is_noted(run_dir, capsys, tmp_path):
    """--max-new-tokens beyond 4 context lengths would run for hours (each token past the window re-reads all of
    it): refused once the model's context_length is known. A sample that passes context_length says so at the end."""
    too_many = sample_command("--ckpt", str(run_dir), "--max-new-tokens", str(10**12))
    expect_one_line_refusal(too_many, f"--max-new-tokens {10**12} is more than 4 x context_length (64)")
    short = run_main(capsys, "--ckpt", str(run_dir), "--prompt", "The model", "--max-new-tokens", "3")
    assert "context_length" not in short.err
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text(TEXT)
    long = run_main(capsys, "--ckpt", str(run_dir), "--prompt-file", str(prompt_file), "--max-new-tokens", "3")
    assert "note: prompt and sample reached 67 tokens, past context_length (64)" in long.err
