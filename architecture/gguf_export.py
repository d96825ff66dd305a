"""Export to GGUF for llama.cpp's `gemma3` architecture, so trained models run in llama.cpp, Ollama and LM Studio.

Design choices:
- Written with the `gguf` package (llama.cpp's own writer, on PyPI), with the keys and tensor names llama.cpp's
  convert_hf_to_gguf.py writes for Gemma 3.
- llama.cpp's gemma3 graph hard-codes what our config can change, so such configs are refused with the reason
  (`llama_cpp_problems`): layer i is sliding exactly when i % 6 < 5; sliding layers use RoPE base 10,000; queries are
  scaled by head_dim^-0.5 (by (emb_dim / n_heads)^-0.5 for 62-layer models), i.e. query_pre_attn_scalar must be
  that; there is no RoPE scaling and no logit soft-capping (our model has neither).
- Norm weights: Gemma's RMSNorm scales by (1 + weight), llama.cpp's graph by the stored weight, so the file stores
  weight + 1, in float32 (as llama.cpp's converter keeps every 1-D tensor).
- The output head is written only when untied; a tied model reuses token_embd, as llama.cpp expects.
- q8_0 goes through the `gguf` package's own quantizer (blocks of 32 values, one float16 scale each); a matrix whose
  rows do not divide into such blocks falls back to float16, as llama.cpp's converter does.
- The tokenizer is byte-level BPE ("gpt2" model, "gpt-2" pre-tokenizer): tokens in id order, merges in rank order,
  `<|endoftext|>` a control token and the bos / eos / eot / padding id. A Hugging Face tokenizer is written the same
  way when it is byte-level BPE with GPT-2's split; any other (Gemma's own) is refused, naming llama.cpp's converter
  on our Hugging Face export as the path.
- The file is written to a temporary name and renamed when complete.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from data.errors import UserError

from .hf_export import gpt2_vocab_and_merges

DTYPES = ("f32", "f16", "bf16", "q8_0")
NORMS = {
    "input_norm": "attn_norm",
    "post_attn_norm": "post_attention_norm",
    "pre_ffn_norm": "ffn_norm",
    "post_ffn_norm": "post_ffw_norm",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
}
MATRICES = {
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LLAMA_CPP_CONVERTER = (
    "export it with scripts/export_hf.py and convert that directory with llama.cpp's own convert_hf_to_gguf.py"
)


class GGUFExportError(UserError, ValueError):
    """The model or its tokenizer cannot be expressed in llama.cpp's gemma3 GGUF; the message says why."""


def llama_cpp_problems(config) -> list[str]:
    """What in `config` llama.cpp's gemma3 graph would compute differently (empty when it computes the same)."""
    problems = []
    slides = [layer.window == config.sliding_window for layer in config.layer_attention]
    if slides != [i % 6 < 5 for i in range(config.n_layers)]:
        problems.append("layer_types must be five sliding layers then one full layer, repeated (llama.cpp assumes it)")
    if config.rope_local_base != 10_000:
        problems.append(f"rope_local_base is {config.rope_local_base:g}; llama.cpp fixes sliding layers' at 10000")
    scale_dim = config.emb_dim / config.n_heads if config.n_layers == 62 else config.head_dim
    if config.query_pre_attn_scalar != scale_dim:
        problems.append(
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar:g}; llama.cpp scales queries by {scale_dim:g}^-0.5"
        )
    return problems


def gguf_tensor_names(model: torch.nn.Module) -> dict[str, str]:
    """Our state-dict name -> llama.cpp's GGUF tensor name, for every parameter written."""
    names = {"tok_emb.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
    if not model.config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(model.config.n_layers):
        for ours, theirs in (NORMS | MATRICES).items():
            names[f"blocks.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def tokenizer_vocabulary(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges as "a b") of a byte-level BPE tokenizer; GGUFExportError otherwise."""
    import gguf

    if tokenizer.kind == "gpt2":
        vocab, merges = gpt2_vocab_and_merges(tokenizer.encoding)
        special = {tokenizer.eos_id}
    else:
        spec = json.loads(tokenizer.json_text)
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            raise GGUFExportError(
                f"the tokenizer ({tokenizer}) is not byte-level BPE with GPT-2's split, the one kind this exporter "
                f"writes; {LLAMA_CPP_CONVERTER}"
            )
        vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    by_id = {i: token for token, i in vocab.items()}
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    unused, control = gguf.TokenType.UNUSED, gguf.TokenType.CONTROL
    types = [control if i in special else gguf.TokenType.NORMAL if i in by_id else unused for i in range(size)]
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges]


def export_gguf(model: torch.nn.Module, tokenizer, path: str | Path, dtype: str = "f32", name: str = "") -> Path:
    """Write `model` and its tokenizer as a GGUF file for llama.cpp's gemma3 architecture; returns the path."""
    import gguf

    config, path = model.config, Path(path)
    problems = llama_cpp_problems(config)
    if problems:
        raise GGUFExportError(f"llama.cpp cannot run this model as gemma3: {'; '.join(problems)}")
    tokens, token_types, merges = tokenizer_vocabulary(tokenizer)
    if len(tokens) > config.vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens, more than the model's {config.vocab_size}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config.vocab_size)]  # rows of the embedding no text reaches
    token_types += [int(gguf.TokenType.UNUSED)] * (config.vocab_size - len(token_types))

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, "gemma3")
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_name(name or path.stem)
    writer.add_file_type(file_types[dtype])
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.emb_dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_groups)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_freq_base_swa(config.rope_local_base)  # read by newer llama.cpp; older ones fix it at 10000
    writer.add_sliding_window(config.sliding_window)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    bos = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.eos_id)
    writer.add_add_bos_token(tokenizer.bos_id is not None)  # prompts start as the model's documents did
    writer.add_add_eos_token(False)

    params = dict(model.named_parameters())
    for ours, theirs in gguf_tensor_names(model).items():
        add_tensor(writer, theirs, params[ours].detach().float().cpu(), dtype, is_norm=ours.endswith("norm.weight"))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str, is_norm: bool) -> None:
    """One tensor in the file's dtype: norms as float32 with the +1 folded in, matrices as asked."""
    import gguf

    if is_norm:
        writer.add_tensor(name, (tensor + 1.0).numpy())
        return
    if dtype == "q8_0":
        try:
            quantized = gguf.quants.quantize(tensor.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            return
        except gguf.QuantError:
            dtype = "f16"  # rows that do not divide into blocks of 32
    if dtype == "bf16":
        raw = tensor.to(torch.bfloat16).view(torch.int16).numpy()
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, tensor.numpy().astype(np.float16 if dtype == "f16" else np.float32))
