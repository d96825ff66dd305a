"""Sample text from a trained checkpoint or a local Hugging Face Gemma 3 directory, streaming it as it comes.

    python sample.py --ckpt checkpoints/run --prompt "Once upon a time" --max-new-tokens 200 --temperature 0.8
    python sample.py --hf-dir path/to/gemma-3-270m --prompt-file prompt.txt --temperature 0 --int8 --compile
    python sample.py --ckpt checkpoints/sft --chat --system "Answer in one sentence."     # talk to it, turn by turn
    python sample.py --ckpt checkpoints/sft --messages conversation.json                # answer one conversation

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
  `dtype`, its inference dtype, where bfloat16 means auto: the dtype that decodes fastest on the device
  (`training.device.decode_dtype`). On every CPU measured that is bfloat16, native or not (a decode step reads every
  weight once, so half the bytes win), but float32 activations for `--int8` on a CPU without native bf16, where the
  compiled int8 kernel takes float32; bfloat16 on GPUs with native bf16; float32 elsewhere.
- `--compile` compiles the decode step (`architecture.generate.compile_decode`) and warms it up on the prompt before the
  first sample, so the reported tokens/s is the steady rate; the compilation time is printed on its own. A failed
  compilation (no C++ compiler, a device backend gap) is a one-line note, and sampling goes on uncompiled.
- Options, paths and the prompt are checked before torch is imported (seconds when the machine is idle, tens of
  seconds when it is busy), so a typo is answered at once: the functions that need torch import it themselves.
- Chat (`--chat`, `--messages`) renders the conversation with the model's chat template (data/chat.py, the one its
  training data was rendered with) plus the generation prompt, streams the reply and stops at any end-of-turn id
  (Gemma's `<end_of_turn>` and `<eos>`). A reply cut by --max-new-tokens is closed there (the template ends every
  turn), and when the history outgrows the context, the oldest exchanges go first; a system message stays.
  Each turn prefills the whole history again: a 450-token history costs about 5 decode steps on the demo model (README,
  Chat fine-tuning), so keeping the cache between turns would save little.
- `--threads N` sets torch's CPU threads (default: torch's choice, which honours OMP_NUM_THREADS). On a CPU that
  other jobs share, fewer threads than cores can decode several times faster (each step waits for its slowest
  thread), so the last line reports the count.
"""

import argparse
import itertools
import json
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
    from data.chat import ChatTemplate

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
    prompt.add_argument("--chat", action="store_true", help="talk to the model: each line you type is a user turn")
    prompt.add_argument("--messages", help="a JSON conversation ending with a user turn: answer it once")
    parser.add_argument("--system", help="a system message for --chat or --messages")
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
        help="default: the model config's dtype (bfloat16 there means auto); auto: the fastest to decode on the device",
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
        (args.system is None or args.chat or args.messages, "--system goes with --chat or --messages"),
        (args.num_samples == 1 or not (args.chat or args.messages), "--num-samples is for text, not --chat"),
        (
            not (args.compile and (args.chat or args.messages)),
            "--compile is for text: in a chat each turn's cache has another size, which would compile again",
        ),
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


def resolve_device(name: str, dtype: str, int8: bool = False) -> "tuple[torch.device, torch.dtype]":
    import torch

    from training.device import DeviceError, decode_dtype, select_device

    try:
        device = select_device(name)
    except DeviceError as e:
        raise SampleError(f"--device: {e}") from None
    return device, decode_dtype(device, int8) if dtype == "auto" else getattr(torch, dtype)


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


def read_messages(args: argparse.Namespace) -> list[dict]:
    """The conversation of --messages (with --system first, if given), checked as data/chat.py checks rows; [] or
    just the system message for --chat."""
    from data.chat import prompt_conversation

    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    if not args.messages:
        return system
    path = Path(args.messages)
    problem = file_problem(path, "messages file")
    if problem:
        raise SampleError(problem)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SampleError(f"cannot read a JSON conversation from {path} ({e})") from None
    messages = prompt_conversation(value, str(path))
    if system and messages[0]["role"] == "system":
        raise SampleError(f"{path} has a system message already; drop --system or that message")
    return system + messages


def stream_sample(
    model: "Gemma3Model",
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    args: argparse.Namespace,
    generator: "torch.Generator",
    decode: "DecodeStep",
    stop_ids: frozenset[int] | None = None,
) -> tuple[list[int], float]:
    """Generate and print one sample, up to a stop id (default: the tokenizer's); return (new ids, seconds)."""
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
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    for token in stream:
        token_id = token.item()
        if token_id in stop_ids:
            break
        new_ids.append(token_id)
        text = tokenizer.decode(context + new_ids)
        if not text.endswith("\ufffd"):
            print(text[printed:], end="", flush=True)
            printed = len(text)
    print(tokenizer.decode(context + new_ids)[printed:], flush=True)  # whatever was held back
    return new_ids, time.perf_counter() - start


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
    messages = read_messages(args)
    check_source(args)
    model, tokenizer, dtype = load_for_sampling(args)
    if args.chat or args.messages:
        chat(args, model, tokenizer, messages, dtype)
    else:
        generate_samples(args, model, tokenizer, prompt, dtype)


def settings(args: argparse.Namespace, model: "Gemma3Model", dtype: "torch.dtype", compiled: bool = False) -> str:
    """Where and how the model ran, for the speed line: "cpu, 2 threads, float32 + int8 weights, compiled"."""
    import torch

    device = model.tok_emb.weight.device
    threads = torch.get_num_threads()
    where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else str(device)
    precision = f"{str(dtype).removeprefix('torch.')}{' + int8 weights' if args.int8 else ''}"
    return f"{where}, {precision}{', compiled' if compiled else ''}"


