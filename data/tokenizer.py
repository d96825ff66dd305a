"""Tokenizers behind one small interface: GPT-2 (tiktoken, the default) or a Hugging Face `tokenizer.json`.

    load_tokenizer("gpt2")                         # GPT-2's 50,257 ids, from the ranks shipped in data/assets/
    load_tokenizer("path/to/gemma-3-270m")         # a model directory's tokenizer.json (or the file itself)
    tokenizer_from_record(checkpoint["tokenizer"]) # the tokenizer a checkpoint carries

Design choices:
- GPT-2's BPE ranks ship with the repository (`data/assets/gpt2.tiktoken`, see its README for origin and license)
  and are sha256-checked against the hash tiktoken pins for r50k_base: no network, no download, no cache, and a
  damaged file is an error naming it, never a silently different tokenizer.
- A Hugging Face tokenizer is the `tokenizers` library's `tokenizer.json`. Its bos/eos tokens come from
  `tokenizer_config.json` beside it (as transformers reads them), else from the usual names (`<bos>`, `<eos>`...),
  else (eos) from the model's config.json; generation also stops at the model's other eos ids (Gemma's
  `<end_of_turn>`).
- The identity of a tokenizer is (kind, vocab size, sha256 of its file, bos and eos ids): datasets record it in
  meta.json, checkpoints with the whole file, and two tokenizers are the same when their identities are equal.
- Text is encoded as ordinary text: a user string such as "<|endoftext|>" or "<eos>" becomes ordinary tokens, so
  only the pipeline inserts control tokens. Documents get the separators the tokenizer's models were trained with:
  `[bos] + text + [eos]`, which is text + `<|endoftext|>` for GPT-2 (no bos) and `<bos>` text `<eos>` for Gemma.
- `vocab_size` is one more than the largest id encoding can produce: special tokens past the base vocabulary
  that ordinary text never yields (Gemma's image token) do not count, so they need no embedding row.
- `token_bytes()` is each id's UTF-8 byte count in decoded text, the denominator of bits per byte (the loss figure
  that compares models with different tokenizers): special tokens count 0, a SentencePiece `▁` one space byte, a
  byte-fallback piece `<0xNN>` one byte, a byte-level BPE character one byte. A tokenizer that puts a `▁` before a
  document's first piece and strips it when decoding (Llama's; not Gemma's) says so in `dummy_prefix`: that byte is
  not the text's, and `training.trainer.target_bytes` leaves it out.
"""

import base64
import functools
import hashlib
import json
import re
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from data.errors import DataError

GPT2_RANKS = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base pin
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
IDENTITY_KEYS = ("kind", "vocab_size", "sha256", "bos_id", "eos_id")
GPT2_IDENTITY = {
    "kind": "gpt2",
    "vocab_size": GPT2_EOT_ID + 1,
    "sha256": GPT2_RANKS_SHA256,
    "bos_id": None,
    "eos_id": GPT2_EOT_ID,
}
BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>")
EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")
USAGE = "use gpt2, a tokenizer.json, or a Hugging Face model directory that holds one"


