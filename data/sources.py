"""Text sources for data/prepare.py: each turns a SOURCE argument into a stream of documents.

Design choices:
- A source is a JSON-able description plus a generator of `(text, split)` pairs, where split is
  "train", "val", or None for "hold out a fraction here". The description identifies the content
  (dataset id and splits, file sizes and mtimes, Python version) and is stored in meta.json,
  so re-running prepare can tell cheaply whether anything changed, without reading the data.
- Documents are generated lazily, one at a time, so a corpus never has to fit in memory.
- Hugging Face loads fail fast offline: when huggingface.co does not answer a 2 s probe, the hub
  is switched to offline mode (cached datasets still load) instead of retrying for minutes, and
  the error names the offline corpora. A load first says where it reads from (the hub, or the local cache alone),
  so that the first line a user sees is what happens.
- Built-in corpora are one table, `KNOWN` at the end of this module: name -> `BuiltIn` (the function that makes
  the Source, and the description entries that recognise a dataset prepared from it). `resolve`, `default_name`,
  `command_source`, prepare's help, training's prepare-on-first-use and the "not prepared" message all read it,
  so adding a corpus is a function and one entry here.
- Besides TinyStories, offline corpora from the Python installation itself, so the whole pipeline runs anywhere:
  `pydocs` (the reference documentation in `pydoc_data`, one document per topic, ~0.5 MB) and
  `pystdlib` (the standard library's .py files, one document per file, ~30 MB).
"""

import glob
import hashlib
import json
import os
import platform
import socket
import sysconfig
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError

OFFLINE_HINT = "for an offline corpus use: python data/prepare.py pydocs (or pystdlib)"


@dataclass
class Source:
    description: dict
    documents: Callable[[], Iterator[tuple[str, str | None]]]
    # Fraction of documents held out for val when the source has no val split of its own.
    default_val_fraction: float = 0.01


@dataclass(frozen=True)
class BuiltIn:
    """A corpus named in KNOWN. `make(streaming)` builds its Source (only Hugging Face sources stream). `marks` are
    the entries of its description that are the same wherever it is prepared (not file counts or the Python
    version), so that a message about a prepared dataset can name the built-in rather than what it reads."""

    make: Callable[[bool], Source]
    marks: dict


def resolve(
    source: str,
    text_field: str = "text",
    split: str = "train",
    val_split: str | None = None,
    config: str | None = None,
    streaming: bool = False,
) -> Source:
    """The Source named by a prepare SOURCE argument; a built-in corpus takes only `streaming` of the options."""
    if source in KNOWN:
        return KNOWN[source].make(streaming)
    if _looks_local(source):
        return local_files(source, text_field)
    return huggingface(source, text_field, split, val_split, config, streaming)


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


def default_name(source: str) -> str:
    """The dataset directory name for a source: `data/<name>/`."""
    if source in KNOWN:
        return source
    if _looks_local(source):
        path = Path(source.rstrip("/\\"))
        while glob.has_magic(str(path)):
            path = path.parent
        return (path.stem if path.suffix in (".txt", ".jsonl") else path.name).lower() or "local"
    return source.split("/")[-1].lower()


def command_source(description: dict) -> str:
    """The SOURCE argument of `python data/prepare.py` that rebuilds a source with this description."""
    for name, built_in in KNOWN.items():
        if built_in.marks.items() <= description.items():
            return name
    kind = description.get("kind")
    if kind == "files":
        return description["pattern"]
    if kind == "huggingface":
        return description["dataset"]
    return kind or "SOURCE"


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or glob.has_magic(source) or source.endswith((".txt", ".jsonl"))


def local_files(pattern: str, text_field: str = "text") -> Source:
    """`.txt` files (one document each) and `.jsonl` files (one document per line's text_field)."""
    if os.path.isdir(pattern):
        files = [p for p in Path(pattern).rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    files = sorted(files)
    if not files:
        raise DataError(f"no .txt or .jsonl files match {pattern!r}")
    unsupported = [str(p) for p in files if p.suffix not in (".txt", ".jsonl")]
    if unsupported:
        raise DataError(f"unsupported file type (want .txt or .jsonl): {unsupported[0]}")

    def documents() -> Iterator[tuple[str, None]]:
        for path in files:
            if path.suffix == ".txt":
                yield path.read_text(encoding="utf-8", errors="replace"), None
                continue
            with path.open(encoding="utf-8", errors="replace") as f:  # as .txt: a bad byte becomes U+FFFD
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_text(line, text_field, f"{path}:{lineno}"), None

    stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    description = {
        "kind": "files",
        "pattern": pattern,
        "text_field": text_field,
        "files": len(files),
        "bytes": sum(size for _, size, _ in stats),
        # Any added, removed, grown or touched file changes this, and so triggers a rebuild.
        "fingerprint": hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16],
    }
    return Source(description, documents)


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        raise DataError(f"{where}: no string field {text_field!r} (set it with --text-field)")
    return row[text_field]


