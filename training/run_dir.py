"""One run per out_dir: a lock held for the run's life, and no new run over an old one by accident.

Design choices:
- `check_out_dir` runs before any work: an out_dir that is empty, `.`, the current directory, the repository root
  or one of their parents would scatter a run's files among others, so it is refused; so is a path that is a file,
  and a directory that holds files but none a run writes (`--out_dir=config`): someone else's.
- The lock is `flock` on `out_dir/.lock`, taken without waiting: the OS releases it when the process dies, however
  it dies, so a crash never leaves a stale lock. The file holds the owner's pid, for the refusal message.
- A new run (not `--init_from=resume`) in an out_dir that holds a run's checkpoints is refused, naming resume and
  `--overwrite=true`; with it, the old run's files are removed first, so the two runs never mix. A directory with
  metrics but no checkpoint (its run died before the first) holds nothing to protect: a new run takes it over and
  moves the old metrics aside (`metrics.jsonl.<n>.old`), and a resume there is refused with what to run instead.
- Under the lock, temporaries left by a crash (`*.tmp`) are removed: no other writer can own them. A run that stops
  before writing anything (wandb failing to start) removes its `.lock`, and the out_dir if it made it.
- The run checks that `.lock` is still the file it locked before each write (`check`): if the out_dir was removed
  or replaced under it, another run may own that path now, so it stops rather than write there or recreate it.
- Every OSError (read-only, permission denied, a name too long, a file in the path, a full disk) is one line that
  names the path and what was being done (`os_error`).
"""

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from architecture.config import REPO_ROOT
from data.errors import UserError

CHECKPOINTS = ("latest.pt", "best.pt", "pre_decay.pt")  # pre_decay.pt: where a wsd run's decay began
RUN_FILES = (*CHECKPOINTS, "metrics.jsonl")


class RunDirError(UserError, RuntimeError):
    """The out_dir cannot host this run; the message says why and what to do."""


def os_error(path: Path, doing: str, error: OSError, kept: str) -> RunDirError:
    """One line for a failed file operation: the path, what was being done, why, and what is kept."""
    reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror or type(error).__name__
    return RunDirError(f"cannot {doing} {path} ({reason}); {kept}")


def check_out_dir(out_dir: str, resume: bool) -> None:
    """Refuse, before any work, an out_dir that is not a place of its own for a run or cannot be written, and a
    resume where there is nothing to resume."""
    if not out_dir.strip():
        raise RunDirError(
            "out_dir is empty or blank, which would write the run into the current directory; name a directory"
        )
    if out_dir.startswith("~"):
        raise RunDirError(f"out_dir '{out_dir}' starts with '~', which only a shell expands; write the full path")
    path = Path(out_dir)
    try:
        check_place(out_dir, path.resolve())
        if path.exists() and not path.is_dir():
            raise RunDirError(f"out_dir {path} exists and is not a directory; choose another --out_dir")
        nearest = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
        if not nearest.is_dir():
            raise RunDirError(f"out_dir {path} cannot be made: {nearest} is a file; choose another --out_dir")
        if not os.access(nearest, os.W_OK):
            raise RunDirError(f"out_dir {path} cannot be written: {nearest} is read-only or not ours to write")
        has_latest = (path / "latest.pt").exists()
        foreign = [] if resume or not path.is_dir() else sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise os_error(path, "check the run directory", e, "nothing was written") from None
    if foreign and not any(is_run_file(name) for name in foreign):
        raise RunDirError(
            f"out_dir {path} holds files no run wrote ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
            "; name a new or empty directory, so that the run's files are its own"
        )
    if resume and not has_latest:
        held = "holds no latest.pt (no run there reached its first checkpoint)" if path.is_dir() else "does not exist"
        raise RunDirError(f"nothing to resume: {path} {held}; start the run afresh without --init_from=resume")


def is_run_file(name: str) -> bool:
    """Whether a file of this name is one a run writes in its out_dir (or a run's crash left there)."""
    return name in (*RUN_FILES, ".lock") or name.startswith("metrics.jsonl.") or name.endswith(".tmp")