class Tokenizer:
    """What prepare, training, sampling and export need of a tokenizer; see GPT2Tokenizer and HFTokenizer."""

    kind: str
    vocab_size: int
    sha256: str
    bos_id: int | None  # prepended to every document and prompt, when the tokenizer has one
    eos_id: int  # appended to every document
    stop_ids: frozenset[int]  # generation stops at any of these
    origin: str  # what it was loaded from: "gpt2" or a path, for messages and fix commands
    dummy_prefix: bool = False  # encoding adds a `▁` before a document's first piece that decoding removes
    _token_bytes: list[int] | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def special_id(self, text: str) -> int | None:
        """The id of the special (control) token spelled `text`, such as Gemma's `<end_of_turn>`; None if none."""
        return None

    def token_bytes(self) -> list[int]:
        """The UTF-8 bytes each id stands for in decoded text, indexed by id (0 for special tokens); computed once."""
        if self._token_bytes is None:
            self._token_bytes = self._count_token_bytes()
        return self._token_bytes

    def _count_token_bytes(self) -> list[int]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What makes two tokenizers the same: meta.json and checkpoints record it."""
        return {key: getattr(self, key) for key in IDENTITY_KEYS}

    def record(self) -> dict:
        """The identity plus what rebuilds the tokenizer anywhere: what a checkpoint stores."""
        return {**self.identity(), "origin": self.origin, "stop_ids": sorted(self.stop_ids)}

    def document_ids(self, text: str) -> list[int]:
        """A document's ids with its separators, as a dataset stores it."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text) + [self.eos_id]

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's ids, starting like a document; an empty GPT-2 prompt starts after an `<|endoftext|>`."""
        if self.bos_id is not None:
            return [self.bos_id] + self.encode(text)
        return self.encode(text) or [self.eos_id]

    def __str__(self) -> str:
        return describe(self.identity(), self.origin)


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (tiktoken's r50k_base), from the shipped ranks file."""

    origin, stop_ids = "gpt2", frozenset({GPT2_EOT_ID})

    def __init__(self) -> None:
        for key, value in GPT2_IDENTITY.items():
            setattr(self, key, value)
        data = GPT2_RANKS.read_bytes() if GPT2_RANKS.is_file() else b""
        if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
            raise DataError(
                f"{GPT2_RANKS} is missing or damaged (sha256 is not r50k_base's {GPT2_RANKS_SHA256}); "
                "restore it with: git checkout -- data/assets/gpt2.tiktoken"
            )
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOT: GPT2_EOT_ID},
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def _count_token_bytes(self) -> list[int]:
        return [len(self.encoding.decode_single_token_bytes(i)) for i in range(GPT2_EOT_ID)] + [0]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the official Gemma 3's, or any other), through the `tokenizers` library."""

    kind = "huggingface"

    def __init__(
        self, json_text: str, origin: str, special: dict | None = None, config_text: str | None = None
    ) -> None:
        """`special`: bos_id, eos_id and stop_ids as recorded, else read from the files beside `origin`;
        `config_text`: the tokenizer_config.json that came with it (its chat template, ...), kept for export."""
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.backend = RustTokenizer.from_str(json_text)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise DataError(f"{origin} is not a tokenizer.json the tokenizers library reads ({e}); {USAGE}") from None
        self.backend.encode_special_tokens = True  # special-token strings in text stay text
        self.json_text, self.origin, self.config_text = json_text, origin, config_text
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()
        special = special or _special_ids_beside(self.backend, Path(origin), config_text)
        self.bos_id, self.eos_id = special["bos_id"], special["eos_id"]
        self.stop_ids = frozenset(special["stop_ids"]) | {self.eos_id}
        emitted = [i for i, t in self.backend.get_added_tokens_decoder().items() if not t.special]
        base = self.backend.get_vocab_size(with_added_tokens=False)
        self.vocab_size = max(base - 1, self.eos_id, self.bos_id or 0, *emitted) + 1
        self.dummy_prefix = any(map(_strips_leading_space, _decoder_steps(self.backend)))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def special_id(self, text: str) -> int | None:
        found = [i for i, t in self.backend.get_added_tokens_decoder().items() if t.special and t.content == text]
        return found[0] if found else None

    def _count_token_bytes(self) -> list[int]:
        # A byte-level BPE spells each byte as one character; a SentencePiece BPE spells a space as `▁`.
        byte_level = any(step["type"] == "ByteLevel" for step in _decoder_steps(self.backend))
        byte_fallback = getattr(self.backend.model, "byte_fallback", False)
        added = self.backend.get_added_tokens_decoder()
        counts = [0] * self.vocab_size
        for piece, i in self.backend.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or (i in added and added[i].special):
                continue
            if i in added:  # an added token's content is its text, whatever the model's spelling
                counts[i] = len(piece.encode())
            elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                counts[i] = 1
            else:
                counts[i] = len(piece) if byte_level else len(piece.replace("▁", " ").encode())
        return counts

    def record(self) -> dict:
        return {**super().record(), "tokenizer_json": self.json_text, "tokenizer_config": self.config_text}


def _decoder_steps(backend) -> list[dict]:
    """The tokenizer's decoder as tokenizer.json writes it, a Sequence flattened into its steps."""
    steps = [json.loads(backend.decoder.__getstate__())] if backend.decoder is not None else []
    while any(step["type"] == "Sequence" for step in steps):
        steps = [part for step in steps for part in (step["decoders"] if step["type"] == "Sequence" else [step])]
    return steps


def _strips_leading_space(step: dict) -> bool:
    """Whether a decoder step drops the `▁` that encoding put before the first piece: a Strip of a leading space
    (Llama's converted SentencePiece) or a Metaspace that prepends one."""
    if step["type"] == "Strip":
        return step.get("start", 0) > 0
    scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space") else "never")
    return step["type"] == "Metaspace" and scheme != "never"


