"""The one exception type of the data pipeline.

Design choices:
- `DataError` subclasses `ValueError`: every problem it reports comes from input the user can
  fix (a missing file, an unprepared dataset, a wrong vocab size), never from a bug.
- Its message is one line that says how to fix the problem, so the CLI prints it and exits 2
  instead of showing a traceback from deep inside a library.
"""


class DataError(ValueError):
    """Bad or missing input data; the message says how to fix it."""
