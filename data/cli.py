"""The argument parser of every argparse entry point: a flag given twice is refused, not silently the last.

Design choices:
- train.py refuses `--max_iters=5 --max_iters=7` (training.config.parse_overrides), as a duplicate JSON key is
  refused: one of the two values would be lost without a word. `ArgumentParser` gives sample.py, data/prepare.py,
  scripts/ and `python -m architecture` the same rule, in one line (`error: ...`, exit 2), before any work.
- The check runs after argparse has parsed, so argparse's own errors (a bad value, an ambiguous abbreviation, two
  flags of a mutually exclusive group) read as they always did. It resolves each flag as argparse does: exactly,
  `--flag=value`, or an abbreviation argparse accepts (`--temp` for `--temperature`), so `--temp` then
  `--temperature` is a duplicate too.
- It lives in `data` because that package imports neither torch nor the other packages (as `data.errors` does), so
  the scripts that check their options before importing torch still do.
"""

import argparse
import os
import sys
from collections.abc import Sequence

# The most CPU threads or processes a command takes: beyond a few per core they only thrash (100,000 hung the machine).
MAX_WORKERS = 4 * (os.cpu_count() or 1)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that refuses an option given twice, naming both as they were typed."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = sys.argv[1:] if args is None else list(args)
        parsed = super().parse_known_args(args, namespace)
        seen: dict[argparse.Action, str] = {}  # each option's first spelling, as typed
        for i, arg in enumerate(args):
            if arg == "--":  # what follows is positional
                break
            action = self._action_of(arg)
            if action is None:
                continue
            typed = arg if "=" in arg or action.nargs is not None else f"{arg} {args[i + 1]}"  # one value, parsed
            if action in seen:
                name = max(action.option_strings, key=len)
                self.exit(2, f"error: {seen[action]} and {typed} both set {name}; keep one\n")
            seen[action] = typed
        return parsed

    def _action_of(self, arg: str) -> argparse.Action | None:
        """The option `arg` sets, resolved as argparse resolves it; None for a value or a positional."""
        actions = self._option_string_actions
        key = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if key in actions:
            return actions[key]
        matches = [o for o in actions if o.startswith(key)] if self.allow_abbrev and key.startswith("--") else []
        return actions[matches[0]] if len(matches) == 1 else None