def _token_name(value) -> str | None:
    """A token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _ids(value) -> set[int]:
    return set() if value is None else {value} if isinstance(value, int) else set(value)


def _special_ids_beside(backend, path: Path, config_text: str | None) -> dict:
    """bos / eos / stop ids from the tokenizer's tokenizer_config.json (`config_text`, as load_tokenizer read it),
    and from config.json and generation_config.json next to `path`."""
    directory = path if path.is_dir() else path.parent
    configs = {}
    for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
        try:
            text = config_text if name == "tokenizer_config.json" else (directory / name).read_text()
            configs[name] = json.loads(text) if text is not None else {}
        except (OSError, ValueError):
            configs[name] = {}

    def find(key: str, names: tuple[str, ...]) -> int | None:
        for name in (_token_name(configs["tokenizer_config.json"].get(key)), *names):
            if name is not None and backend.token_to_id(name) is not None:
                return backend.token_to_id(name)
        return None

    model_eos = [_ids(configs[name].get("eos_token_id")) for name in ("config.json", "generation_config.json")]
    eos_id = find("eos_token", EOS_NAMES)
    if eos_id is None and any(model_eos):
        eos_id = min(next(ids for ids in model_eos if ids))
    if eos_id is None:
        raise DataError(
            f"{path}: cannot tell the tokenizer's end-of-sequence token; put a tokenizer_config.json with "
            f'"eos_token" beside it (or give the tokenizer one of {", ".join(EOS_NAMES)})'
        )
    stop_ids = {eos_id}.union(*model_eos)
    return {"bos_id": find("bos_token", BOS_NAMES), "eos_id": eos_id, "stop_ids": sorted(stop_ids)}


@functools.cache
def gpt2() -> GPT2Tokenizer:
    """The GPT-2 tokenizer, loaded once per process."""
    return GPT2Tokenizer()


def load_tokenizer(spec: str | Path = "gpt2") -> Tokenizer:
    """`gpt2`, a `tokenizer.json`, or a directory holding one; a DataError naming the problem otherwise."""
    if str(spec) == "gpt2":
        return gpt2()
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise DataError(f"tokenizer {path} does not exist; {USAGE}")
    if not file.is_file():
        raise DataError(f"{path} holds no tokenizer.json; {USAGE}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not a tokenizer.json ({e}); {USAGE}") from None
    config_file = file.parent / "tokenizer_config.json"
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    return HFTokenizer(text, str(path), config_text=config_text)


def tokenizer_from_record(record: dict | str | None) -> Tokenizer:
    """The tokenizer a checkpoint carries (`Tokenizer.record()`); older checkpoints that name none (or "gpt2") mean
    GPT-2."""
    if record is None or record == "gpt2" or (isinstance(record, dict) and record.get("kind") == "gpt2"):
        return gpt2()
    if not isinstance(record, dict) or "tokenizer_json" not in record:
        raise DataError(f"unknown tokenizer record {str(record)[:80]!r}: expected gpt2 or a tokenizer.json")
    tokenizer = HFTokenizer(record["tokenizer_json"], record["origin"], record, record.get("tokenizer_config"))
    if tokenizer.identity() != {key: record[key] for key in IDENTITY_KEYS}:
        raise DataError(f"the recorded tokenizer from {record['origin']} does not rebuild to the recorded identity")
    return tokenizer


def document_start(bos_id: int | None, eos_id: int | None) -> int | None:
    """The id that starts a document in token files: the tokenizer's bos (Gemma's `<bos>`, before every document),
    else its eos (GPT-2's `<|endoftext|>`, after every document and so before the next, the role nanoGPT and
    nanochat give it)."""
    return eos_id if bos_id is None else bos_id


def identity_of(record: dict | str | None) -> dict:
    """The identity in a meta.json or checkpoint record; older files that name none (or "gpt2") mean GPT-2."""
    if record is None or record == "gpt2":
        return dict(GPT2_IDENTITY)
    return {key: record.get(key) for key in IDENTITY_KEYS}


def describe(identity: dict, origin: str | None = None) -> str:
    """A one-phrase name for messages: "gpt2" or "tokenizer.json <sha> (N ids, from ORIGIN)"."""
    if identity["kind"] == "gpt2":
        return "gpt2"
    where = f", from {origin}" if origin else ""
    return f"tokenizer.json {identity['sha256'][:12]} ({identity['vocab_size']:,} ids{where})"
