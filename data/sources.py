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
from dataclasses import dataclass, field
from pathlib import Path

from data import chat
from data.errors import DataError

OFFLINE_HINT = "for an offline corpus use: python data/prepare.py pydocs (or pystdlib)"


@dataclass
class Source:
    description: dict
    documents: Callable[[], Iterator[tuple[str | list, str | None]]]  # text, or a conversation's messages
    # Fraction of documents held out for val when the source has no val split of its own.
    default_val_fraction: float = 0.01
    chat: bool = False  # documents are conversations (message lists), rendered with the model's chat template
    skipped: list = field(default_factory=list)  # bad rows skipped so far (--skip-bad-rows), their messages


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
    skip_bad_rows: bool = False,
) -> Source:
    """The Source named by a prepare SOURCE argument; a built-in corpus takes only `streaming` of the options."""
    if source in KNOWN:
        return KNOWN[source].make(streaming)
    if _looks_local(source):
        return local_files(source, text_field, skip_bad_rows)
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
        return (path.stem if path.suffix in LOCAL_SUFFIXES else path.name).lower() or "local"
    return source.split("/")[-1].lower()


def command_source(description: dict) -> str:
    """The SOURCE argument of `python data/prepare.py` that rebuilds a source with this description."""
    for name, built_in in KNOWN.items():
        if built_in.marks.items() <= description.items():
            return name
    kind = description.get("kind")
    if kind in ("files", "chat files"):
        return description["pattern"]
    if kind == "huggingface":
        return description["dataset"]
    return kind or "SOURCE"


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or glob.has_magic(source) or source.endswith(LOCAL_SUFFIXES)


LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")


def local_files(pattern: str, text_field: str = "text", skip_bad_rows: bool = False) -> Source:
    """`.txt` files (one document each), `.jsonl` files (one row per line) and `.json` files (an array of rows).
    A row is a document (its `text_field`) or, when the first row is one, a conversation (data/chat.py's formats):
    then every row must be, and the documents are message lists. With `skip_bad_rows`, a bad row is counted in
    `Source.skipped` instead of stopping."""
    if os.path.isdir(pattern):
        files = [p for p in Path(pattern).rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    files = sorted(files)
    if not files:
        raise DataError(f"no .txt, .jsonl or .json files match {pattern!r}")
    unsupported = [str(p) for p in files if p.suffix not in LOCAL_SUFFIXES]
    if unsupported:
        raise DataError(f"unsupported file type (want .txt, .jsonl or .json): {unsupported[0]}")
    try:
        first = next(_rows(files[0]), (None, ""))[0]
    except OSError:  # unreadable: reading the documents meets it again, where prepare says what it kept
        first = None
    is_chat = chat.is_chat_row(first)
    if is_chat and any(p.suffix == ".txt" for p in files):
        raise DataError(f"{files[0]} holds conversations, so every file must: .txt files are plain text")
    skipped: list[str] = []

    def documents() -> Iterator[tuple[str | list, None]]:
        for path in files:
            for row, where in _rows(path):
                try:
                    if isinstance(row, DataError):
                        raise row
                    yield (chat.conversation(row, where) if is_chat else _row_text(row, text_field, where)), None
                except DataError as e:
                    if not skip_bad_rows:
                        raise DataError(f"{e}; fix the row, or pass --skip-bad-rows to skip such rows") from None
                    skipped.append(str(e))

    stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    description = {
        "kind": "chat files" if is_chat else "files",
        "pattern": pattern,
        **({} if is_chat else {"text_field": text_field}),
        "files": len(files),
        "bytes": sum(size for _, size, _ in stats),
        # Any added, removed, grown or touched file changes this, and so triggers a rebuild.
        "fingerprint": hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16],
    }
    # Chat sets are small (Google's guide fine-tunes on 25 rows): hold out more than 1% so that val has some.
    return Source(description, documents, 0.1 if is_chat else 0.01, is_chat, skipped)


