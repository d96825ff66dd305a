"""Export to Hugging Face's layout: a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.

Design choices:
- Weights go through the loader's name table (`hf_names`), so export and import cannot drift apart; a tied head is
  written once, as the embedding, the way transformers saves tied Gemma 3 models.
- The default export dtype is float32, the dtype training keeps: transformers then computes the same logits as our
  model. bfloat16 halves the files; config.json records whichever dtype the tensors have.
- The tokenizer is the model's own: a Hugging Face one is written as it came (tokenizer.json, and its
  tokenizer_config.json when it had one, chat template included). One without a chat template gets the template
  this repository fine-tunes with (data/chat.py, in jinja), so transformers' apply_chat_template renders
  conversations with the ids training saw. GPT-2's is rebuilt from a tiktoken encoding with
  the `tokenizers` library (byte-level BPE, GPT-2's split pattern), so no download is needed. tiktoken ranks hold
  no merge list; each token's merge is recovered by running byte-level BPE on its bytes with only lower ranks
  allowed, which ends in exactly two parts whose merge creates the token. Merges are then ordered by the rank of
  their result, so HF's BPE applies them in tiktoken's order and both tokenizers give the same ids.
"""

import errno
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from data.chat import chat_template

from .hf_weights import hf_names


def export_hf(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype = torch.float32, **config_extra) -> None:
    """Write `config.json` and `model.safetensors` for `model`; `config_extra` adds keys such as eos_token_id."""
    # The config first: a model transformers cannot express is refused before anything is written.
    config = {**model.config.to_hf_dict(), "dtype": str(dtype).removeprefix("torch."), **config_extra}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {hf: params[ours].detach().to("cpu", dtype).contiguous() for ours, hf in hf_names(model).items()}
    try:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    except SafetensorError as e:  # its I/O errors (a full disk) are not OSError: callers catch one kind of error
        raise OSError(errno.EIO, str(e).rpartition("I/O error: ")[2], str(out / "model.safetensors")) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)  # safetensors writes 0600; the other files follow the umask
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as in its encoder.py and HF's ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merge_parts(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge creates `token`: BPE on its bytes using only merges ranked below it."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best_rank, best = limit, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best = rank, i
        if best is None:
            raise ValueError(f"token {token!r} cannot be built from lower-ranked tokens: not a BPE vocabulary")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def gpt2_vocab_and_merges(encoding) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary (token text -> id, `<|endoftext|>` included) and merges, in order, of a
    tiktoken encoding: what Hugging Face's tokenizer.json and llama.cpp's GGUF both store."""
    eot = encoding.eot_token
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab) if i != eot}
    to_char = _bytes_to_unicode()
    text = lambda token: "".join(to_char[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[encoding.decode([eot])] = eot
    merges = [
        tuple(map(text, _merge_parts(ranks, token)))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return vocab, merges


def write_gpt2_tokenizer(encoding, out_dir: str | Path, model_max_length: int, chat_template: str) -> None:
    """Write tokenizer.json (+ vocab.json, merges.txt, tokenizer_config.json) equal to the tiktoken `encoding`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_vocab_and_merges(encoding)
    eot_text = encoding.decode([encoding.eot_token])
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # use_regex=True is GPT-2's split pattern, the same as tiktoken's r50k_base pat_str.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(eot_text, special=True, normalized=False)])
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer.model.save(str(out))  # vocab.json and merges.txt, for tools that read GPT-2's classic files
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": eot_text,
        "eos_token": eot_text,
        "unk_token": eot_text,
        "add_prefix_space": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def export_tokenizer(tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """Write a `data.tokenizer.Tokenizer` so that `transformers.AutoTokenizer.from_pretrained(out_dir)` reads it, with
    the chat template the model was fine-tuned with (data/chat.py) unless its tokenizer_config.json has one."""
    jinja = chat_template(tokenizer).jinja
    if tokenizer.kind == "gpt2":
        write_gpt2_tokenizer(tokenizer.encoding, out_dir, model_max_length, jinja)
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer.json_text, encoding="utf-8")
    token = lambda i: None if i is None else tokenizer.backend.id_to_token(i)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id),
        "model_max_length": model_max_length,
    }
    if tokenizer.config_text is not None:  # as it came, chat template included
        config = json.loads(tokenizer.config_text)
    config.setdefault("chat_template", jinja)
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
