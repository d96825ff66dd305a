"""Sample text from a trained checkpoint or a local Hugging Face Gemma 3 directory, streaming it as it comes.

    python sample.py --ckpt checkpoints/run --prompt "Once upon a time" --max-new-tokens 200 --temperature 0.8
    python sample.py --hf-dir path/to/gemma-3-270m --prompt-file prompt.txt --temperature 0 --int8

Design choices:
- One code path for both sources: each loader returns the model and a `Codec` (encode, decode, the id an empty
  prompt starts from, the end-of-text ids), so generation and streaming never ask where the model came from.
- Everything a user can get wrong (missing file, not a checkpoint, config and weights that disagree, a tokenizer
  that does not fit the model, bad option values) is caught before generating and printed as one `error:` line,
  exit status 2.
- Streaming decodes the new tokens together with a few prompt tokens before them and prints only the text beyond
  that context, holding back an incomplete UTF-8 character ("\ufffd"), so a character split across tokens and a
  tokenizer that drops a word's leading space when it starts a decode both print correctly.
- Samples run one after another (each streamed); `Gemma3Model.generate` batches them for library use.
- Defaults: CUDA in bfloat16 when available, else the CPU in float32 (CPU bfloat16 matmuls are often slower).
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from architecture import ConfigError, Gemma3Model, WeightsError
from architecture.config import DTYPES
from architecture.hf_weights import read_hf_config
from architecture.int8 import quantize_int8
from data.errors import DataError
from data.tokenizer import EOT_ID, get_tokenizer
from training.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, model_from_checkpoint

STREAM_CONTEXT = 8  # prompt tokens decoded with the new ones, so their first word decodes in context


class SampleError(ValueError):
    """Bad input to sample.py; the message is printed as `error: ...`."""


@dataclass
class Codec:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    start_id: int  # what an empty prompt starts from
    eos_ids: set[int]


def load_checkpoint_model(path: str) -> tuple[Gemma3Model, Codec]:
    """Model and GPT-2 codec of a checkpoint file, or of a run directory's best.pt / latest.pt."""
    file = find_checkpoint(path)
    state = load_checkpoint(file)
    if state.get("tokenizer", "gpt2") != "gpt2":
        raise SampleError(f"{file} was trained with tokenizer {state['tokenizer']!r}; only 'gpt2' is supported")
    model = model_from_checkpoint(state, file)
    encoding = get_tokenizer()
    if model.config.vocab_size != encoding.n_vocab:
        raise SampleError(
            f"{file}: the model's vocab_size is {model.config.vocab_size} but its tokenizer (gpt2) has "
            f"{encoding.n_vocab} tokens"
        )
    codec = Codec(encoding.encode_ordinary, encoding.decode, EOT_ID, {EOT_ID})
    return model, codec


def _ids(value) -> set[int]:
    return set() if value is None else {value} if isinstance(value, int) else set(value)


def load_hf_model(path: str) -> tuple[Gemma3Model, Codec]:
    """Model and codec of a local Hugging Face Gemma 3 directory (config.json, safetensors, tokenizer.json)."""
    directory = Path(path)
    if not directory.is_dir():
        raise SampleError(f"Hugging Face directory not found: {directory}")
    if not (directory / "tokenizer.json").is_file():
        raise SampleError(f"{directory}: no tokenizer.json (the tokenizers library's file) to encode prompts with")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    model = Gemma3Model.from_hf(str(directory))
    hf_config = read_hf_config(directory)
    # The base vocabulary must fit the embedding; added control tokens past it (e.g. an image token) never occur.
    vocab = tokenizer.get_vocab_size(with_added_tokens=False)
    if vocab > model.config.vocab_size:
        raise SampleError(
            f"{directory}: tokenizer.json has {vocab} tokens but the model's vocab_size is {model.config.vocab_size}"
        )

    eos_ids = _ids(hf_config.get("eos_token_id"))
    for name in ("generation_config.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            extra = json.loads((directory / name).read_text())
            eos_ids |= _ids(extra.get("eos_token_id"))
            eos_token = extra.get("eos_token")
            eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
            if isinstance(eos_token, str) and tokenizer.token_to_id(eos_token) is not None:
                eos_ids.add(tokenizer.token_to_id(eos_token))
    start = tokenizer.encode("").ids  # tokenizers that add a BOS give it here
    bos = hf_config.get("bos_token_id")
    start_id = start[0] if start else bos if bos is not None else min(eos_ids, default=0)
    codec = Codec(
        lambda text: tokenizer.encode(text).ids,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        start_id,
        eos_ids,
    )
    return model, codec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample text from a checkpoint or a Hugging Face Gemma 3 model.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint file, or a run's out_dir (its best.pt, else latest.pt)")
    source.add_argument("--hf-dir", help="local Hugging Face Gemma 3 directory with tokenizer.json")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-text)")
    prompt.add_argument("--prompt-file", help="file whose text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA")
    parser.add_argument("--int8", action="store_true", help="int8 weights for the blocks' Linear layers")
    args = parser.parse_args(argv)
    rules = [
        (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
        (args.top_k is None or args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}"),
        (args.top_p is None or 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}"),
    ]
    for ok, message in rules:
        if not ok:
            raise SampleError(message)
    return args


def resolve_device(name: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleError(f"--device {name!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, getattr(torch, dtype)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    path = Path(args.prompt_file)
    if not path.is_file():
        raise SampleError(f"prompt file not found: {path}")
    return path.read_text(encoding="utf-8")


def stream_sample(
    model: Gemma3Model, codec: Codec, prompt_ids: list[int], args, generator: torch.Generator
) -> tuple[int, float]:
    """Generate and print one sample; return (new tokens, seconds)."""
    device = model.tok_emb.weight.device
    idx = torch.tensor([prompt_ids], device=device)
    context = prompt_ids[-STREAM_CONTEXT:]
    printed, new_ids = len(codec.decode(context)), []
    start = time.perf_counter()
    stream = model.generate_stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator)
    for token in stream:
        token_id = token.item()
        if token_id in codec.eos_ids:
            break
        new_ids.append(token_id)
        text = codec.decode(context + new_ids)
        if not text.endswith("\ufffd"):
            print(text[printed:], end="", flush=True)
            printed = len(text)
    print(codec.decode(context + new_ids)[printed:], flush=True)  # whatever was held back
    return len(new_ids), time.perf_counter() - start


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = resolve_device(args.device, args.dtype)
    prompt = read_prompt(args)
    model, codec = load_checkpoint_model(args.ckpt) if args.ckpt else load_hf_model(args.hf_dir)
    model.eval()
    if args.int8:
        quantize_int8(model)  # from the float32 weights, before any cast
    model.to(device=device, dtype=dtype)

    prompt_ids = codec.encode(prompt) if prompt else [codec.start_id]
    context = model.config.context_length
    if len(prompt_ids) > context:
        print(
            f"note: the prompt has {len(prompt_ids)} tokens; keeping its last {context} (context_length)",
            file=sys.stderr,
        )
        prompt_ids = prompt_ids[-context:]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    total_tokens = total_seconds = 0.0
    for i in range(args.num_samples):
        if i:
            print("---------------")
        print(codec.decode(prompt_ids) if prompt else "", end="", flush=True)
        tokens, seconds = stream_sample(model, codec, prompt_ids, args, generator)
        total_tokens, total_seconds = total_tokens + tokens, total_seconds + seconds
    rate = total_tokens / total_seconds if total_seconds else 0.0
    precision = f"{str(dtype).removeprefix('torch.')}{' + int8 weights' if args.int8 else ''}"
    print(
        f"{int(total_tokens)} tokens in {total_seconds:.2f} s: {rate:.1f} tokens/s "
        f"({len(prompt_ids)}-token prompt, {device}, {precision})",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except (SampleError, CheckpointError, ConfigError, WeightsError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
