"""Export a trained checkpoint as a Hugging Face Gemma 3 directory, with the model's own tokenizer.

    python scripts/export_hf.py --ckpt checkpoints/demo --out exported/demo [--dtype bfloat16]

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (a `Gemma3ForCausalLM`) and
`AutoTokenizer.from_pretrained(out)` (the tokenizer the checkpoint carries: GPT-2's BPE, equal to tiktoken's ids,
or the Hugging Face tokenizer it was fine-tuned with), and with `sample.py --hf-dir out`. The tensors are in the
model config's `dtype` unless `--dtype` says otherwise.

--out is written only when it is new, empty or holds nothing but an earlier export's files (EXPORT_FILES): a
directory with anything else in it (a run's out_dir, another model) needs --force. The files are written into a
temporary directory beside --out and moved in when all are complete, so a failed export (a full disk) leaves --out
as it was; the report lists exactly the files written. The arguments are checked before torch is imported
(seconds, tens of them on a busy machine), so a mistyped path is answered at once.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from architecture.config import DTYPES, file_problem  # torch-free, as is the architecture package's own import
from data.cli import ArgumentParser
from data.errors import UserError

# What an export writes (a GPT-2 tokenizer adds vocab.json and merges.txt): a directory of these alone is replaced.
EXPORT_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse a checkpoint that is not there, an --out that cannot be a directory, and one that holds files an
    export does not write (unless --force); what the checkpoint holds is checked when it loads."""
    try:
        problem = file_problem(Path(args.ckpt), "checkpoint", directory_ok=True)  # or a run's out_dir
        if problem:
            raise UserError(problem)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    except OSError as e:  # a name too long, a directory that cannot be read
        raise UserError(f"cannot check {e.filename} ({e.strerror or e}); nothing was written") from None
    if others and not args.force:
        raise UserError(
            f"--out {out} holds files an export does not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose an empty directory, or pass --force to write there anyway"
        )


def export(ckpt: str, out: Path, dtype: str | None) -> str:
    """Write the export of `ckpt` into `out`; return the line that reports it."""
    from training.checkpoint import load_model

    try:
        model, tokenizer = load_model(ckpt)
    except OSError as e:
        raise UserError(f"cannot read {e.filename or ckpt} ({e.strerror or e}); nothing was written") from None
    dtype = dtype or model.config.dtype
    staging = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        write_export(model, tokenizer, staging, dtype)
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(p.name for p in staging.iterdir())
        for name in files:
            os.replace(staging / name, out / name)
    except OSError as e:  # a full disk, a read-only directory, a path component that is a file
        kept = f"{out} was left as it was" if out.is_dir() else "nothing was written"
        raise UserError(f"cannot write {out} ({e.strerror or e}); {kept}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"wrote {out} ({dtype}, tokenizer {tokenizer}): {', '.join(files)}"


def write_export(model, tokenizer, out: Path, dtype: str) -> None:
    """The model, its generation config and its tokenizer as a Hugging Face directory `out`."""
    import torch

    from architecture.hf_export import export_hf, export_tokenizer
    from data.chat import chat_template

    bos_id = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id  # GPT-2 starts from end-of-text
    special = dict(bos_token_id=bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    export_hf(model, out, getattr(torch, dtype), **special)
    # generate() stops at every id that ends a turn (Gemma's <end_of_turn> and <eos>), as sample.py --chat does.
    generation = {**special, "eos_token_id": sorted(chat_template(tokenizer).stop_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    export_tokenizer(tokenizer, out, model.config.context_length)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or a run's out_dir (best.pt, else latest.pt)")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory, e.g. exported/demo (created if missing); it may hold only an earlier export's files "
        f"({', '.join(sorted(EXPORT_FILES))}), which are replaced, unless --force",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the exported tensors (default: the model config's)")
    parser.add_argument("--force", action="store_true", help="write into an --out that holds other files too")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        print(export(args.ckpt, Path(args.out), args.dtype))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
