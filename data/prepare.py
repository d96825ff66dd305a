"""Tokenize a text source into data/<name>/{train.bin,val.bin,meta.json}.

    python data/prepare.py [SOURCE] [--name NAME] [--tokenizer PATH] [--num-proc N] [--val-fraction F] [--force]

SOURCE: a built-in corpus named in data/sources.py's KNOWN (tinystories, the default; pydocs; pystdlib; pychat), a
Hugging Face dataset id, or local .txt/.jsonl/.json files, globs or folders. --tokenizer: gpt2 (default), a
tokenizer.json, or a Hugging Face model directory holding one (e.g. the official Gemma 3 270M's, to fine-tune it).
Chat files (conversations, data/chat.py) are rendered with the tokenizer's chat template, and each split gets a
loss mask (<split>.mask.bin) and the conversations' starts (<split>.starts.bin) beside its tokens. Also usable as a
library: `prepare(...)`, `ensure_prepared(...)`.

Design choices:
- Every document gets its tokenizer's separators (`<|endoftext|>` after it for GPT-2, `<bos>` before and `<eos>`
  after for Gemma); token files are raw uint16 arrays (uint32 when the vocabulary needs it) that `numpy.memmap`
  reads with no header.
- Worker processes tokenize batches of about BATCH_CHARS characters; the parent writes their
  results to disk in order as they arrive. At most a few batches per worker are in flight, so
  memory stays bounded for corpora larger than RAM (Pool.imap would read its whole input ahead).
- A source without its own val split holds out documents drawn from a seeded random stream
  consumed in document order, so the split does not depend on --num-proc or batch size.
- Crash safety: tokens go to `*.tmp` files renamed when complete, and meta.json, written last and
  atomically, marks a complete dataset. A rebuild deletes the old files first, so an interrupted
  run never leaves files that look valid.
- Re-running is a no-op when meta.json records the same source description and tokenizer identity; an
  exclusive lock on the dataset directory makes concurrent callers (e.g. DDP ranks) wait for
  one build and then see it done.
- Workers are forked where the OS can: they inherit the loaded tokenizer, and unlike spawn they
  never re-run the caller's script (a nanoGPT-style train.py has no `__main__` guard). They
  only run the tokenizer, so forking a training process that already uses CUDA is safe.
"""

import contextlib
import fcntl
import itertools
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import sources
from data.chat import LOSS_ON, ChatTemplate, chat_template
from data.cli import MAX_WORKERS, ArgumentParser
from data.errors import DataError, UserError
from data.meta import (
    FILE_KINDS,
    SPLITS,
    data_file,
    prepare_command,
    read_meta,
    token_dtype,
    token_file_mismatch,
    write_meta,
)
from data.tokenizer import Tokenizer, identity_of, load_tokenizer

DATA_ROOT = Path(__file__).resolve().parent
BATCH_CHARS = 1 << 20  # a megabyte of text per task: big enough that the pool's per-task cost is noise

# What tokenize_batch uses, in this process (set by tokenize_stream): the tokenizer, and for conversations the chat
# template and which tokens are targets.
_tokenizer: Tokenizer | None = None
_template: ChatTemplate | None = None
_loss_on = "assistant"


def check_dataset_name(name: str) -> None:
    """Refuse a dataset name that is not a plain new directory under data/: empty, a path, hidden (`.`, `..`), or
    one of the package's own folders or files. Training checks its `dataset` setting with this too, so that it never
    suggests a prepare command that prepare would refuse."""
    own = name in ("assets", "__pycache__") or name.endswith(".py")
    if not name or name != Path(name).name or name.startswith(".") or own:
        raise DataError(
            f"invalid dataset name {name!r}: use a plain directory name (not hidden, not assets, __pycache__ or *.py)"
        )


def _use_tokenizer(tokenizer: Tokenizer, loss_on: str = "assistant") -> None:
    global _tokenizer, _template, _loss_on
    _tokenizer, _template, _loss_on = tokenizer, chat_template(tokenizer), loss_on


