"""Generation speed and KV-cache memory: prefill and decode tokens/s with and without the cache, per weight format.

    python benchmarks/bench_generate.py                        # CPU: a small config, float32
    python benchmarks/bench_generate.py --config config/model_config.json --skip-recompute   # the default 270M
    python benchmarks/bench_generate.py --device cuda          # GPU: the default 270M config, bfloat16
    python benchmarks/bench_generate.py --ckpt checkpoints/run --int8-eval data/<name>   # INT8 perplexity change

Design choices:
- Batch 1, greedy decoding, random weights: speed depends on shapes, not on what the weights say. Each timing is
  taken after one warm-up run; CUDA is synchronised before the clock is read.
- Decode speed is timed from the first new token on, so it excludes the prefill, which is timed on its own.
- Cache memory is measured on the `KVCache` object itself (allocated on the meta device, so 32k tokens cost
  nothing), for the default 270M config in bfloat16, against a cache that keeps every token in every layer.
- A cached decode step reads every weight once, so its limit is (memory bandwidth) / (weight bytes per token).
  The benchmark measures the read bandwidth itself (the best of 5 sums over a 1 GiB tensor, larger than any
  cache) and prints a table, per weight format (float32, bfloat16, int8 weights with float32 or bfloat16
  activations), of decode tokens/s eager and with the compiled decode step (`architecture.generate.compile_decode`)
  and the fraction of the limit reached, headed by the CPU model, its bf16 flags and the thread count. It then
  says what `--dtype auto` and `--int8` pick on this device (`training.device.decode_dtype`) against the fastest
  format measured; the last line is `int8_speedup_vs_float32=R`, compiled against compiled, for what `--int8`
  picks.
- `--int8-eval` compares the val-set loss of a checkpoint per format and int8 kernel on the same batches: float32,
  bfloat16, int8 dequantized exactly (what the compiled CPU word kernel computes), int8 with float32 activations
  rounded to bf16 at each int8 matmul (the eager CPU kernel), and int8 in a bfloat16 model.
"""

import argparse
import math
import time

import torch
from tqdm import tqdm

from architecture import DEFAULT_MODEL_CONFIG, Gemma3Model, KVCache, ModelConfig
from architecture.config import DTYPES
from architecture.generate import DecodeStep, compile_decode, decode_one_token, generate_stream
from architecture.int8 import dequantize_int8, linear_weight_bytes, quantize_int8
from architecture.kv_cache import kv_cache_bytes
from training.device import (
    DeviceError,
    cpu_bf16_flags,
    cpu_model,
    decode_dtype,
    select_device,
    synchronize,
)

# Small enough for a laptop CPU, with both layer types and a window the benchmark runs well past.
SMALL = dict(
    emb_dim=256,
    hidden_dim=1024,
    n_layers=6,
    n_heads=4,
    n_kv_groups=1,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=128,
    context_length=2048,
    layer_types=ModelConfig().layer_types[:6],
)


def time_prefill(model: Gemma3Model, prompt: torch.Tensor) -> float:
    """Seconds from `prompt` to the first new token, as generation runs it: one forward into a fresh cache, the
    head on the last position only (best of 3)."""
    best = math.inf
    for _ in range(3):
        synchronize(prompt.device)
        start = time.perf_counter()
        next(generate_stream(model, prompt, 1, temperature=0))
        synchronize(prompt.device)
        best = min(best, time.perf_counter() - start)
    return best


def decode_rate(
    model: Gemma3Model, prompt: torch.Tensor, new_tokens: int, use_cache: bool, decode: DecodeStep = decode_one_token
) -> float:
    """Tokens per second after the first new token (so the prefill is not counted)."""
    stream = generate_stream(model, prompt, new_tokens, temperature=0, use_cache=use_cache, decode=decode)
    next(stream)
    synchronize(prompt.device)
    start = time.perf_counter()
    for _ in stream:
        pass
    synchronize(prompt.device)
    return (new_tokens - 1) / (time.perf_counter() - start)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second the device's memory reads: the best of 5 sums over a 1 GiB tensor."""
    source = torch.ones(2**28, device=device)
    best = math.inf
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        source.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return source.numel() * source.element_size() / best


