"""data/prepare.py on real files: round trip, meta counts, re-runs, errors, interruption, offline corpus."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from data.errors import DataError
from data.meta import read_meta
from data.prepare import ensure_prepared, main, prepare
from data.sources import default_name
from data.tokenizer import gpt2

REPO = Path(__file__).resolve().parent.parent
DOCS = [
    "Once upon a time there was a tokenizer.",
    "naïve café — 東京 🚀\n\ttabs  and   spaces\n",
    "a literal <|endoftext|> in user text stays text",
    "def f(x):\n    return x + 1\n",
] + [f"Document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(60)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Four .txt files (one document each) and a .jsonl file in a subfolder (one per line)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:4]):
        (root / f"{i}.txt").write_text(doc, encoding="utf-8")
    with open(root / "sub" / "rest.jsonl", "w", encoding="utf-8") as f:
        for doc in DOCS[4:]:
            f.write(json.dumps({"text": doc, "id": 0}) + "\n")
    return root


def documents(path: Path) -> list[str]:
    eot = gpt2().eos_id
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    assert len(tokens) == 0 or tokens[-1] == eot
    ends = np.flatnonzero(tokens == eot)
    starts = np.r_[0, ends[:-1] + 1]
    return [gpt2().decode(tokens[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def test_round_trip_and_meta(corpus, tmp_path):
    out = prepare(str(corpus), "tiny", data_root=tmp_path / "data", num_proc=2, val_fraction=0.25, progress=False)
    train, val = documents(out / "train.bin"), documents(out / "val.bin")
    assert train and val
    assert sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d in train]  # document order is kept within a split
    meta = read_meta(out)
    assert meta["tokenizer"] == {**gpt2().identity(), "origin": "gpt2"}
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == (out / "train.bin").stat().st_size // 2
    assert meta["val_tokens"] == (out / "val.bin").stat().st_size // 2
    assert meta["documents"] == len(DOCS)
    assert meta["source"]["kind"] == "files" and meta["source"]["files"] == 5


def test_split_does_not_depend_on_num_proc(corpus, tmp_path):
    a = prepare(str(corpus), "a", data_root=tmp_path, num_proc=1, val_fraction=0.25, progress=False)
    b = prepare(str(corpus), "b", data_root=tmp_path, num_proc=2, val_fraction=0.25, progress=False)
    for split in ("train.bin", "val.bin"):
        assert (a / split).read_bytes() == (b / split).read_bytes()


def test_rerun_is_a_noop_until_source_changes(corpus, tmp_path, capsys):
    def run(**kw):
        return prepare(str(corpus), "tiny", data_root=tmp_path, num_proc=1, val_fraction=0.25, progress=False, **kw)

    out = run()
    stamp = (out / "meta.json").stat().st_mtime_ns
    run()
    assert "already prepared" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    run(force=True)
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    stamp = (out / "meta.json").stat().st_mtime_ns
    (corpus / "new.txt").write_text("one more document")
    run()
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    assert read_meta(out)["documents"] == len(DOCS) + 1


def test_pydocs_prepares_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = ensure_prepared("pydocs", gpt2(), data_root=tmp_path)
    meta = read_meta(out)
    assert meta["source"]["kind"] == "pydocs" and meta["train_tokens"] > 50_000 and meta["val_tokens"] > 1_000
    assert "Boolean operations" in "".join(documents(out / "train.bin") + documents(out / "val.bin"))


def test_invalid_utf8_is_replaced_in_jsonl_as_in_txt(corpus, tmp_path):
    with open(corpus / "sub" / "rest.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9 latin-1"}\n')  # not UTF-8
    (corpus / "4.txt").write_bytes(b"na\xefve latin-1")
    out = prepare(str(corpus), "bad", data_root=tmp_path / "data", num_proc=1, val_fraction=0.25, progress=False)
    docs = documents(out / "train.bin") + documents(out / "val.bin")
    assert "caf\ufffd latin-1" in docs and "na\ufffdve latin-1" in docs


def test_unknown_dataset_not_prepared(tmp_path):
    with pytest.raises(DataError, match="python data/prepare.py"):
        ensure_prepared("mystery", gpt2(), data_root=tmp_path)


def test_bad_inputs_are_data_errors(corpus, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no .txt, .jsonl or .json files"):
        prepare(str(tmp_path / "nothing" / "*.txt"), data_root=tmp_path, progress=False)
    with pytest.raises(DataError, match="no string field 'body'"):
        prepare(str(corpus), "x", data_root=tmp_path, text_field="body", num_proc=1, progress=False)
    assert not (tmp_path / "x" / "train.bin.tmp").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="pydocs"):
        prepare("nobody-here/no-such-dataset", data_root=tmp_path, num_proc=1, progress=False)
    assert time.perf_counter() - start < 30


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.txt"), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no .txt, .jsonl or .json files") and err.count("\n") == 1


def test_first_line_says_what_prepare_does(corpus, tmp_path, monkeypatch, capsys):
    """Offline, a Hugging Face source says it looks in the local cache and fails, without claiming to tokenize; a
    source that opens is named in the tokenizing line; a source that fails leaves the old dataset as it was."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["nobody-here/no-such-dataset", "--data-root", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "loading nobody-here/no-such-dataset (split train) from the local cache alone (offline)\n"
    assert err.startswith("error: cannot load Hugging Face dataset 'nobody-here/no-such-dataset'")
    tiny = ["--name", "tiny", "--data-root", str(tmp_path), "--num-proc", "1", "--val-fraction", "0.25"]
    assert main([str(corpus), *tiny]) == 0
    assert capsys.readouterr().out.startswith(f"tokenizing {corpus} into {tmp_path / 'tiny'} with ")
    meta = read_meta(tmp_path / "tiny")
    assert main([str(corpus), *tiny, "--text-field", "body", "--force"]) == 2
    assert "no string field 'body'" in capsys.readouterr().err
    assert read_meta(tmp_path / "tiny") == meta


