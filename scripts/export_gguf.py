"""Export a checkpoint or a Hugging Face Gemma 3 directory as GGUF, for llama.cpp, Ollama and LM Studio.

    python scripts/export_gguf.py --ckpt checkpoints/demo --out demo.gguf [--dtype f32|f16|bf16|q8_0]
    python scripts/export_gguf.py --hf-dir exported/demo --out demo-q8_0.gguf --dtype q8_0

The matrices are in the model config's `dtype` unless `--dtype` says otherwise; norms stay f32.
Then `llama-cli -m demo.gguf -p "def main():"`, or in Ollama a Modelfile with `FROM ./demo.gguf` (see README).
"""

import argparse
import sys
from pathlib import Path

from architecture.gguf_export import DTYPES, export_gguf
from data.errors import UserError
from training.checkpoint import CheckpointError, load_model

GGUF_DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # the model config's dtype names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint file, or a run's out_dir (best.pt, else latest.pt)")
    source.add_argument("--hf-dir", help="Hugging Face Gemma 3 directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--dtype", choices=DTYPES, help="matrices' type (default: the model config's; norms stay f32)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.is_dir() or not out.parent.is_dir():
            raise CheckpointError(f"--out {out} must be a file in an existing directory")
        if args.hf_dir and not (Path(args.hf_dir) / "config.json").is_file():
            raise CheckpointError(f"--hf-dir {args.hf_dir} is not a Hugging Face model directory (no config.json)")
        model, tokenizer = load_model(args.ckpt or args.hf_dir)
        dtype = args.dtype or GGUF_DTYPES[model.config.dtype]
        export_gguf(model, tokenizer, out, dtype)
    except (UserError, OSError) as e:  # OSError: the file cannot be written (a full disk, no permission)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {dtype}, tokenizer {tokenizer})")


if __name__ == "__main__":
    main()