def weight_bytes_per_token(model: Gemma3Model) -> int:
    """Bytes of weights a cached decode step reads: every block and norm weight, and the head (the embedding when
    tied); of the embedding lookup itself only one row, which is negligible."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if not model.config.tie_embeddings:
        del tensors[id(model.tok_emb.weight)]
    return sum(t.numel() * t.element_size() for t in tensors.values())


# Weight formats: (activation dtype, int8 weights). Each runs eager and with the compiled decode step.
FORMATS = {
    "float32": (torch.float32, False),
    "bfloat16": (torch.bfloat16, False),
    "int8, float32 activations": (torch.float32, True),
    "int8, bfloat16 activations": (torch.bfloat16, True),
}


def format_name(dtype: torch.dtype, int8: bool) -> str:
    return next(name for name, spec in FORMATS.items() if spec == (dtype, int8))


def format_report(config: ModelConfig, device: torch.device, prompt_len: int, new_tokens: int) -> None:
    """Decode tokens/s per weight format, eager and compiled, against the memory-bandwidth limit; what `--dtype
    auto` and `--int8` pick here against the fastest measured; last line int8_speedup_vs_float32."""
    bandwidth = memory_bandwidth(device)
    where = f"{cpu_model()} ({cpu_bf16_flags()}), {torch.get_num_threads()} threads" if device.type == "cpu" else device
    print(f"decode per weight format: {where}, memory read bandwidth {bandwidth / 1e9:.1f} GB/s (best of 5 sums)")
    print("| weights | MB a token | eager tok/s | compiled tok/s | bandwidth limit tok/s | reached (best) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rates = {}
    for name, (dtype, int8) in FORMATS.items():
        torch.manual_seed(0)
        model = Gemma3Model(config).eval()
        if int8:
            quantize_int8(model)
        model.to(device=device, dtype=dtype)
        prompt = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
        nbytes = weight_bytes_per_token(model)
        for compiled in (False, True):
            decode = compile_decode(model) if compiled else decode_one_token
            decode_rate(model, prompt, new_tokens, True, decode)  # warm-up (and compilation) at this cache size
            rates[name, compiled] = decode_rate(model, prompt, new_tokens, True, decode)
        eager, compiled = rates[name, False], rates[name, True]
        limit = bandwidth / nbytes
        print(
            f"| {name} | {nbytes / 1e6:.1f} | {eager:.1f} | {compiled:.1f} | {limit:.1f} | "
            f"{max(eager, compiled) / limit:.1%} |",
            flush=True,
        )
    auto = format_name(decode_dtype(device), False)
    int8 = format_name(decode_dtype(device, int8=True), True)
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        fastest = max(FORMATS, key=lambda name: rates[name, compiled])
        print(
            f"  {mode}: --dtype auto picks {auto} ({rates[auto, compiled] / rates['float32', compiled]:.2f}x "
            f"float32), --int8 picks {int8} ({rates[int8, compiled] / rates['float32', compiled]:.2f}x float32); "
            f"fastest measured: {fastest}"
        )
    print(f"int8_speedup_vs_float32={rates[int8, True] / rates['float32', True]:.2f}")


def cache_memory_report(config: ModelConfig) -> None:
    n_full = sum(layer.window is None for layer in config.layer_attention)
    n_sliding = config.n_layers - n_full
    print(f"KV cache, default 270M config in bfloat16 ({n_full} full + {n_sliding} sliding layers, batch 1):")
    for tokens in (1024, 8192, 32768):
        cache = KVCache(config, 1, min(tokens, config.context_length), "meta", torch.bfloat16)
        ideal = kv_cache_bytes(config, tokens, dtype_bytes=2)
        no_ring = kv_cache_bytes(config, tokens, dtype_bytes=2, rings=False)
        print(
            f"  {tokens:>6} tokens: {cache.nbytes() / 2**20:8.2f} MiB with rings ({cache.nbytes() / ideal:.4f}x "
            f"ideal), {no_ring / 2**20:8.2f} MiB without ({no_ring / cache.nbytes():.1f}x more)"
        )


def bench_config(args: argparse.Namespace, device: torch.device) -> ModelConfig:
    """--config, else the default 270M config on CUDA and the small one elsewhere."""
    if args.config:
        return ModelConfig.from_json(args.config)
    return ModelConfig.from_json(DEFAULT_MODEL_CONFIG) if device.type == "cuda" else ModelConfig(**SMALL)


def speed_report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    config = bench_config(args, device)
    torch.manual_seed(0)
    model = Gemma3Model(config).eval().to(device=device, dtype=dtype)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device)
    name = args.config or ("default 270M config" if device.type == "cuda" else "small config")
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: {params / 1e6:.1f}M parameters, {device}, {str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"  prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batch 1, greedy")

    decode_rate(model, prompt, 8, use_cache=True)  # warm-up
    prefill = time_prefill(model, prompt)
    print(f"  prefill:               {args.prompt_len / prefill:10.1f} tokens/s")
    cached = decode_rate(model, prompt, args.new_tokens, use_cache=True)
    print(f"  decode with cache:     {cached:10.1f} tokens/s")
    if not args.skip_recompute:
        recomputed = decode_rate(model, prompt, args.new_tokens, use_cache=False)
        print(f"  decode, recomputation: {recomputed:10.1f} tokens/s  (cache is {cached / recomputed:.1f}x faster)")
    if args.int8:
        sizes = linear_weight_bytes(quantize_int8(model))
        int8 = decode_rate(model, prompt, args.new_tokens, use_cache=True)
        print(f"  decode with cache, int8 weights: {int8:10.1f} tokens/s")
        print(
            f"  Linear weights (blocks and head): int8 {sizes['stored'] / 2**20:.1f} MiB, bfloat16 "
            f"{sizes['bfloat16'] / 2**20:.1f} MiB ({sizes['bfloat16'] / sizes['stored']:.2f}x), float32 "
            f"{sizes['float32'] / 2**20:.1f} MiB ({sizes['float32'] / sizes['stored']:.2f}x)"
        )


def int8_eval(args: argparse.Namespace, device: torch.device) -> None:
    """Val loss and perplexity of a checkpoint per weight format and int8 kernel, on identical batches."""
    from data.loader import BatchLoader
    from training.checkpoint import load_model

    def exact_int8(model: Gemma3Model) -> Gemma3Model:
        return dequantize_int8(quantize_int8(model))

    formats = [  # label, dtype, weight transform (from the float32 weights)
        ("float32", torch.float32, None),
        ("bfloat16", torch.bfloat16, None),
        ("int8, float32 activations, exact (the compiled CPU word kernel)", torch.float32, exact_int8),
        ("int8, float32 activations rounded to bf16 at the int8 matmul (eager CPU)", torch.float32, quantize_int8),
        ("int8, bfloat16 activations (int8 matmul kernel)", torch.bfloat16, quantize_int8),
    ]
    losses = {}
    for label, dtype, transform in formats:
        model, tokenizer = load_model(args.ckpt)
        if transform:
            transform(model)
        model.eval().to(device=device, dtype=dtype)
        block = min(args.block_size, model.config.context_length)
        loader = BatchLoader(args.int8_eval, "val", args.batch_size, block, device, seed=0, tokenizer=tokenizer)
        total = 0.0
        print(f"  {label}: {args.eval_batches} batches of {args.batch_size} x {block} tokens...", flush=True)
        with torch.no_grad():
            for _ in tqdm(range(args.eval_batches), desc=label, leave=False, disable=None):  # bar on a terminal only
                x, y = loader.next_batch()
                total += model(x, y)[1].item()
        losses[label] = total / args.eval_batches
        change = math.exp(losses[label] - losses["float32"]) - 1
        print(
            f"  {label}: val loss {losses[label]:.4f}, perplexity {math.exp(losses[label]):.3f} "
            f"({100 * change:+.2f}% against float32)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda[:N], mps, cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument(
        "--config", help="model config JSON (default: small on the CPU, the default 270M config on CUDA)"
    )
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--skip-recompute", action="store_true", help="skip the slow decode without cache")
    parser.add_argument("--int8", action="store_true", help="also time decoding with int8 weights")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--ckpt", help="checkpoint, run directory or Hugging Face directory for --int8-eval")
    parser.add_argument("--int8-eval", metavar="DATA_DIR", help="prepared dataset dir: val perplexity float vs int8")
    parser.add_argument("--eval-batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512)
    args = parser.parse_args()
    try:
        device = select_device(args.device)
    except DeviceError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.int8_eval:
        if not args.ckpt:
            parser.error("--int8-eval needs --ckpt")
        int8_eval(args, device)
        return
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    speed_report(args, device, dtype)
    cache_memory_report(ModelConfig.from_json(DEFAULT_MODEL_CONFIG))
    format_report(bench_config(args, device), device, args.prompt_len, args.new_tokens)


if __name__ == "__main__":
    main()
