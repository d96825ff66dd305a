"""The user-error base class of every package, and the data pipeline's own error.

Design choices:
- `UserError` marks a problem the user can fix (a missing file, a wrong setting, a bad option), never a bug. Its
  message is one line that says how to fix it, so every entry point catches this one class, prints `error: ...`
  and exits 2, instead of showing a traceback from deep inside a library.
- It lives here because `data` imports neither torch nor the other packages: `architecture` and `training` import
  it from here without a cycle, and `data.prepare` stays free of torch.
- Each package's error subclasses it and keeps its built-in base (`ValueError`, `RuntimeError`), so code that
  catches those still does.
"""


class UserError(Exception):
    """A problem the user can fix; its one-line message says how. Entry points print it and exit 2."""


class DataError(UserError, ValueError):
    """Bad or missing input data; the message says how to fix it."""