def load_for_sampling(args: argparse.Namespace) -> "tuple[Gemma3Model, Tokenizer, torch.dtype]":
    """The model (in eval mode, on its device and dtype, int8 if asked), its tokenizer and that dtype."""
    import torch

    from architecture.int8 import quantize_int8
    from training.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.ckpt or args.hf_dir)
    config_dtype = "auto" if model.config.dtype == "bfloat16" else model.config.dtype  # auto: the fastest to decode
    device, dtype = resolve_device(args.device, args.dtype or config_dtype, args.int8)
    model.eval()
    if args.int8:
        try:
            quantize_int8(model)  # from the float32 weights, before any cast
        except ValueError as e:  # a width the int8 layout cannot split
            raise SampleError(f"--int8: {e}") from None
    model.to(device=device, dtype=dtype)
    return model, tokenizer, dtype


def check_max_new_tokens(args: argparse.Namespace, context: int) -> None:
    if args.max_new_tokens > MAX_WINDOWS * context:
        raise SampleError(
            f"--max-new-tokens {args.max_new_tokens} is more than {MAX_WINDOWS} x context_length ({context}): past "
            "context_length each token costs a forward over the whole window; generate in several runs"
        )


def chat(
    args: argparse.Namespace, model: "Gemma3Model", tokenizer: Tokenizer, messages: list[dict], dtype: "torch.dtype"
) -> None:
    """Answer --messages once, or talk (--chat): each line read is a user turn, answered and kept in the history
    until /exit or the end of input."""
    import torch

    from architecture.generate import decode_one_token
    from data.chat import chat_template

    template, context = chat_template(tokenizer), model.config.context_length
    check_max_new_tokens(args, context)
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.chat:
        print(f"chatting with the {template.name} chat template; /exit or Ctrl-D to stop", file=sys.stderr)
    while True:
        if args.chat:
            try:
                line = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            if not sys.stdin.isatty():  # piped: echo each turn, so that the output reads as a transcript
                print(f"> {line}")
            if line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
        prompt_ids, dropped = fit_history(template, messages, context - min(args.max_new_tokens, context // 2))
        if dropped:
            print(f"note: the history outgrew the context; dropped its oldest {dropped} exchange(s)", file=sys.stderr)
            first = 1 if messages[0]["role"] == "system" else 0
            del messages[first : first + 2 * dropped]
        new_ids, seconds = stream_sample(
            model, tokenizer, prompt_ids, args, generator, decode_one_token, template.stop_ids
        )
        if len(new_ids) == args.max_new_tokens:
            print(
                f"note: the reply reached --max-new-tokens ({args.max_new_tokens}); its turn ends there",
                file=sys.stderr,
            )
        rate = len(new_ids) / seconds if seconds else 0.0
        print(
            f"{len(new_ids)} tokens in {seconds:.2f} s: {rate:.1f} tokens/s ({len(prompt_ids)}-token prompt, "
            f"{settings(args, model, dtype)})",
            file=sys.stderr,
        )
        messages.append({"role": "assistant", "content": tokenizer.decode(new_ids)})
        if not args.chat:
            break


def fit_history(template: "ChatTemplate", messages: list[dict], budget: int) -> tuple[list[int], int]:
    """The prompt ids of `messages` plus the generation prompt, dropping the oldest user/assistant exchanges (a
    system message stays) until they fit `budget` tokens or only the last user turn is left; and how many went."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system) :], 0
    while True:
        ids = template.render(system + turns, add_generation_prompt=True)[0]
        if len(ids) <= budget or len(turns) == 1:
            return ids, dropped
        turns, dropped = turns[2:], dropped + 1


def generate_samples(
    args: argparse.Namespace, model: "Gemma3Model", tokenizer: Tokenizer, prompt: str, dtype: "torch.dtype"
) -> None:
    """Stream `args.num_samples` continuations of `prompt` and report their speed."""
    import torch

    from architecture.generate import decode_one_token

    device = model.tok_emb.weight.device
    prompt_ids = tokenizer.prompt_ids(prompt)
    context = model.config.context_length
    if len(prompt_ids) > context:
        print(
            f"note: the prompt has {len(prompt_ids)} tokens; keeping its last {context} (context_length)",
            file=sys.stderr,
        )
        prompt_ids = prompt_ids[-context:]
    check_max_new_tokens(args, context)
    compiled = compile_and_warm_up(model, prompt_ids, args.max_new_tokens) if args.compile else None
    decode = compiled or decode_one_token
    generator = torch.Generator(device=device).manual_seed(args.seed)
    total_tokens = total_seconds = longest = 0
    for i in range(args.num_samples):
        if i:
            print("---------------")
        print(tokenizer.decode(prompt_ids) if prompt else "", end="", flush=True)
        new_ids, seconds = stream_sample(model, tokenizer, prompt_ids, args, generator, decode)
        tokens = len(new_ids)
        total_tokens, total_seconds, longest = total_tokens + tokens, total_seconds + seconds, max(longest, tokens)
    if len(prompt_ids) + longest > context:  # said after the text, which a note on stderr would cut in two
        print(
            f"note: prompt and sample reached {len(prompt_ids) + longest} tokens, past context_length ({context}): "
            f"each token past it saw only the last {context}",
            file=sys.stderr,
        )
    rate = total_tokens / total_seconds if total_seconds else 0.0
    print(
        f"{int(total_tokens)} tokens in {total_seconds:.2f} s: {rate:.1f} tokens/s "
        f"({len(prompt_ids)}-token prompt, {settings(args, model, dtype, compiled is not None)})",
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
