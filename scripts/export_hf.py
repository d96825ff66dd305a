"""Export a trained checkpoint as a Hugging Face Gemma 3 directory, tokenizer included.

    python scripts/export_hf.py --ckpt checkpoints/run --out exported/ [--dtype bfloat16]

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` (a `Gemma3ForCausalLM`) and
`AutoTokenizer.from_pretrained(out)` (GPT-2's BPE, equal to tiktoken's ids), and with `sample.py --hf-dir out`.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere in the repo

from architecture import ConfigError  # noqa: E402
from architecture.config import DTYPES  # noqa: E402
from architecture.hf_export import export_hf, write_gpt2_tokenizer  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.tokenizer import EOT_ID, get_tokenizer  # noqa: E402
from sample import SampleError, load_checkpoint_model  # noqa: E402
from training.checkpoint import CheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file, or a run's out_dir (best.pt, else latest.pt)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the exported tensors")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise SampleError(f"--out {out} exists and is not a directory")
        model, _ = load_checkpoint_model(args.ckpt)
        export_hf(model, out, getattr(torch, args.dtype), bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID)
        write_gpt2_tokenizer(get_tokenizer(), out, model.config.context_length)
    except (SampleError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: config.json, model.safetensors ({args.dtype}), tokenizer.json, vocab.json, merges.txt")


if __name__ == "__main__":
    main()