def tokenize_batch(batch: list[tuple[str | list, bool]]) -> tuple[dict, dict]:
    """Arrays (train, val) for (document, is_val) pairs: each a dict of "ids" (the documents' ids, each with its
    tokenizer's separators, or each conversation rendered by the chat template), and for conversations "mask"
    (1 where a token is a target) and "lengths" (each conversation's ids)."""
    parts: tuple[dict, dict] = ({"ids": [], "mask": [], "lengths": []}, {"ids": [], "mask": [], "lengths": []})
    for document, is_val in batch:
        # One encode per document on one thread: batch encoders would start their own threads
        # inside every worker and oversubscribe the cores.
        if isinstance(document, str):
            parts[is_val]["ids"].extend(_tokenizer.document_ids(document))
            continue
        ids, mask = _template.render(document, loss_on=_loss_on)
        parts[is_val]["ids"].extend(ids)
        parts[is_val]["mask"].extend(mask)
        parts[is_val]["lengths"].append(len(ids))
    dtypes = {"ids": token_dtype(_tokenizer.vocab_size), "mask": np.uint8, "lengths": np.int64}
    train, val = ({key: np.array(values, dtype=dtypes[key]) for key, values in part.items()} for part in parts)
    return train, val


def document_batches(source: sources.Source, val_fraction: float, seed: int) -> Iterator[list[tuple[str, bool]]]:
    """Non-empty (text, is_val) documents in batches of about BATCH_CHARS characters; a seeded held-out draw
    where the source has no split of its own."""
    rng = np.random.default_rng(seed)
    batch, chars = [], 0
    for text, split in source.documents():
        if not text:
            continue
        batch.append((text, split == "val" if split else rng.random() < val_fraction))
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_stream(
    batches: Iterator[list], num_proc: int, tokenizer: Tokenizer, loss_on: str = "assistant"
) -> Iterator[tuple[int, tuple[dict, dict]]]:
    """(documents, tokenize_batch's arrays) per batch, in input order, with at most 4 * num_proc batches in
    flight."""
    _use_tokenizer(tokenizer, loss_on)
    if num_proc == 1:
        for batch in batches:
            yield len(batch), tokenize_batch(batch)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # Forked workers get the tokenizer without pickling it (Gemma's tokenizer.json is 33 MB).
    with multiprocessing.get_context(method).Pool(num_proc, _use_tokenizer, (tokenizer, loss_on)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((len(batch), pool.apply_async(tokenize_batch, (batch,))))
            # A deep queue keeps every worker busy while the oldest, possibly largest, batch finishes.
            if len(pending) >= 4 * num_proc:
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()


def _is_current(out_dir: Path, description: dict, tokenizer: Tokenizer) -> bool:
    try:
        meta = read_meta(out_dir)
    except DataError:
        return False
    if meta["source"] != description or identity_of(meta["tokenizer"]) != tokenizer.identity():
        return False
    return all(token_file_mismatch(out_dir, meta, split) is None for split in SPLITS)


def prepare(
    source: str = "tinystories",
    name: str | None = None,
    *,
    tokenizer: str | Path | Tokenizer = "gpt2",
    data_root: str | Path = DATA_ROOT,
    num_proc: int | None = None,
    val_fraction: float | None = None,
    seed: int = 1337,
    text_field: str = "text",
    split: str = "train",
    val_split: str | None = None,
    config: str | None = None,
    streaming: bool = False,
    loss_on: str = "assistant",
    skip_bad_rows: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenize source into `data_root/name/` and return that directory; a no-op when up to date. A chat source's
    conversations are rendered with the tokenizer's chat template, their targets chosen by `loss_on`
    (data/chat.py)."""
    name = name or sources.default_name(source)
    check_dataset_name(name)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    src = sources.resolve(source, text_field, split, val_split, config, streaming, skip_bad_rows)
    description = dict(src.description)
    if src.chat:
        description["loss_on"] = loss_on
    elif loss_on != "assistant":
        raise DataError(f"--loss-on is for conversations; {source} holds plain text, where every token is a target")
    has_val = description.get("val_split") is not None
    if not has_val:
        val_fraction = src.default_val_fraction if val_fraction is None else val_fraction
        if not 0 < val_fraction < 1:
            raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        description |= {"val_fraction": val_fraction, "split_seed": seed}
    out_dir = Path(data_root) / name
    try:
        made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # what mkdir makes, deepest first
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "w")
    except OSError as e:  # a read-only file system, a path component that is a file, a name too long
        raise DataError(f"cannot create {e.filename or out_dir} ({e.strerror or e}); nothing was written") from None
    try:
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not force and _is_current(out_dir, description, tokenizer):
                print(
                    f"{out_dir} is already prepared from this source with {tokenizer}; nothing to do (--force rebuilds)"
                )
                return out_dir
            num_proc = num_proc or os.cpu_count() or 1
            _build(src, description, tokenizer, out_dir, num_proc, val_fraction or 0.0, seed, progress, loss_on)
    except BaseException:
        if made:  # a failed first build leaves no empty data/<name>/ (nor a --data-root it made) behind
            (out_dir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                for directory in made:
                    directory.rmdir()
        raise
    return out_dir


def _build(
    src: sources.Source,
    description: dict,
    tokenizer: Tokenizer,
    out_dir: Path,
    num_proc: int,
    val_fraction: float,
    seed: int,
    progress: bool,
    loss_on: str,
) -> None:
    start = time.perf_counter()
    # Open the source before announcing the tokenizing or touching the old dataset: a Hugging Face dataset downloads
    # here (saying so), or fails offline with the old dataset left as it was.
    batches = document_batches(src, val_fraction, seed)
    try:
        first = next(batches, None)
    except OSError as e:  # a source file that cannot be read
        where = e.filename or sources.command_source(description)
        kept = f"{out_dir} was left as it was" if (out_dir / "meta.json").exists() else "nothing was written"
        raise DataError(f"cannot read {where} ({e.strerror or e}); {kept}") from None
    batches = itertools.chain([first], batches) if first else iter(())
    # Remove the old dataset first: a rebuild that dies halfway must not leave a mix of files.
    for f in ("meta.json", *(data_file(split, kind) for split in SPLITS for kind in FILE_KINDS)):
        (out_dir / f).unlink(missing_ok=True)
    kinds = FILE_KINDS if src.chat else ("ids",)
    tmp = {(split, kind): out_dir / f"{data_file(split, kind)}.tmp" for split in SPLITS for kind in kinds}
    counts = {"train_tokens": 0, "val_tokens": 0}
    supervised = {split: 0 for split in SPLITS}
    conversations = {split: 0 for split in SPLITS}
    docs = 0
    files = {key: open(path, "wb") for key, path in tmp.items()}
    if progress:
        source = sources.command_source(description)
        print(f"tokenizing {source} into {out_dir} with {tokenizer}, {num_proc} processes", flush=True)
    # The bar only on a terminal: in a redirected log it would be hundreds of frames.
    bar = tqdm(desc=f"tokenizing {out_dir.name}", unit=" docs", disable=not progress or None, smoothing=0)
    try:
        for n, arrays in tokenize_stream(batches, num_proc, tokenizer, loss_on):
            for split, part in zip(SPLITS, arrays, strict=True):
                part["ids"].tofile(files[split, "ids"])
                if src.chat:  # each conversation's first id, as an offset into the split's token file
                    offsets = counts[f"{split}_tokens"] + np.cumsum(part["lengths"]) - part["lengths"]
                    offsets.astype("<u8").tofile(files[split, "starts"])
                    part["mask"].tofile(files[split, "mask"])
                    supervised[split] += int(part["mask"].sum())
                    conversations[split] += len(part["lengths"])
                counts[f"{split}_tokens"] += len(part["ids"])
            docs += n
            bar.update(n)
            tokens = counts["train_tokens"] + counts["val_tokens"]
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
        bar.close()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split in SPLITS:
            if counts[f"{split}_tokens"] == 0:
                skipped = (
                    f" ({len(src.skipped)} bad rows were skipped; the first: {src.skipped[0]})" if src.skipped else ""
                )
                raise DataError(f"the {split} split got no documents{skipped}; check the source or --val-fraction")
            if src.chat and supervised[split] == 0:
                raise DataError(f"the {split} split has no target tokens (no assistant replies); check the source")
        for (split, kind), path in tmp.items():
            os.replace(path, out_dir / data_file(split, kind))
    except BaseException as e:
        bar.close()  # so an error message starts on a line of its own
        for key, f in files.items():
            f.close()
            tmp[key].unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, most often
            raise DataError(f"cannot write {out_dir} ({e.strerror or e}); nothing of this dataset was kept") from None
        raise
    if src.chat:
        template = chat_template(tokenizer)
        separators = f"conversations rendered with the {template.name} chat template (data/chat.py)"
    elif tokenizer.bos_id is None:
        separators = "<|endoftext|> after every document"
    else:
        separators = f"bos ({tokenizer.bos_id}) before and eos ({tokenizer.eos_id}) after every document"
    meta = {
        "tokenizer": {**tokenizer.identity(), "origin": tokenizer.origin},
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        **counts,
        "documents": docs,
        "source": description,
        "format": f"raw little-endian token ids, {separators}",
    }
    if src.chat:
        meta["chat"] = {
            "template": template.describe(),
            "loss_on": loss_on,
            **{f"{split}_conversations": conversations[split] for split in SPLITS},
            **{f"{split}_supervised_tokens": supervised[split] for split in SPLITS},
            "skipped_rows": len(src.skipped),
            "files": "<split>.mask.bin: uint8, 1 where the token is a target; <split>.starts.bin: uint64 offsets",
        }
    write_meta(out_dir, meta)
    seconds = time.perf_counter() - start
    what = f"{docs:,} conversations" if src.chat else f"{docs:,} documents"
    print(
        f"{out_dir}: {counts['train_tokens']:,} train + {counts['val_tokens']:,} val tokens"
        f" from {what} in {seconds:.1f}s, tokenizer {tokenizer}"
    )
    if src.chat:
        total = counts["train_tokens"] + counts["val_tokens"]
        print(
            f"{template.name} chat template; {sum(supervised.values()):,} target tokens "
            f"({sum(supervised.values()) / total:.0%}, --loss-on {loss_on})"
        )
    if src.skipped:
        print(f"skipped {len(src.skipped):,} bad rows (--skip-bad-rows); the first: {src.skipped[0]}")


def ensure_prepared(dataset: str, tokenizer: Tokenizer, data_root: str | Path = DATA_ROOT) -> Path:
    """`data_root/dataset`, preparing a built-in corpus (`sources.KNOWN`) if not complete.
    Built-ins are prepared with GPT-2 only, so that data/pydocs always means the demo's data; other tokenizers name
    their own.

    Call it on one process (e.g. DDP rank 0) before the others open the data; concurrent callers
    are safe, since they wait on the dataset's lock, but each would re-check the source.
    """
    data_dir = Path(data_root) / dataset
    try:
        read_meta(data_dir)
    except DataError:
        if dataset not in sources.KNOWN:
            raise  # the "not prepared; run: python data/prepare.py …" error
        if tokenizer.kind != "gpt2":
            command = prepare_command(dataset, data_dir, tokenizer)
            raise DataError(
                f"dataset {data_dir} is not prepared and the model speaks {tokenizer}: run {command}"
            ) from None
        return prepare(dataset, data_root=data_root)
    # Complete datasets are used as they are: a user may have prepared them with other options.
    return data_dir


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", default="tinystories", help=f"{', '.join(sources.KNOWN)}, HF id, or files")
    parser.add_argument("--name", help="output directory data/<name>/ (default: from the source)")
    parser.add_argument(
        "--tokenizer", default="gpt2", help="gpt2 (default), a tokenizer.json, or a Hugging Face model directory"
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=os.cpu_count(),
        help=f"tokenizer processes, 1 to {MAX_WORKERS} (default: all cores)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        help="held-out fraction of documents when the source has no val split (default 0.01; pydocs 0.1)",
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed of the held-out split")
    parser.add_argument("--text-field", default="text", help="text field of HF or .jsonl rows")
    parser.add_argument("--split", default="train", help="HF split to train on")
    parser.add_argument("--val-split", help="HF split to validate on (default: hold out a fraction)")
    parser.add_argument("--config", help="HF dataset configuration name")
    parser.add_argument("--streaming", action="store_true", help="stream the HF dataset instead of caching it")
    parser.add_argument(
        "--loss-on",
        choices=LOSS_ON,
        default="assistant",
        help="conversations: train on the assistant's replies (default) or on every token",
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip (and count) rows that are not valid, instead of stopping"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    parser.add_argument("--data-root", default=DATA_ROOT, type=Path, help="where <name>/ goes (default: data/)")
    args = parser.parse_args(argv)
    if not 1 <= args.num_proc <= MAX_WORKERS:
        print(f"error: --num-proc must be 1 to {MAX_WORKERS} (4 x the CPU count), got {args.num_proc}", file=sys.stderr)
        return 2
    try:
        prepare(
            args.source,
            args.name,
            tokenizer=args.tokenizer,
            data_root=args.data_root,
            num_proc=args.num_proc,
            val_fraction=args.val_fraction,
            seed=args.seed,
            text_field=args.text_field,
            split=args.split,
            val_split=args.val_split,
            config=args.config,
            streaming=args.streaming,
            loss_on=args.loss_on,
            skip_bad_rows=args.skip_bad_rows,
            force=args.force,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
