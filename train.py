"""Train a Gemma 3 model: `python train.py [--config FILE] [--key=value ...]`.

Reads config/training_config.json (or --config FILE), applies --key=value overrides, and trains; `--help` describes
every setting (training/config.py defines them). Multi-GPU: `torchrun --nproc_per_node=N train.py ...`.

The arguments and the config file are checked before torch and the trainer are imported, which takes seconds (tens
on a busy CPU): a typo is answered at once.
"""

import argparse
import os
import signal
import sys

from data.cli import ArgumentParser
from data.errors import UserError
from training.config import DEFAULT_TRAINING_CONFIG, load_training_config, settings_help
from training.run_dir import check_out_dir


def stop_during_start_up(signum, frame) -> None:
    """SIGTERM or SIGHUP before the training loop installs its own handlers: nothing to save yet, so stop as a
    second Ctrl-C does (the KeyboardInterrupt branch below), instead of dying without a word."""
    raise KeyboardInterrupt


def main() -> None:
    try:  # around the handlers themselves: a signal may arrive the moment one is installed
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, stop_during_start_up)
        parser = ArgumentParser(
            description=__doc__.split("\n\n")[0], add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        parser.add_argument("-h", "--help", action="store_true", help="show every setting, with --config's values")
        parser.add_argument("--config", default=str(DEFAULT_TRAINING_CONFIG), help="training config JSON")
        args, overrides = parser.parse_known_args()
        if args.help:
            parser.epilog = settings_help(args.config)
            parser.print_help()
            return
        config = load_training_config(args.config, overrides)
        if os.environ.get("RANK", "0") == "0":  # the trainer checks it again; here it is answered before torch loads
            check_out_dir(config.out_dir, resume=config.init_from == "resume")
        from training.trainer import train  # torch and the model: only once the arguments are known to be good

        train(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the loop took over Ctrl-C, or a second Ctrl-C
        print("interrupted: stopped without saving; the checkpoints on disk are as they were", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a file operation no module turned into its own line: name the file, keep the rest
        print(
            f"error: cannot access {e.filename or 'a file'} ({e.strerror or e}); checkpoints on disk are kept",
            file=sys.stderr,
        )
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        from training.checkpoint import first_line  # loaded with the trainer by now

        print(
            f"error: out of memory ({first_line(e)}); lower batch_size or block_size. Checkpoints on disk are kept",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