def _rows(path: Path) -> Iterator[tuple[object, str]]:
    """(row, where) in a file: a .txt file is one row, its text; a .jsonl file one per non-blank line (a line that is
    not JSON is a DataError in the row's place); a .json file the items of its array. Bad bytes become U+FFFD."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace"), str(path)
    elif path.suffix == ".json":
        yield from chat.read_rows(path, path.read_text(encoding="utf-8", errors="replace"))
    else:
        with path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    where = f"{path}:{lineno}"
                    try:
                        yield json.loads(line), where
                    except ValueError as e:  # a bad row like any other: skipped with --skip-bad-rows
                        yield DataError(f"{where}: not valid JSON ({e})"), where


def _row_text(row: object, text_field: str, where: str) -> str:
    if isinstance(row, str):  # a .txt file
        return row
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


# The standard-library modules whose functions `pychat` asks about: small, familiar, and in every Python.
PYCHAT_MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "fnmatch", "functools", "glob", "gzip",
    "hashlib", "heapq", "html", "itertools", "json", "keyword", "math", "operator", "os.path", "random", "re",
    "secrets", "shlex", "shutil", "statistics", "string", "textwrap", "time", "unicodedata", "urllib.parse", "uuid",
    "zlib",
)  # fmt: skip


def pychat_answers() -> list[tuple[str, str, str]]:
    """(qualified name, signature or "", the docstring's first paragraph) of the public functions of
    PYCHAT_MODULES whose docstring opens with a paragraph of 20 to 300 characters, in a fixed order."""
    import importlib
    import inspect

    found = []
    for module_name in PYCHAT_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or inspect.isclass(obj) or not callable(obj):
                continue
            if not inspect.isbuiltin(obj) and getattr(obj, "__module__", None) != module.__name__:
                continue  # imported from elsewhere
            summary = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
            if not 20 <= len(summary) <= 300 or summary.startswith(f"{name}("):
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):  # some C functions have none
                signature = ""
            if " at 0x" in signature:  # a default shown with its memory address: another text in every process
                signature = ""
            found.append((f"{module_name}.{name}", signature, summary))
    return found


def pychat() -> Source:
    """Conversations about the standard library, made from the running Python's docstrings: a question about a
    function answered with its docstring's first paragraph; every third with a system message asking for one
    sentence, and every third a follow-up asking how to call it, answered with its signature. A few hundred rows,
    offline: the chat fine-tuning path's data when a user brings none (README, Chat fine-tuning)."""

    def documents() -> Iterator[tuple[list, None]]:
        for i, (qualified, signature, summary) in enumerate(pychat_answers()):
            question = {"role": "user", "content": f"What does `{qualified}` do?"}
            if i % 3 == 1:
                sentence = summary.split(". ")[0].rstrip(".") + "."
                yield [{"role": "system", "content": "Answer in one sentence."}, question,
                       {"role": "assistant", "content": sentence}], None  # fmt: skip
            elif i % 3 == 2 and signature:
                follow_up = [{"role": "user", "content": "How do I call it?"},
                             {"role": "assistant", "content": f"`{qualified}{signature}`"}]  # fmt: skip
                yield [question, {"role": "assistant", "content": summary}, *follow_up], None
            else:
                yield [question, {"role": "assistant", "content": summary}], None

    description = {"kind": "pychat", "python": platform.python_version(), "conversations": len(pychat_answers())}
    return Source(description, documents, default_val_fraction=0.1, chat=True)


KNOWN: dict[str, BuiltIn] = {
    "tinystories": BuiltIn(tinystories, tinystories(streaming=False).description),
    "pydocs": BuiltIn(lambda streaming: pydocs(), {"kind": "pydocs"}),
    "pystdlib": BuiltIn(lambda streaming: pystdlib(), {"kind": "pystdlib"}),
    "pychat": BuiltIn(lambda streaming: pychat(), {"kind": "pychat"}),
}
