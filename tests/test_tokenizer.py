"""GPT-2 tokenizer: known ids, round trips, special-token handling, and offline resolution."""

import hashlib
import shutil

import pytest

from data import tokenizer
from data.errors import DataError
from data.tokenizer import EOT_ID, VOCAB_SIZE, decode, encode, get_tokenizer


@pytest.fixture
def fresh_tokenizer(monkeypatch, tmp_path):
    """get_tokenizer() resolved from scratch, with an empty tiktoken cache and no explicit file."""
    monkeypatch.delenv("GPT2_TIKTOKEN_FILE", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def test_known_gpt2_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode(" the") == [262]
    assert decode([15496, 995]) == "Hello world"


def test_vocab_and_eot():
    enc = get_tokenizer()
    assert enc.n_vocab == VOCAB_SIZE == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert decode([EOT_ID]) == "<|endoftext|>"


@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café — 東京 🚀\n\ttabs  and   spaces\n", "x = f(1)\n"])
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_special_token_text_is_ordinary():
    ids = encode("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert decode(ids) == "a<|endoftext|>b"


def test_whisper_asset_matches_tiktoken_pin():
    path = tokenizer._whisper_ranks_file()
    assert path is not None, "run: pip install --no-deps openai-whisper==20250625"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer.RANKS_SHA256


def test_corrupted_ranks_file_is_a_clear_error(fresh_tokenizer, monkeypatch, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tokenizer._whisper_ranks_file().read_bytes()[:-100])
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(bad))
    with pytest.raises(DataError, match="sha256") as e:
        get_tokenizer()
    assert str(bad) in str(e.value)


def test_explicit_ranks_file(fresh_tokenizer, monkeypatch, tmp_path):
    copy = tmp_path / "r50k_base.tiktoken"
    shutil.copy(tokenizer._whisper_ranks_file(), copy)
    monkeypatch.setenv("GPT2_TIKTOKEN_FILE", str(copy))
    assert get_tokenizer().encode_ordinary("Hello world") == [15496, 995]


def test_tiktoken_cache_is_used_first(fresh_tokenizer, monkeypatch, tmp_path):
    cached = tokenizer._tiktoken_cache_file()
    cached.parent.mkdir(parents=True)
    shutil.copy(tokenizer._whisper_ranks_file(), cached)
    monkeypatch.setattr(tokenizer, "_whisper_ranks_file", lambda: None)
    monkeypatch.setattr(tokenizer, "host_reachable", lambda *a, **k: pytest.fail("probed the network"))
    enc = get_tokenizer()
    assert enc.name == "r50k_base" and enc.encode_ordinary("Hello world") == [15496, 995]


def test_no_source_offline_says_how_to_fix(fresh_tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "_whisper_ranks_file", lambda: None)
    monkeypatch.setattr(tokenizer, "host_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match="openai-whisper==20250625"):
        get_tokenizer()
