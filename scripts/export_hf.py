"""Export a trained checkpoint as a Hugging Face Gemma 3 directory, with the model's own tokenizer.

    python scripts/export_hf.py --ckpt checkpoints/demo --out exported/demo [--dtype bfloat16]

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (a `Gemma3ForCausalLM`) and
`AutoTokenizer.from_pretrained(out)` (the tokenizer the checkpoint carries: GPT-2's BPE, equal to tiktoken's ids,
or the Hugging Face tokenizer it was fine-tuned with), and with `sample.py --hf-dir out`. The tensors are in the
model config's `dtype` unless `--dtype` says otherwise.

The arguments are checked before torch is imported (seconds, tens of them on a busy machine), so a mistyped path
is answered at once.
"""

import argparse
import json
import sys
from pathlib import Path

from architecture.config import DTYPES  # torch-free, as is the architecture package's own import
from data.errors import UserError


def check_args(args: argparse.Namespace) -> None:
    """Refuse a checkpoint that is not there or an --out that cannot be a directory; what the checkpoint holds is
    checked when it loads."""
    if not Path(args.ckpt).exists():
        raise UserError(f"checkpoint not found: {Path(args.ckpt)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")


def export(ckpt: str, out: Path, dtype: str | None) -> str:
    """Write the export of `ckpt` into `out`; return the line that reports it."""
    import torch

    from architecture.hf_export import export_hf, export_tokenizer
    from training.checkpoint import load_model

    model, tokenizer = load_model(ckpt)
    dtype = dtype or model.config.dtype
    bos_id = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id  # GPT-2 starts from end-of-text
    special = dict(bos_token_id=bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
    export_hf(model, out, getattr(torch, dtype), **special)
    generation = {**special, "eos_token_id": sorted(tokenizer.stop_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    export_tokenizer(tokenizer, out, model.config.context_length)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    return f"wrote {out} ({dtype}, tokenizer {tokenizer}): {files}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or a run's out_dir (best.pt, else latest.pt)")
    parser.add_argument("--out", required=True, help="output directory, e.g. exported/demo (created if missing)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of the exported tensors (default: the model config's)")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        print(export(args.ckpt, Path(args.out), args.dtype))
    except (UserError, OSError) as e:  # OSError: the files cannot be written (a full disk, no permission)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