def test_default_names():
    assert default_name("pydocs") == "pydocs"
    assert default_name("HuggingFaceFW/fineweb-edu") == "fineweb-edu"
    assert default_name("books/*.txt") == "books"
    assert default_name("notes.jsonl") == "notes"


def test_killed_prepare_leaves_nothing_valid(tmp_path):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog, again and again. " * 8}) + "\n"
    big.write_text(line * 20_000)  # ~10 MB: seconds of tokenizing, so the kill lands mid-run
    cmd = [sys.executable, "data/prepare.py", str(big), "--name", "big", "--data-root", str(tmp_path)]
    out = tmp_path / "big"
    proc = subprocess.Popen([*cmd, "--num-proc", "1"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ((out / "train.bin.tmp").exists() and (out / "train.bin.tmp").stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any((out / f).exists() for f in ("train.bin", "val.bin", "meta.json"))
    with pytest.raises(DataError, match="incomplete"):
        read_meta(out)
    done = subprocess.run([*cmd, "--num-proc", "2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    meta = read_meta(out)
    assert meta["documents"] == 20_000
    assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert not list(out.glob("*.tmp"))


def test_large_vocabulary_gets_uint32_files(tmp_path):
    """A tokenizer past 65,536 ids (Gemma has 262,144) writes uint32 token files that read back as its ids."""
    words = [f"w{i}" for i in range(70_000)]
    backend = Tokenizer(models.WordLevel({"<eos>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "corpus.jsonl"
    docs = [" ".join(words[i::6_000]) for i in range(20)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare(
        str(corpus),
        "big",
        tokenizer=tmp_path / "tokenizer.json",
        data_root=tmp_path,
        val_fraction=0.3,
        num_proc=1,
        progress=False,
    )
    meta = read_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001 and meta["tokenizer"]["bos_id"] is None
    tokens = np.concatenate([np.fromfile(out / f"{s}.bin", dtype="<u4") for s in ("train", "val")])
    expected = [int(w[1:]) + 1 for d in docs for w in d.split()] + [0] * len(docs)  # the words, and an eos each
    assert tokens.max() > 65_535 and sorted(tokens.tolist()) == sorted(expected)


def prepare_command(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "data/prepare.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_num_proc_and_data_root_refusals_are_one_line(corpus, tmp_path):
    """--num-proc outside 1..4 x the CPUs (100,000 once tried to start that many processes), and a --data-root
    under a file or too long to name: one line, exit 2, nothing written."""
    (tmp_path / "file").write_text("")
    limit = 4 * (os.cpu_count() or 1)
    cases = [
        (["--num-proc", "0"], f"--num-proc must be 1 to {limit} (4 x the CPU count), got 0"),
        (["--num-proc", "-3"], f"--num-proc must be 1 to {limit} (4 x the CPU count), got -3"),
        (["--num-proc", "100000"], f"--num-proc must be 1 to {limit} (4 x the CPU count), got 100000"),
        (
            ["--num-proc", "1", "--data-root", str(tmp_path / "file")],
            f"cannot create {tmp_path / 'file' / 'c'} (Not a directory)",
        ),
        (["--num-proc", "1", "--data-root", str(tmp_path / ("r" * 300))], "(File name too long); nothing was written"),
    ]
    for args, fragment in cases:
        result = prepare_command(str(corpus), "--name", "c", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "file"]
