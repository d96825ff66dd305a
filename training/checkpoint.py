"""Checkpoints: atomic writes, safe reads, finding a run's checkpoint, and loading any model with its tokenizer.

Design choices:
- A checkpoint is one `torch.save` dict of tensors and plain values (`Run.state_dict()` in trainer.py), read back with
  `torch.load(weights_only=True)`: unpickling arbitrary objects could run code, so a checkpoint never holds any.
- Writes go to `<name>.<pid>.tmp` in the same directory, are flushed and fsynced, then renamed over the old file: a
  crash mid-write leaves the previous checkpoint intact, never a truncated one under the real name, and no two
  processes ever share a temporary. A full disk is a one-line error that says the previous file is kept.
- Every failure to read (missing, truncated, not a checkpoint) is a `CheckpointError` that names the file.
- A checkpoint carries its tokenizer (`Tokenizer.record()`: the identity and, for a Hugging Face tokenizer, the
  whole tokenizer.json), so a run directory is self-contained. Checkpoints from before that record say "gpt2" or
  nothing, which means GPT-2.
- `load_model` is the one owner of "a model and its tokenizer", for a checkpoint, a run directory or a Hugging
  Face directory: sample.py, the export scripts and the benchmarks all go through it.
"""

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from architecture import Gemma3Model, ModelConfig
from architecture.config import file_problem
from data.errors import UserError
from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_record

FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, truncated or not one of ours; the message names it."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically: temporary file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path.parent, tmp)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):  # torch reports a failed write as either ("unexpected pos")
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        reason = "the disk is full" if full else getattr(e, "strerror", None) or first_line(e)
        raise CheckpointError(f"cannot write {path} ({reason}); {kept}") from None


def disk_full(error: BaseException, directory: Path, tmp: Path) -> bool:
    """Whether a failed write ran out of space: torch's writer hides ENOSPC behind a RuntimeError, so the free
    space is measured as well."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < (tmp.stat().st_size if tmp.exists() else 0) + 2**20
    except OSError:
        return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; raise `CheckpointError` if it is not a complete one of ours."""
    path = Path(path)
    problem = file_problem(path, "checkpoint")
    if problem:
        raise CheckpointError(problem)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:  # no permission, an I/O error: the file may be fine
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror or first_line(e)})") from None
    except Exception as e:  # torch raises many types for a bad file (RuntimeError, UnpicklingError, EOFError...)
        # torch's own text runs to many lines and suggests weights_only=False, the one thing not to do here; its
        # legacy reader's KeyError is a bare number, which says nothing.
        known = {"UnpicklingError": ": refused by weights_only", "KeyError": ""}
        reason = known.get(type(e).__name__, f": {type(e).__name__}: {first_line(e)}")
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, another format, or holding objects other than "
            f"tensors and plain values){reason}"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} is a torch file but not a checkpoint of this project (no model / model_config)")
    return state


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_iter_num(path: Path) -> int | None:
    """The iteration a checkpoint was written at, read without loading its tensors into memory; None if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("iter_num")
    except Exception:  # noqa: BLE001 - any unreadable file counts as stale
        return None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or in a run directory its `best.pt`, else its `latest.pt`."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no best.pt or latest.pt; train first or pass a checkpoint file")
    return path  # load_checkpoint says if it is missing


def model_from_checkpoint(state: dict[str, Any], file: str | Path) -> Gemma3Model:
    """The model a loaded checkpoint describes, holding its weights.

    A config that disagrees with the weights raises `CheckpointError` naming the first disagreements, rather than
    load_state_dict's traceback.
    """
    model = Gemma3Model(ModelConfig.from_dict(state["model_config"], source=f"{file} model_config"))
    expected, weights = model.state_dict(), state["model"]
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k} is {tuple(weights[k].shape)}, config says {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{file}: model_config disagrees with the weights: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(weights)
    return model


def check_tokenizer_fits(model: Gemma3Model, tokenizer: Tokenizer, where: str | Path) -> None:
    """Refuse a tokenizer that emits ids past the model's embedding."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{where}: the model's vocab_size is {model.config.vocab_size} but its tokenizer ({tokenizer}) has "
            f"{tokenizer.vocab_size:,} tokens; the model cannot read this tokenizer's ids"
        )


def load_model(path: str | Path) -> tuple[Gemma3Model, Tokenizer]:
    """The model and tokenizer of a checkpoint file, a run directory (best.pt, else latest.pt), or a Hugging Face
    directory (config.json, safetensors and tokenizer.json)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{path}: no tokenizer.json, so the model's tokenizer is unknown; copy in the one it was trained with"
            )
        tokenizer = load_tokenizer(path)
        model = Gemma3Model.from_hf(str(path))
        where = path
    else:
        where = find_checkpoint(path)
        state = load_checkpoint(where)
        model = model_from_checkpoint(state, where)
        tokenizer = tokenizer_from_record(state.get("tokenizer"))
    check_tokenizer_fits(model, tokenizer, where)
    return model, tokenizer