def check_place(out_dir: str, resolved: Path) -> None:
    """Refuse the current directory, the repository root and the folders above them: a run's files mixed with
    others' are neither one run's nor easy to remove."""
    for place, name in ((Path.cwd().resolve(), "the current directory"), (REPO_ROOT, "the repository root")):
        if resolved == place or resolved in place.parents:
            where = name if resolved == place else f"a folder above {name}"
            raise RunDirError(
                f"out_dir '{out_dir}' is {resolved}, {where}, where the run's files would mix with others; "
                "name a directory of its own, e.g. checkpoints/x"
            )


class RunDirLock:
    """Holds `out_dir/.lock` until `release()` or the end of the process."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.path = out_dir, out_dir / ".lock"
        try:
            self.made_out_dir = not out_dir.exists()
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(out_dir, "create the run directory", e, "nothing was written") from None
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise os_error(self.path, "open the lock file", e, "nothing was written") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunDirError(
                f"{out_dir} is in use by another run (pid {owner}); wait for it to end, or use another --out_dir"
            ) from None

    def take_over(self, out_dir: Path) -> None:
        """Record this process as the owner and remove temporaries that crashed writers left."""
        try:
            self.file.truncate(0)
            self.file.write(f"{os.getpid()}\n")
            self.file.flush()
            for stale in out_dir.glob("*.tmp"):
                stale.unlink()
        except OSError as e:
            self.release()
            raise os_error(self.path, "take the lock", e, "nothing else was written") from None

    def check(self) -> None:
        """Raise unless `.lock` is still the file this run locked: the out_dir was not removed or replaced."""
        if not self.still_mine():
            raise RunDirError(
                f"{self.path} was removed or replaced while this run held it (out_dir deleted or moved?); stopped "
                "without saving, so that no other run's files are overwritten; the checkpoints still there are kept"
            )

    def still_mine(self) -> bool:
        try:
            held = os.stat(self.path)
        except OSError:
            return False
        mine = os.fstat(self.file.fileno())
        return (held.st_dev, held.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Unlock. A run that wrote nothing (it stopped during start-up) leaves nothing behind: neither its `.lock`
        nor the out_dir it made."""
        if self.still_mine() and not any((self.out_dir / name).exists() for name in RUN_FILES):
            with contextlib.suppress(OSError):
                self.path.unlink()
                if self.made_out_dir:
                    self.out_dir.rmdir()  # only if empty: never removes what someone else put there
        self.file.close()  # closing the descriptor releases the flock


def claim(out_dir: Path, resume: bool, overwrite: bool) -> RunDirLock:
    """Lock out_dir for this run; refuse a new run over an old one unless `overwrite`, which removes the old files.
    Metrics without a checkpoint are a run that never got to save: moved aside, never a reason to refuse."""
    lock = RunDirLock(out_dir)
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    try:
        if existing and not resume:
            if not overwrite and any(name in CHECKPOINTS for name in existing):
                raise RunDirError(
                    f"{out_dir} already holds a run ({', '.join(existing)}): continue it with --init_from=resume, "
                    "replace it with --overwrite=true, or choose another --out_dir"
                )
            if overwrite:
                for name in existing:
                    (out_dir / name).unlink()
            else:
                set_aside(out_dir / "metrics.jsonl")
    except BaseException:
        lock.release()
        raise
    lock.take_over(out_dir)
    return lock


def set_aside(metrics: Path) -> None:
    """Rename the metrics of a run that died before its first checkpoint to the first free `<name>.<n>.old`."""
    n = 1
    while metrics.with_name(f"{metrics.name}.{n}.old").exists():
        n += 1
    old = metrics.with_name(f"{metrics.name}.{n}.old")
    try:
        os.rename(metrics, old)
    except OSError as e:
        raise os_error(metrics, "move aside", e, "nothing was changed") from None
    print(f"note: {metrics.parent} held the metrics of a run with no checkpoint; moved them to {old.name}")
