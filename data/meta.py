"""meta.json: the description of a prepared dataset, and the marker that it is complete.

Design choices:
- meta.json is written last, atomically (temporary name, then rename), so its presence means
  train.bin and val.bin are complete; a dataset directory without it is not prepared.
- Token files are raw little-endian arrays with no header, readable by `numpy.memmap`; the
  dtype is the smallest unsigned type that holds every id (uint16 for GPT-2's 50,257 ids,
  uint32 for Gemma's 262,144).
- `tokenizer` records the tokenizer's identity (see data/tokenizer.py) and where it came from;
  training refuses a dataset whose tokenizer is not the model's, with the command that fixes it.
  Older files that say just "gpt2" mean GPT-2.
"""

import json
import os
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.sources import KNOWN, command_source
from data.tokenizer import Tokenizer, describe, document_start, gpt2, identity_of, load_tokenizer

REQUIRED_KEYS = ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "source")
# The kinds of rows data/loader.py draws (the training setting batch_rows), here so that configs are checked without
# importing torch. `conversation` rows are for chat datasets, the others for text.
BATCH_ROWS = ("random", "bos", "doc", "conversation")
SPLITS = ("train", "val")
# A dataset's files per split: the token ids, and for conversations the loss mask (uint8, one per token) and each
# conversation's start (uint64 offsets into the token file).
FILE_KINDS = ("ids", "mask", "starts")


def data_file(split: str, kind: str = "ids") -> str:
    """The file name of one of a split's arrays: train.bin, train.mask.bin, train.starts.bin."""
    return f"{split}.bin" if kind == "ids" else f"{split}.{kind}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype for token ids in [0, vocab_size)."""
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


def read_meta(data_dir: str | Path) -> dict:
    """Read and check `data_dir/meta.json`; raise DataError with the fix when it is missing."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        what = "is incomplete (no meta.json)" if any(data_dir.glob("*.bin*")) else "is not prepared"
        raise DataError(
            f"dataset {data_dir} {what}; run: python data/prepare.py SOURCE --name {data_dir.name}"
            f" (SOURCE: {', '.join(KNOWN)}, a Hugging Face id or local files)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); rebuild with --force") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds {type(meta).__name__}, not a dataset description; rebuild with --force")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; rebuild with --force")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path} has dtype {meta['dtype']!r}, expected uint16 or uint32")
    return meta


def token_file_mismatch(data_dir: str | Path, meta: dict, split: str) -> str | None:
    """Why `data_dir/<split>.bin` does not hold meta.json's `<split>_tokens` ids (or, for a chat dataset, its mask
    and starts files their mask bytes and offsets), or None when they do."""
    tokens = meta[f"{split}_tokens"]
    sizes = {"ids": tokens * np.dtype(meta["dtype"]).itemsize}
    if "chat" in meta:
        sizes |= {"mask": tokens, "starts": 8 * meta["chat"].get(f"{split}_conversations", 0)}
    for kind, expected in sizes.items():
        path = Path(data_dir) / data_file(split, kind)
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected:
            return f"{path} has {path.stat().st_size} bytes, meta.json says {expected}"
    return None


def document_start_id(data_dir: str | Path, meta: dict, batch_rows: str) -> int:
    """The id that starts a document in the dataset's token files (tokenizer.document_start), refused in one line
    for a tokenizer that has none."""
    identity = identity_of(meta["tokenizer"])
    start = document_start(identity["bos_id"], identity["eos_id"])
    if start is None:
        raise DataError(
            f"dataset {data_dir}'s tokenizer has neither a bos_id nor an eos_id (meta.json), so there is no "
            f"document start token for batch_rows={batch_rows}; use --batch_rows=random"
        )
    return start


def prepare_command(source: str, data_dir: str | Path, tokenizer: Tokenizer) -> str:
    """The command that tokenizes `source` for `tokenizer` into a dataset named after both, and how to use it."""
    if tokenizer.kind == "gpt2":
        name, flag = f"{Path(data_dir).name}-gpt2", ""
    else:
        where = Path(tokenizer.origin)
        name, flag = f"{Path(data_dir).name}-{(where.parent if where.suffix else where).name}", f" --tokenizer {where}"
    return f"python data/prepare.py {source} --name {name}{flag} (then --dataset={name})"


def tokenizer_mismatch(data_dir: str | Path, meta: dict, tokenizer: Tokenizer) -> str | None:
    """Why the dataset was not tokenized by `tokenizer`, with the prepare command that fixes it; None if it was."""
    identity = identity_of(meta["tokenizer"])
    if identity == tokenizer.identity():
        return None
    origin = meta["tokenizer"].get("origin") if isinstance(meta["tokenizer"], dict) else None
    return (
        f"dataset {data_dir} was tokenized with {describe(identity, origin)}, but the model speaks {tokenizer}; "
        f"tokenize it for the model: {prepare_command(command_source(meta['source']), data_dir, tokenizer)}"
    )


def dataset_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a dataset was prepared with, loaded again from where it came from."""
    meta = read_meta(data_dir)
    identity = identity_of(meta["tokenizer"])
    if identity["kind"] == "gpt2":
        return gpt2()
    origin = meta["tokenizer"]["origin"]
    tokenizer = load_tokenizer(origin)
    if tokenizer.identity() != identity:
        raise DataError(
            f"dataset {data_dir} was tokenized with {describe(identity, origin)}, but {origin} now holds another "
            f"tokenizer ({tokenizer}); rebuild the dataset with --force"
        )
    return tokenizer


def write_meta(data_dir: Path, meta: dict) -> None:
    """Write meta.json atomically: a reader sees the old file, no file, or the whole new one."""
    tmp = data_dir / "meta.json.tmp"
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, data_dir / "meta.json")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"cannot write {data_dir / 'meta.json'} ({e.strerror or e}): the dataset is incomplete; "
            "prepare it again when there is space"
        ) from None
