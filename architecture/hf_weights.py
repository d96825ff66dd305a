"""Weights in Hugging Face's layout: read a local Gemma 3 text checkpoint into a `Gemma3Model`.

Design choices:
- safetensors only (a single `model.safetensors` or shards listed in `model.safetensors.index.json`), read one
  tensor at a time: transformers is not needed at run time and no pickle is ever loaded.
- One explicit name table (`hf_names`) maps our parameter names to transformers' names; export uses the same table.
- A hub id (`google/gemma-3-270m`) is fetched once into the Hugging Face cache with `huggingface_hub`, only the
  files a text model needs; without network it is a one-line error saying how to bring the directory over.
- Loading is all or nothing: every missing, unexpected or mis-shaped tensor is listed in one error, and the model
  is touched only once the whole checkpoint has been checked, so nothing is silently left at random init.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from data.errors import UserError

from .config import ConfigError


class WeightsError(UserError, ValueError):
    """A checkpoint's tensors do not match the model; the message lists every problem."""


def hf_names(model: torch.nn.Module) -> dict[str, str]:
    """Our state-dict name -> transformers' `Gemma3ForCausalLM` name, for every parameter of `model`."""
    per_block = {
        "input_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "pre_ffn_norm": "pre_feedforward_layernorm",
        "post_ffn_norm": "post_feedforward_layernorm",
        "attn": "self_attn",
        "mlp": "mlp",
    }
    names = {"tok_emb.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not model.config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            _, index, module, rest = name.split(".", 3)
            names[name] = f"model.layers.{index}.{per_block[module]}.{rest}"
    return names


def read_hf_config(path: str | Path) -> dict:
    """The `config.json` of a Hugging Face checkpoint directory, as a dict."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    return json.loads(config_file.read_text())


HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def hub_snapshot(repo_id: str) -> Path:
    """A local directory holding the hub model `repo_id`, downloaded into the Hugging Face cache if not there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "not available here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(
            f"cannot get {repo_id} from the Hugging Face hub ({type(e).__name__}: {reason}); where there is network, "
            f"run `hf download {repo_id} --local-dir DIR` (gated models: `hf auth login` and accept the license on "
            "huggingface.co first) and pass that directory"
        ) from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing_files = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing_files:
            raise WeightsError(f"{path}: shards listed in the index are missing: {', '.join(missing_files)}")
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise WeightsError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_weights_into(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the weights of the Hugging Face checkpoint at `path` into `model`, converting dtypes as needed."""
    path = Path(path)
    files = _tensor_files(path)
    expected = hf_names(model)
    params = dict(model.named_parameters())
    missing = sorted(hf for hf in expected.values() if hf not in files)
    # A tied checkpoint may still carry lm_head.weight (older transformers saved it); it equals the embedding.
    allowed_extra = {"lm_head.weight"} if model.config.tie_embeddings else set()
    unexpected = sorted(set(files) - set(expected.values()) - allowed_extra)

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, hf in expected.items():
        if hf in files:
            by_file.setdefault(files[hf], []).append((ours, hf))
    tensors, misshaped = {}, []
    for file, pairs in by_file.items():
        with safe_open(file, framework="pt") as f:
            for ours, hf in pairs:
                tensors[ours] = f.get_tensor(hf)
                if tensors[ours].shape != params[ours].shape:
                    shapes = f"checkpoint {tuple(tensors[ours].shape)}, model {tuple(params[ours].shape)}"
                    misshaped.append(f"{hf}: {shapes}")

    problems = [
        *(f"missing: {name}" for name in missing),
        *(f"unexpected: {name}" for name in unexpected),
        *(f"wrong shape: {line}" for line in misshaped),
    ]
    if problems:
        raise WeightsError(f"{path}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for ours, tensor in tensors.items():
            params[ours].copy_(tensor)
