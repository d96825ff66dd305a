"""Train a Gemma 3 model: `python train.py [--config FILE] [--key=value ...]`.

Reads config/training_config.json (or --config FILE), applies --key=value overrides, and trains; see
training/config.py for every setting. Multi-GPU: `torchrun --nproc_per_node=N train.py ...`.
"""

import argparse
import dataclasses
import sys

from data.errors import UserError
from training.checkpoint import first_line
from training.config import DEFAULT_TRAINING_CONFIG, TrainingConfig, load_training_config
from training.trainer import train


def main() -> None:
    settings = "\n".join(
        f"  --{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()}"
        for f in dataclasses.fields(TrainingConfig)
    )
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"settings (defaults shown; the config file's values override them):\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_TRAINING_CONFIG), help="training config JSON")
    args, overrides = parser.parse_known_args()
    try:
        train(load_training_config(args.config, overrides))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the loop took over Ctrl-C, or a second Ctrl-C
        print("interrupted: stopped without saving; the checkpoints on disk are as they were", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        print(
            f"error: out of memory ({first_line(e)}); lower batch_size or block_size. Checkpoints on disk are kept",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
