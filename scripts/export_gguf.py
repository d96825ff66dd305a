"""Export a checkpoint or a Hugging Face Gemma 3 directory as GGUF, for llama.cpp, Ollama and LM Studio.

    python scripts/export_gguf.py --ckpt checkpoints/demo --out demo.gguf [--dtype f32|f16|bf16|q8_0]
    python scripts/export_gguf.py --hf-dir exported/demo --out demo-q8_0.gguf --dtype q8_0

The matrices are in the model config's `dtype` unless `--dtype` says otherwise; norms stay f32.
Then `llama-cli -m demo.gguf -p "def main():"`, or in Ollama a Modelfile with `FROM ./demo.gguf` (see README).

An existing --out is replaced only with --force; the file is written whole under a temporary name, then renamed,
so a failed export (a full disk) leaves what was there. The arguments are checked before torch is imported
(seconds, tens of them on a busy machine), so a mistyped path is answered at once.
"""

import argparse
import os
import sys
from pathlib import Path

from architecture.config import file_problem
from data.cli import ArgumentParser
from data.errors import UserError

DTYPES = ("f32", "f16", "bf16", "q8_0")  # architecture.gguf_export.DTYPES, which cannot be imported without torch
GGUF_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # the model config's dtype names


def check_args(args: argparse.Namespace) -> None:
    """Refuse an --out that cannot be written or is already there (without --force) and a source that is not there;
    what the source holds is checked when it loads."""
    out = Path(args.out)
    try:
        if out.is_dir() or not out.parent.is_dir():
            raise UserError(f"--out {out} must be a file in an existing directory")
        if not os.access(out.parent, os.W_OK):
            raise UserError(f"--out {out} cannot be written: {out.parent} is read-only or not ours to write")
        if out.exists() and not out.is_file():  # a device such as /dev/null: --force must not put a file in its place
            raise UserError(f"{file_problem(out, '--out')}; name a file to write")
        if out.exists() and not args.force:
            raise UserError(f"--out {out} exists; pass --force to replace it, or choose another name")
        if args.hf_dir and not (Path(args.hf_dir) / "config.json").is_file():
            raise UserError(f"--hf-dir {args.hf_dir} is not a Hugging Face model directory (no config.json)")
        problem = args.ckpt and file_problem(Path(args.ckpt), "checkpoint", directory_ok=True)  # or a run's out_dir
        if problem:
            raise UserError(problem)
    except OSError as e:  # a name too long, a directory that cannot be searched
        raise UserError(f"cannot check {e.filename} ({e.strerror or e}); nothing was written") from None


def export(source: str, out: Path, dtype: str | None) -> str:
    """Write the GGUF file of `source` (a checkpoint or a Hugging Face directory); return the line that reports it."""
    from architecture.gguf_export import export_gguf
    from training.checkpoint import load_model

    try:
        model, tokenizer = load_model(source)
    except OSError as e:
        raise UserError(f"cannot read {e.filename or source} ({e.strerror or e}); nothing was written") from None
    dtype = dtype or GGUF_DTYPES[model.config.dtype]
    try:
        export_gguf(model, tokenizer, out, dtype)
    except OSError as e:  # a full disk, a read-only directory: the temporary file is gone, --out as it was
        kept = f"{out} was left as it was" if out.exists() else "nothing was written"
        raise UserError(f"cannot write {out} ({e.strerror or e}); {kept}") from None
    return f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {dtype}, tokenizer {tokenizer})"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint file, or a run's out_dir (best.pt, else latest.pt)")
    source.add_argument(
        "--hf-dir", help="Hugging Face Gemma 3 directory (config.json, safetensors, tokenizer.json), e.g. exported/demo"
    )
    parser.add_argument("--out", required=True, help="the .gguf file to write (an existing one only with --force)")
    parser.add_argument("--dtype", choices=DTYPES, help="matrices' type (default: the model config's; norms stay f32)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        print(export(args.ckpt or args.hf_dir, Path(args.out), args.dtype))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
