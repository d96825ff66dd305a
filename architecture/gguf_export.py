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
- GPT-2's tokenizer is byte-level BPE ("gpt2" model, "gpt-2" pre-tokenizer): tokens in id order, merges in rank
  order, `<|endoftext|>` a control token and the bos / eos / eot / padding id. A Hugging Face tokenizer is written the
  same way when it is byte-level BPE with GPT-2's split. Gemma's (the official model's tokenizer.json, no
  tokenizer.model needed) is written as llama.cpp's "llama" (SentencePiece) tokenizer, `sentencepiece_vocabulary`;
  any other kind is refused, naming llama.cpp's converter on our Hugging Face export as the path.
- The chat template goes in too (the tokenizer's own, else data/chat.py's in jinja), and the end of a turn as the
  eot id, so llama.cpp and Ollama chat as sample.py --chat does.
- The file is written to a temporary name and renamed when complete.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.chat import chat_template
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


@dataclass
class GGUFVocabulary:
    """A tokenizer as GGUF stores it: llama.cpp's tokenizer model ("gpt2": byte-level BPE with merges; "llama":
    SentencePiece-style pieces ranked by score, Gemma's), the tokens by id with their types, and scores or merges."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)


def tokenizer_vocabulary(tokenizer) -> GGUFVocabulary:
    """The GGUF form of GPT-2's tokenizer, of a byte-level BPE tokenizer.json, or of Gemma's (a BPE over
    `▁`-spelled text with byte fallback); GGUFExportError for any other."""
    import gguf

    if tokenizer.kind == "gpt2":
        vocab, merges, special = *gpt2_vocab_and_merges(tokenizer.encoding), {tokenizer.eos_id}
    else:
        spec = json.loads(tokenizer.json_text)
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback") and _spells_spaces_as_metaspace(spec):
            return sentencepiece_vocabulary(spec)
        if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            raise GGUFExportError(
                f"the tokenizer ({tokenizer}) is neither byte-level BPE with GPT-2's split nor Gemma's kind, the "
                f"two this exporter writes; {LLAMA_CPP_CONVERTER}"
            )
        vocab = dict(model["vocab"]) | {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    by_id = {i: token for token, i in vocab.items()}
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    unused, control = gguf.TokenType.UNUSED, gguf.TokenType.CONTROL
    types = [control if i in special else gguf.TokenType.NORMAL if i in by_id else unused for i in range(size)]
    return GGUFVocabulary("gpt2", tokens, [int(t) for t in types], merges=[f"{a} {b}" for a, b in merges])


def _spells_spaces_as_metaspace(spec: dict) -> bool:
    """Whether the tokenizer turns spaces into `▁` before its BPE: Gemma's Replace normalizer, or a Metaspace."""
    steps = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    steps = [part for step in steps for part in step.get("normalizers", step.get("pretokenizers", [step]))]
    replaces = any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == " " for s in steps)
    return replaces or any(s.get("type") == "Metaspace" for s in steps)


def sentencepiece_vocabulary(spec: dict) -> GGUFVocabulary:
    """Gemma's tokenizer.json as llama.cpp's "llama" tokenizer reads it: every id in order; control tokens (the
    special ones and `<unused*>`) and user-defined ones (other added tokens, `▁` written as the space it matches)
    scored -1000; byte pieces `<0xNN>` typed as bytes, scored 0; the other pieces scored by their id, decreasing,
    because Gemma's merge ranks follow its id order, and llama.cpp merges the pair of highest score first."""
    import gguf

    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: piece for piece, i in spec["model"]["vocab"].items()}
    size = max([*by_id, *added]) + 1
    tokens, types, scores = [], [], []
    for i in range(size):
        if i in added:
            content = added[i]["content"]
            control = added[i].get("special") or re.fullmatch(r"<unused\d+>", content)
            kind = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
            text, score = content if control else content.replace("▁", " "), -1000.0
        elif i not in by_id:
            kind, text, score = gguf.TokenType.UNUSED, f"[PAD{i}]", -1000.0
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", by_id[i]):
            kind, text, score = gguf.TokenType.BYTE, by_id[i], 0.0
        else:
            kind, text, score = gguf.TokenType.NORMAL, by_id[i], -float(i)
        tokens.append(text)
        types.append(int(kind))
        scores.append(score)
    return GGUFVocabulary("llama", tokens, types, scores=scores)


def export_gguf(model: torch.nn.Module, tokenizer, path: str | Path, dtype: str = "f32", name: str = "") -> Path:
    """Write `model` and its tokenizer as a GGUF file for llama.cpp's gemma3 architecture; returns the path."""
    import gguf

    config, path = model.config, Path(path)
    problems = llama_cpp_problems(config)
    if problems:
        raise GGUFExportError(f"llama.cpp cannot run this model as gemma3: {'; '.join(problems)}")
    vocabulary = tokenizer_vocabulary(tokenizer)
    tokens, token_types, scores = vocabulary.tokens, vocabulary.types, vocabulary.scores
    # Ids past the embedding that ordinary text never yields (Gemma's image token) are left out.
    beyond = [i for i in range(config.vocab_size, len(tokens)) if token_types[i] != int(gguf.TokenType.CONTROL)]
    if beyond:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens, more than the model's {config.vocab_size}")
    del tokens[config.vocab_size :], token_types[config.vocab_size :], scores[config.vocab_size :]
    padding = config.vocab_size - len(tokens)  # rows of the embedding no text reaches
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config.vocab_size)]
    token_types += [int(gguf.TokenType.UNUSED)] * padding
    scores += [-1000.0] * padding if scores else []

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

    template = chat_template(tokenizer)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if vocabulary.model == "gpt2":
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(vocabulary.merges)
    else:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)  # llama.cpp's default for this model is True; Gemma's is not
        writer.add_unk_token_id(tokenizer.special_id("<unk>"))
    bos = tokenizer.eos_id if tokenizer.bos_id is None else tokenizer.bos_id
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(template.turn_end)  # where a chat turn ends: <end_of_turn>, or GPT-2's end of text
    pad = tokenizer.special_id("<pad>")
    writer.add_pad_token_id(tokenizer.eos_id if pad is None else pad)
    writer.add_add_bos_token(tokenizer.bos_id is not None)  # prompts start as the model's documents did
    writer.add_add_eos_token(False)
    writer.add_chat_template(original_chat_template(tokenizer) or template.jinja)

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


def original_chat_template(tokenizer) -> str | None:
    """The chat template in the tokenizer_config.json a Hugging Face tokenizer came with, if any."""
    try:
        return json.loads(tokenizer.config_text).get("chat_template") if tokenizer.config_text else None
    except (AttributeError, ValueError):
        return None


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