def huggingface(
    dataset: str,
    text_field: str,
    split: str,
    val_split: str | None,
    config: str | None,
    streaming: bool,
) -> Source:
    """A Hugging Face dataset; val is `val_split`, or a held-out fraction of `split` when None."""

    def documents() -> Iterator[tuple[str, str | None]]:
        offline = hub_offline()
        splits = f"splits {split} and {val_split}" if val_split else f"split {split}"
        where = "the local cache alone (offline)" if offline else "the Hugging Face hub (or its local cache)"
        print(f"loading {dataset} ({splits}) from {where}", flush=True)
        yield from _hf_texts(dataset, config, split, text_field, streaming, "train" if val_split else None, offline)
        if val_split:
            yield from _hf_texts(dataset, config, val_split, text_field, streaming, "val", offline)

    description = {
        "kind": "huggingface",
        "dataset": dataset,
        "config": config,
        "split": split,
        "val_split": val_split,
        "text_field": text_field,
    }
    return Source(description, documents)


def hub_offline() -> bool:
    """Whether Hugging Face loads must use the local cache alone: HF_HUB_OFFLINE is set, or huggingface.co does
    not answer the probe (which then sets HF_HUB_OFFLINE, so that the libraries do not retry for minutes)."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if host_reachable("huggingface.co"):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    return True


def _hf_texts(
    dataset: str, config: str | None, split: str, text_field: str, streaming: bool, tag: str | None, offline: bool
) -> Iterator[tuple[str, str | None]]:
    import datasets
    import huggingface_hub.constants

    if offline:
        # Both libraries read HF_HUB_OFFLINE once, at import; set the parsed flags too in case
        # they were imported before the probe. Offline they use the local cache and fail fast.
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(dataset, config, split=split, streaming=streaming)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        where = "offline, not in the local cache" if offline else str(e).splitlines()[0]
        raise DataError(
            f"cannot load Hugging Face dataset {dataset!r} split {split!r} ({where}); {OFFLINE_HINT}"
        ) from e
    for batch in ds.iter(batch_size=1000):
        if text_field not in batch:
            raise DataError(
                f"{dataset!r} has no field {text_field!r}; its fields: {', '.join(batch)} (use --text-field)"
            )
        for text in batch[text_field]:
            yield text, tag


# Built-in corpora: prepared by name, on first use by training. Adding one is a function here and an entry in KNOWN.


def tinystories(streaming: bool) -> Source:
    """TinyStories (Eldan and Li, 2023), with the validation split its authors hold out."""
    return huggingface("roneneldan/TinyStories", "text", "train", "validation", None, streaming)


def pydocs() -> Source:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError("this Python installation lacks pydoc_data; use pystdlib instead") from e

    def documents() -> Iterator[tuple[str, None]]:
        for key in sorted(topics):
            yield topics[key], None

    description = {"kind": "pydocs", "python": platform.python_version(), "documents": len(topics)}
    # Only ~80 documents: hold out enough of them that val outlasts one block.
    return Source(description, documents, default_val_fraction=0.1)


def pystdlib() -> Source:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))

    def documents() -> Iterator[tuple[str, None]]:
        for path in files:
            # A few test modules are deliberately not UTF-8; replacing bad bytes keeps them in.
            yield path.read_bytes().decode("utf-8", errors="replace"), None

    description = {
        "kind": "pystdlib",
        "python": platform.python_version(),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }
    return Source(description, documents)


KNOWN: dict[str, BuiltIn] = {
    "tinystories": BuiltIn(tinystories, tinystories(streaming=False).description),
    "pydocs": BuiltIn(lambda streaming: pydocs(), {"kind": "pydocs"}),
    "pystdlib": BuiltIn(lambda streaming: pystdlib(), {"kind": "pystdlib"}),
}
