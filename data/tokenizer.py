"""The GPT-2 tokenizer (tiktoken's r50k_base: 50,257 ids, `<|endoftext|>` = 50256), offline.

Design choices:
- tiktoken does the BPE; this module only finds its ranks file. tiktoken alone would download
  it on first use and, without network, retry for a long time; training machines, CI and
  air-gapped clusters often have no network.
- Where the ranks come from, first match wins, and none of the first three touches the network:
  1. `GPT2_TIKTOKEN_FILE`, when set: an explicit choice beats anything found implicitly;
  2. tiktoken's own cache, when an earlier run on this machine downloaded r50k_base;
  3. the copy inside the `openai-whisper` sdist (`pip install --no-deps openai-whisper==20250625`),
     found with `importlib.util.find_spec` because importing whisper needs its heavy deps;
  4. tiktoken's download, only if its host answers a 2 s connection probe.
- Every file is checked against the sha256 tiktoken pins for r50k_base, so a wrong or corrupted
  file is an error naming the file, never a silently different tokenizer.
- Text is encoded as ordinary text: a user string "<|endoftext|>" becomes ordinary tokens, so only
  the pipeline itself inserts the document separator.
"""

import functools
import hashlib
import importlib.util
import os
import socket
import tempfile
import threading
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from data.errors import DataError

NAME = "gpt2"
VOCAB_SIZE = 50257
EOT_ID = 50256
EOT = "<|endoftext|>"
RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SETUP_HINT = (
    "run `pip install --no-deps openai-whisper==20250625` (it ships the GPT-2 ranks) "
    f"or set GPT2_TIKTOKEN_FILE to a copy of r50k_base.tiktoken (sha256 {RANKS_SHA256})"
)


def host_reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to host opens within timeout seconds."""

    # DNS resolution ignores socket timeouts and can block for much longer, so the probe runs
    # in a daemon thread that is abandoned if it has not answered in time.
    result = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _tiktoken_cache_file() -> Path | None:
    # Mirrors tiktoken.load.read_file_cached, which keys its cache by the sha1 of the URL.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # tiktoken's switch for "no cache"
        return None
    return Path(cache_dir) / hashlib.sha1(RANKS_URL.encode()).hexdigest()


def _whisper_ranks_file() -> Path | None:
    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    return path if path.is_file() else None


def _sha256_ok(path: Path) -> bool:
    return hashlib.sha256(path.read_bytes()).hexdigest() == RANKS_SHA256


def _encoding_from_file(path: Path) -> tiktoken.Encoding:
    if not _sha256_ok(path):
        raise DataError(
            f"GPT-2 ranks file {path} has the wrong sha256 (expected {RANKS_SHA256}); "
            f"it is corrupted or not r50k_base: replace it, or {SETUP_HINT}"
        )
    return tiktoken.Encoding(
        name=NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(path), RANKS_SHA256),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding; raises DataError saying how to fix it when no ranks can be found."""
    if explicit := os.environ.get("GPT2_TIKTOKEN_FILE"):
        if not Path(explicit).is_file():
            raise DataError(f"GPT2_TIKTOKEN_FILE={explicit} does not exist; {SETUP_HINT}")
        return _encoding_from_file(Path(explicit))
    cached = _tiktoken_cache_file()
    if cached is not None and cached.is_file() and _sha256_ok(cached):
        return tiktoken.get_encoding("r50k_base")
    if bundled := _whisper_ranks_file():
        return _encoding_from_file(bundled)
    if host_reachable(RANKS_URL.split("/")[2]):
        return tiktoken.get_encoding("r50k_base")
    raise DataError(f"no GPT-2 tokenizer ranks on this machine and no network to fetch them: {SETUP_HINT}")


def encode(text: str) -> list[int]:
    """GPT-2 ids of text; special-token strings in it are encoded as ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    """Text of GPT-2 ids (`<|endoftext|>` for id 50256)."""
    return get_tokenizer().decode(ids)
