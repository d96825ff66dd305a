"""`python -m architecture [--config FILE]`: parameter count by component and KV-cache size of a model config."""

import sys

import torch

from data.cli import ArgumentParser
from data.errors import UserError

from . import DEFAULT_MODEL_CONFIG, Gemma3Model, ModelConfig
from .kv_cache import kv_cache_bytes


def parameter_counts(model: Gemma3Model) -> dict[str, int]:
    """Parameters per component; a tied output head counts once, under the embedding."""
    counts = {"embedding": 0, "attention": 0, "feed-forward": 0, "norms": 0, "output head": 0}
    for name, p in model.named_parameters():  # named_parameters yields a shared (tied) tensor once
        if name.startswith("tok_emb"):
            counts["embedding"] += p.numel()
        elif name.startswith("lm_head"):
            counts["output head"] += p.numel()
        elif "norm" in name:
            counts["norms"] += p.numel()
        elif ".attn." in name:
            counts["attention"] += p.numel()
        else:
            counts["feed-forward"] += p.numel()
    return counts


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_MODEL_CONFIG), help="model config JSON")
    args = parser.parse_args()
    try:
        config = ModelConfig.from_json(args.config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with torch.device("meta"):  # counts need shapes only, not 650 MB of random numbers
        model = Gemma3Model(config)

    counts = parameter_counts(model)
    n_full = sum(layer.window is None for layer in config.layer_attention)
    print(f"{args.config}: {config.n_layers} layers ({n_full} full attention)")
    for component, n in counts.items():
        print(f"  {component:<14}{n:>15,}")
    print(
        f"  {'total':<14}{sum(counts.values()):>15,}"
        + ("  (output head tied to embedding)" if config.tie_embeddings else "")
    )

    dtype_bytes = getattr(torch, config.dtype).itemsize
    per_token = kv_cache_bytes(config, 1, dtype_bytes, rings=False)
    print(
        f"KV cache in {config.dtype}: {per_token:,} bytes per token while all layers grow "
        f"(sequences up to the {config.sliding_window}-token window)"
    )
    for tokens in (1024, 8192, config.context_length):
        size = kv_cache_bytes(config, tokens, dtype_bytes)
        print(
            f"  {tokens:>6} tokens: {size / 2**20:9.1f} MiB with sliding-window ring buffers, "
            f"{per_token * tokens / 2**20:9.1f} MiB without"
        )


if __name__ == "__main__":
    main()
