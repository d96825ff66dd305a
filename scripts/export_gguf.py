"""Export a checkpoint or a Hugging Face Gemma 3 directory as GGUF, for llama.cpp, Ollama and LM Studio.

    python scripts/export_gguf.py --ckpt checkpoints/demo --out demo.gguf [--dtype f32|f16|bf16|q8_0]
    python scripts/export_gguf.py --hf-dir exported/demo --out demo-q8_0.gguf --dtype q8_0

The matrices are in the model config's `dtype` unless `--dtype` says otherwise; norms stay f32.
Then `llama-cli -m demo.gguf -p "def main():"`, or in Ollama a Modelfile with `FROM ./demo.gguf` (see README).

The arguments are checked before torch is imported (seconds, tens of them on a busy machine), so a mistyped path
is answered at once.
"""

import argparse
import sys
from pathlib import Path

from data.errors import UserError

DTYPES = ("f32", "f16", "bf16", "q8_0")  # architecture.gguf_export.DTYPES, which cannot be imported without torch
GGUF_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # the model config's dtype names


def check_args(args: argparse.Namespace) -> None:
    """Refuse an --out that cannot be written and a source that is not there; what the source holds is checked
    when it loads."""
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out} must be a file in an existing directory")
    if args.hf_dir and not (Path(args.hf_dir) / "config.json").is_file():
        raise UserError(f"--hf-dir {args.hf_dir} is not a Hugging Face model directory (no config.json)")
    if args.ckpt and not Path(args.ckpt).exists():
        raise UserError(f"checkpoint not found: {Path(args.ckpt)}")


def export(source: str, out: Path, dtype: str | None) -> str:
    """Write the GGUF file of `source` (a checkpoint or a Hugging Face directory); return the line that reports it."""
    from architecture.gguf_export import export_gguf
    from training.checkpoint import load_model

    model, tokenizer = load_model(source)
    dtype = dtype or GGUF_DTYPES[model.config.dtype]
    export_gguf(model, tokenizer, out, dtype)
    return f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {dtype}, tokenizer {tokenizer})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint file, or a run's out_dir (best.pt, else latest.pt)")
    source.add_argument(
        "--hf-dir", help="Hugging Face Gemma 3 directory (config.json, safetensors, tokenizer.json), e.g. exported/demo"
    )
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--dtype", choices=DTYPES, help="matrices' type (default: the model config's; norms stay f32)")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        print(export(args.ckpt or args.hf_dir, Path(args.out), args.dtype))
    except (UserError, OSError) as e:  # OSError: the file cannot be written (a full disk, no permission)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
