"""Tokenizers: GPT-2 from the shipped ranks (exactly tiktoken's ids, no network), Hugging Face tokenizer.json files,
identities, separators, and every refusal."""

import hashlib
import inspect
import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken_ext.openai_public
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from data import tokenizer as tokenizer_module
from data.errors import DataError
from data.tokenizer import GPT2_RANKS, HFTokenizer, gpt2, load_tokenizer, tokenizer_from_record
from training.trainer import target_bytes

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


# --- bytes per token, for bits per byte ---------------------------------------------------------------------------

BYTE_TEXTS = [
    "naïve café — 東京 🚀",
    "emoji 👩‍👩‍👧 flags 🇫🇷 and ½ ∑ Ω",
    "  two leading and two trailing spaces  ",
    " one each side ",
    "\n\nnewlines first\r\n\tthen a tab and last\n",
    "the theme: the café",
    "",
    " ",
]


def sentencepiece_like(dummy_prefix: bool = False) -> HFTokenizer:
    """Gemma 3's tokenizer.json in small: spaces normalized to `▁`, a BPE over characters with byte fallback for the
    rest (`<0xNN>`: CJK and emoji here), Gemma's decoder. `dummy_prefix`: Llama's instead, which puts a `▁` before
    the first piece (a Prepend normalizer) and strips it when decoding."""
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "▁"), ("c", "a"), ("ca", "f"), ("caf", "é")]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3} | {f"<0x{b:02X}>": 4 + b for b in range(256)}
    for piece in ["▁", "\n", *string.ascii_letters, *string.digits, *string.punctuation, "é", "ï", "—"]:
        vocab[piece] = len(vocab)
    for merge in merges:
        vocab["".join(merge)] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    spaces = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if dummy_prefix else spaces
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * dummy_prefix)
    backend.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return HFTokenizer(backend.to_str(), "sentencepiece-like", {"bos_id": 2, "eos_id": 1, "stop_ids": [1]})


def byte_level_bpe() -> HFTokenizer:
    """A byte-level BPE tokenizer.json (GPT-2's spelling of bytes as characters) with one merge and an `<eos>`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"Ġt": 256, "<eos>": 257}
    backend = Tokenizer(models.BPE(vocab, [("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    return HFTokenizer(backend.to_str(), "byte-level", {"bos_id": None, "eos_id": 257, "stop_ids": [257]})


def stream_bytes(tokenizer, text: str) -> int:
    """The bytes evaluation counts for `text` as one document of a packed stream: its targets after the previous
    document's last token (eos), through its own eos."""
    stream = torch.tensor([tokenizer.eos_id] + tokenizer.document_ids(text))
    table = torch.tensor(tokenizer.token_bytes())
    return target_bytes(stream[:-1], stream[1:], table, tokenizer).sum().item()


@pytest.mark.parametrize(
    "make", [gpt2, sentencepiece_like, byte_level_bpe, lambda: sentencepiece_like(dummy_prefix=True)]
)
def test_token_bytes_add_up_to_the_texts_bytes(make):
    """Whatever the tokenizer, a text's targets count exactly its UTF-8 bytes: special tokens none, `▁` one space,
    `<0xNN>` one byte, a byte-level character one byte. A dummy prefix (Llama's `▁` before the first piece, which
    the text did not have and decoding strips) is not the text's: the target after a document start loses it."""
    tokenizer = make()
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size and table[tokenizer.eos_id] == 0 and tokenizer.token_bytes() is table
    texts = BYTE_TEXTS + varied_strings()[-12:]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text  # lossless, so its bytes are the text's
        assert stream_bytes(tokenizer, text) == len(text.encode()), text
        assert sum(table[i] for i in ids) == len(text.encode()) + (tokenizer.dummy_prefix and bool(text)), text
    if isinstance(tokenizer, HFTokenizer) and tokenizer.backend.model.byte_fallback:
        ids = tokenizer.encode("a東")[-3:]  # not in the vocabulary: three byte pieces
        assert ids == [tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in "東".encode()]
        assert [table[i] for i in ids] == [1, 1, 1] and table[tokenizer.backend.token_to_id("▁")] == 1


def test_ignored_targets_count_no_bytes():
    tokenizer = gpt2()
    y = torch.tensor(tokenizer.encode(" café 東京"))
    masked = y.clone()
    masked[::2] = -100  # IGNORE_INDEX
    counts = target_bytes(y, masked, torch.tensor(tokenizer.token_bytes()), tokenizer)
    assert counts[::2].tolist() == [0] * len(y[::2])
    assert counts.sum() == len(tokenizer.encoding.decode_bytes(y[1::2].tolist()))
