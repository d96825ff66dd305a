"""One run per out_dir: a lock held for the run's life, and no new run over an old one by accident.

Design choices:
- The lock is `flock` on `out_dir/.lock`, taken without waiting: the OS releases it when the process dies, however
  it dies, so a crash never leaves a stale lock. The file holds the owner's pid, for the refusal message.
- A new run (not `--init_from=resume`) in an out_dir that holds a run's files is refused, naming resume and
  `--overwrite=true`; with it, the old run's files are removed first, so the two runs never mix.
- Under the lock, temporaries left by a crash (`*.tmp`) are removed: no other writer can own them.
"""

import fcntl
import os
from pathlib import Path

from data.errors import UserError

RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl")


class RunDirError(UserError, RuntimeError):
    """The out_dir cannot host this run; the message says why and what to do."""


class RunDirLock:
    """Holds `out_dir/.lock` until `release()` or the end of the process."""

    def __init__(self, out_dir: Path) -> None:
        if out_dir.exists() and not out_dir.is_dir():
            raise RunDirError(f"out_dir {out_dir} exists and is not a directory; choose another --out_dir")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / ".lock", "a+")
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
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        for stale in out_dir.glob("*.tmp"):
            stale.unlink()

    def release(self) -> None:
        self.file.close()  # closing the descriptor releases the flock


def claim(out_dir: Path, resume: bool, overwrite: bool) -> RunDirLock:
    """Lock out_dir for this run; refuse a new run over an old one unless `overwrite`, which removes the old files."""
    lock = RunDirLock(out_dir)
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not resume:
        if not overwrite:
            lock.release()
            raise RunDirError(
                f"{out_dir} already holds a run ({', '.join(existing)}): continue it with --init_from=resume, "
                "replace it with --overwrite=true, or choose another --out_dir"
            )
        for name in existing:
            (out_dir / name).unlink()
    lock.take_over(out_dir)
    return lock
