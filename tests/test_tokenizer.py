"""Tokenizers: GPT-2 from the shipped ranks (exactly tiktoken's ids, no network), Hugging Face tokenizer.json files,
identities, separators, and every refusal."""

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken_ext.openai_public
from tokenizers import Tokenizer, models, pre_tokenizers

from data import tokenizer as tokenizer_module
from data.errors import DataError
from data.tokenizer import GPT2_RANKS, gpt2, load_tokenizer, tokenizer_from_record

REPO = Path(__file__).resolve().parent.parent
# Ids of tiktoken's r50k_base, recorded from tiktoken.get_encoding("r50k_base").
KNOWN_IDS = {"Hello world": [15496, 995], " the": [262], "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29]}


def varied_strings() -> list[str]:
    """A few hundred strings: prose and code from pydocs, Unicode, whitespace runs, digits, contractions."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))[:60_000]
    pieces = [text[i : i + 200] for i in range(0, len(text), 200)]
    pieces += [
        "naïve café — 東京 🚀",
        "emoji 👩‍👩‍👧 flags 🇫🇷",
        "\t\t  \n\n\n   x",
        "12345 3.14159 1e-9",
        "don't I'm we'll",
    ]
    pieces += ["Ünïcödé " * 3, "def f(x):\n    return x**2\n", "    " * 10, "a" * 300, "\u200b\u00a0zero-width"]
    return pieces


def test_shipped_ranks_are_tiktokens_r50k_base():
    # The hash tiktoken itself pins for r50k_base, read from its source rather than copied here.
    pinned = inspect.getsource(tiktoken_ext.openai_public.r50k_base)
    digest = hashlib.sha256(GPT2_RANKS.read_bytes()).hexdigest()
    assert digest in pinned and digest == tokenizer_module.GPT2_RANKS_SHA256


def test_gpt2_ids_without_network(tmp_path):
    """A fresh process where every connection fails gets exactly tiktoken's own r50k_base ids from the shipped
    file. tiktoken's encoding reads the same file, placed where its cache would hold the download."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(GPT2_RANKS.read_bytes())
    strings = varied_strings()
    assert len(strings) > 300
    script = """
import json, socket, sys
def refuse(*a, **k):
    raise OSError("network disabled in this test")
socket.socket.connect = socket.create_connection = refuse
import tiktoken
from data.tokenizer import load_tokenizer
ours, theirs = load_tokenizer("gpt2"), tiktoken.get_encoding("r50k_base")
strings = json.load(sys.stdin)
print(json.dumps([[ours.encode(s), theirs.encode_ordinary(s)] for s in strings]))
"""
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        input=json.dumps(strings),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    for text, (ours, theirs) in zip(strings, json.loads(result.stdout), strict=True):
        assert ours == theirs, text
    assert {text: gpt2().encode(text) for text in KNOWN_IDS} == KNOWN_IDS


def test_gpt2_interface():
    t = gpt2()
    assert (t.vocab_size, t.bos_id, t.eos_id, t.stop_ids) == (50257, None, 50256, {50256})
    assert t.decode([50256]) == "<|endoftext|>"
    assert t.encode("a<|endoftext|>b") == t.encode("a") + t.encode("<|endoftext|>") + t.encode("b")
    assert 50256 not in t.encode("a<|endoftext|>b")  # user text never makes the separator
    assert t.document_ids("Hello world") == [15496, 995, 50256]
    assert t.prompt_ids("Hello world") == [15496, 995] and t.prompt_ids("") == [50256]
    text = "naïve café — 東京 🚀\n\ttabs  and   spaces\n"
    assert t.decode(t.encode(text)) == text
    assert str(t) == "gpt2" and tokenizer_from_record(t.record()) is t


def test_damaged_ranks_file_is_a_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(GPT2_RANKS.read_bytes()[:-100])
    monkeypatch.setattr(tokenizer_module, "GPT2_RANKS", bad)
    with pytest.raises(DataError, match="missing or damaged") as e:
        tokenizer_module.GPT2Tokenizer()
    assert str(bad) in str(e.value) and "git checkout" in str(e.value)


def gemma_like(directory: Path, words: int = 50, config: dict | None = None) -> Path:
    """A WordLevel tokenizer.json with Gemma's special tokens first, and a tokenizer_config.json naming them."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}} if config is None else config
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_hugging_face_tokenizer(tmp_path):
    directory = gemma_like(tmp_path / "tok")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    t = load_tokenizer(directory)
    assert (t.kind, t.vocab_size, t.bos_id, t.eos_id, t.stop_ids) == ("huggingface", 54, 2, 1, {1, 3})
    assert t.encode("w0 w5") == [4, 9] and t.document_ids("w0 w5") == [2, 4, 9, 1] and t.prompt_ids("") == [2]
    assert t.identity()["sha256"] == hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    assert load_tokenizer(directory / "tokenizer.json").identity() == t.identity()  # the file or its directory
    rebuilt = tokenizer_from_record(json.loads(json.dumps(t.record())))  # what a checkpoint stores
    assert rebuilt.identity() == t.identity() and rebuilt.stop_ids == t.stop_ids and rebuilt.encode("w3") == [7]
    assert str(t).startswith(f"tokenizer.json {t.sha256[:12]} (54 ids, from {directory}")


def test_special_tokens_past_the_vocabulary_do_not_count(tmp_path):
    directory = gemma_like(tmp_path / "tok")
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_special_tokens(["<image_soft_token>"])  # as Gemma 3's: id 54, never produced by text
    backend.save(str(directory / "tokenizer.json"))
    assert load_tokenizer(directory).vocab_size == 54


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "holds no tokenizer.json"),
        (lambda d: (d / "x.json").write_text("{not json") and d / "x.json", "is not a tokenizer.json"),
        (lambda d: gemma_like(d / "noeos", config={}) and _drop_eos(d / "noeos"), "end-of-sequence"),
    ],
    ids=["missing", "no-file", "not-a-tokenizer", "no-eos"],
)
def test_bad_tokenizer_paths(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        load_tokenizer(make(tmp_path))


def _drop_eos(directory: Path) -> Path:
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k != "<eos>"}
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<eos>"]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory
