"""Sample text from a trained checkpoint or a local Hugging Face Gemma 3 directory, streaming it as it comes.

    python sample.py --ckpt checkpoints/run --prompt "Once upon a time" --max-new-tokens 200 --temperature 0.8
    python sample.py --hf-dir path/to/gemma-3-270m --prompt-file prompt.txt --temperature 0 --int8 --compile

Design choices:
- One code path for both sources: `training.checkpoint.load_model` returns the model and its tokenizer (the one a
  checkpoint carries, or the directory's tokenizer.json), so generation and streaming never ask where the model came
  from. A prompt starts as the model's documents did (Gemma: `<bos>`); an empty GPT-2 prompt is `<|endoftext|>`.
- Everything a user can get wrong (missing file, not a checkpoint, config and weights that disagree, a tokenizer
  that does not fit the model, bad option values) is caught before generating and printed as one `error:` line,
  exit status 2.
- Streaming decodes the new tokens together with a few prompt tokens before them and prints only the text beyond
  that context, holding back an incomplete UTF-8 character ("\ufffd"), so a character split across tokens and a
  tokenizer that drops a word's leading space when it starts a decode both print correctly.
- Samples run one after another (each streamed); `Gemma3Model.generate` batches them for library use.
- Defaults: `--device auto` (CUDA, then MPS, then the CPU; training/device.py); `--dtype` is the model config's
  `dtype`, its inference dtype, except that bfloat16 runs as float32 where the device has no native bf16 (a decode
  step reads every weight once, so half the bytes is about twice the speed where bf16 is native; emulated, it is
  slower than float32).
- `--compile` compiles the decode step (`architecture.generate.compile_decode`) and warms it up on the prompt before the
  first sample, so the reported tokens/s is the steady rate; the compilation time is printed on its own. A failed
  compilation (no C++ compiler, a device backend gap) is a one-line note, and sampling goes on uncompiled.
- Options, paths and the prompt are checked before torch is imported (seconds when the machine is idle, tens of
  seconds when it is busy), so a typo is answered at once: the functions that need torch import it themselves.
- `--threads N` sets torch's CPU threads (default: torch's choice, which honours OMP_NUM_THREADS). On a CPU that
  other jobs share, fewer threads than cores can decode several times faster (each step waits for its slowest
  thread), so the last line reports the count.
"""

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from architecture.config import DTYPES, file_problem
from data.cli import MAX_WORKERS, ArgumentParser
from data.errors import UserError
from data.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported where they are used, once the arguments are checked
    import torch

    from architecture import Gemma3Model
    from architecture.generate import DecodeStep

STREAM_CONTEXT = 8  # prompt tokens decoded with the new ones, so their first word decodes in context
# Past context_length each new token costs a forward over the whole window (the cache cannot slide), so a request
# for many windows of text would run for hours: --max-new-tokens is refused above this many context lengths.
MAX_WINDOWS = 4
MAX_SAMPLES = 1000  # likewise, samples in one command: 10**9 of them ran until killed


class SampleError(UserError, ValueError):
    """Bad input to sample.py; the message is printed as `error: ...`."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Sample text from a checkpoint or a Hugging Face Gemma 3 model.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint file, or a run's out_dir (its best.pt, else latest.pt)")
    source.add_argument("--hf-dir", help="local Hugging Face Gemma 3 directory with tokenizer.json")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    prompt.add_argument("--prompt-file", help="file whose text to continue")
    parser.add_argument(
        "--max-new-tokens", type=int, default=200, help=f"at most {MAX_WINDOWS} x the model's context_length"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337, help="0 to 2**64 - 1 (torch's generator seed)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then the CPU), cuda[:N], mps, cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        help="default: the model config's dtype (bfloat16 there means auto); auto: bfloat16 where native, else float32",
    )
    parser.add_argument("--int8", action="store_true", help="int8 weights for the blocks' Linear layers and the head")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (torch.compile, inference)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: torch's choice, which honours OMP_NUM_THREADS); on a busy CPU fewer can be faster",
    )
    args = parser.parse_args(argv)
    rules = [
        (args.max_new_tokens >= 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        (0 <= args.temperature < math.inf, f"--temperature must be >= 0 and finite, got {args.temperature}"),
        (args.top_k is None or args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}"),
        (args.top_p is None or 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (
            1 <= args.num_samples <= MAX_SAMPLES,
            f"--num-samples must be 1 to {MAX_SAMPLES}, got {args.num_samples} (for more, rerun with another --seed)",
        ),
        (
            args.threads is None or 1 <= args.threads <= MAX_WORKERS,
            f"--threads must be 1 to {MAX_WORKERS} (4 x the CPU count), got {args.threads}",
        ),
        (0 <= args.seed < 2**64, f"--seed must be in [0, 2**64 - 1], got {args.seed}"),
    ]
    for ok, message in rules:
        if not ok:
            raise SampleError(message)
    return args


def check_source(args: argparse.Namespace) -> None:
    """Refuse a --ckpt or --hf-dir that is not there before torch is imported; what a path holds is checked when it
    loads (`training.checkpoint.load_model`)."""
    try:
        problem = args.ckpt and file_problem(Path(args.ckpt), "checkpoint", directory_ok=True)  # or a run's out_dir
        if problem:
            raise SampleError(problem)
        if args.hf_dir and not (Path(args.hf_dir) / "config.json").is_file():
            raise SampleError(f"--hf-dir {args.hf_dir} is not a Hugging Face model directory (no config.json)")
    except OSError as e:  # a name too long, a directory that cannot be searched
        raise SampleError(f"cannot read {e.filename} ({e.strerror}); nothing was generated") from None


def resolve_device(name: str, dtype: str) -> "tuple[torch.device, torch.dtype]":
    import torch

    from training.device import DeviceError, native_bf16, select_device

    try:
        device = select_device(name)
    except DeviceError as e:
        raise SampleError(f"--device: {e}") from None
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16(device) else "float32"
    return device, getattr(torch, dtype)


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt text; a --prompt-file that is a directory or a device (/dev/null) is named as what it is."""
    if args.prompt_file is None:
        return args.prompt
    path = Path(args.prompt_file)
    problem = file_problem(path, "prompt file")
    if problem:
        raise SampleError(problem)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SampleError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:  # no permission, a name too long, a path component that is a file
        raise SampleError(f"cannot read prompt file {path} ({e.strerror}); nothing was generated") from None


def stream_sample(
    model: "Gemma3Model",
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    args: argparse.Namespace,
    generator: "torch.Generator",
    decode: "DecodeStep",
) -> tuple[int, float]:
    """Generate and print one sample; return (new tokens, seconds)."""
    import torch

    from architecture.generate import generate_stream

    device = model.tok_emb.weight.device
    idx = torch.tensor([prompt_ids], device=device)
    context = prompt_ids[-STREAM_CONTEXT:]
    printed, new_ids = len(tokenizer.decode(context)), []
    start = time.perf_counter()
    stream = generate_stream(
        model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator, decode=decode
    )
    for token in stream:
        token_id = token.item()
        if token_id in tokenizer.stop_ids:
            break
        new_ids.append(token_id)
        text = tokenizer.decode(context + new_ids)
        if not text.endswith("\ufffd"):
            print(text[printed:], end="", flush=True)
            printed = len(text)
    print(tokenizer.decode(context + new_ids)[printed:], flush=True)  # whatever was held back
    return len(new_ids), time.perf_counter() - start


def compile_and_warm_up(model: "Gemma3Model", prompt_ids: list[int], max_new_tokens: int) -> "DecodeStep | None":
    """The decode step compiled for this generation's cache size (prompt + new tokens), warmed up by decoding two
    tokens; None if it failed to compile (with a note: the step stays uncompiled)."""
    import torch

    from architecture.generate import compile_decode, generate_stream
    from training.checkpoint import first_line

    decode = compile_decode(model)
    start = time.perf_counter()
    idx = torch.tensor([prompt_ids], device=model.tok_emb.weight.device)
    try:
        for _ in itertools.islice(generate_stream(model, idx, max_new_tokens, temperature=0, decode=decode), 2):
            pass
    except Exception as e:  # torch.compile fails in many ways (no C++ compiler, a backend gap on this device)
        print(f"note: --compile failed, decoding uncompiled: {first_line(e)}", file=sys.stderr)
        return None
    print(f"compiled the decode step in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return decode


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prompt = read_prompt(args)
    check_source(args)
    generate_samples(args, prompt)


def generate_samples(args: argparse.Namespace, prompt: str) -> None:
    """Load the model, then stream `args.num_samples` continuations of `prompt` and report their speed."""
    import torch

    from architecture.generate import decode_one_token
    from architecture.int8 import quantize_int8
    from training.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.ckpt or args.hf_dir)
    config_dtype = "auto" if model.config.dtype == "bfloat16" else model.config.dtype  # auto: where bf16 is native
    device, dtype = resolve_device(args.device, args.dtype or config_dtype)
    model.eval()
    if args.int8:
        quantize_int8(model)  # from the float32 weights, before any cast
    model.to(device=device, dtype=dtype)

    prompt_ids = tokenizer.prompt_ids(prompt)
    context = model.config.context_length
    if len(prompt_ids) > context:
        print(
            f"note: the prompt has {len(prompt_ids)} tokens; keeping its last {context} (context_length)",
            file=sys.stderr,
        )
        prompt_ids = prompt_ids[-context:]
    if args.max_new_tokens > MAX_WINDOWS * context:
        raise SampleError(
            f"--max-new-tokens {args.max_new_tokens} is more than {MAX_WINDOWS} x context_length ({context}): past "
            "context_length each token costs a forward over the whole window; generate in several runs"
        )
    compiled = compile_and_warm_up(model, prompt_ids, args.max_new_tokens) if args.compile else None
    decode = compiled or decode_one_token
    generator = torch.Generator(device=device).manual_seed(args.seed)
    total_tokens = total_seconds = longest = 0
    for i in range(args.num_samples):
        if i:
            print("---------------")
        print(tokenizer.decode(prompt_ids) if prompt else "", end="", flush=True)
        tokens, seconds = stream_sample(model, tokenizer, prompt_ids, args, generator, decode)
        total_tokens, total_seconds, longest = total_tokens + tokens, total_seconds + seconds, max(longest, tokens)
    if len(prompt_ids) + longest > context:  # said after the text, which a note on stderr would cut in two
        print(
            f"note: prompt and sample reached {len(prompt_ids) + longest} tokens, past context_length ({context}): "
            f"each token past it saw only the last {context}",
            file=sys.stderr,
        )
    rate = total_tokens / total_seconds if total_seconds else 0.0
    precision = f"{str(dtype).removeprefix('torch.')}{' + int8 weights' if args.int8 else ''}"
    precision += ", compiled" if compiled else ""
    threads = torch.get_num_threads()
    where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else str(device)
    print(
        f"{int(total_tokens)} tokens in {total_seconds:.2f} s: {rate:.1f} tokens/s "
        f"({len(prompt_ids)}-token prompt, {where}, {precision})",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
