"""A small Gemma 3 directory laid out as the official google/gemma-3-270m's: its tokenizer.json has Gemma's shape
(control tokens first, `<start_of_turn>` 105 and `<end_of_turn>` 106, the 256 byte-fallback pieces `<0xNN>`, then
BPE pieces spelled with `▁` for a space, in merge order, no pre-tokenizer), its tokenizer_config.json carries the
official chat template, its generation_config.json stops at `<eos>` and `<end_of_turn>`, and a tiny random model
sits beside them. Built offline, from the Python docs, in a second."""

import json
from pathlib import Path

from hf_reference import random_hf_model, tiny_config
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.sources import pydocs

CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[@BOS@]", *(f"<unused{i}>" for i in range(99))]
TURNS = ["<start_of_turn>", "<end_of_turn>"]  # ids 105 and 106, as in Gemma 3
BYTES = [f"<0x{b:02X}>" for b in range(256)]
USER_DEFINED = [("<h1>", False), ("▁▁▁▁", True)]  # (content, normalized)

# The chat template of google/gemma-3-270m's tokenizer_config.json (the same in every Gemma 3), as published.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n"
    '    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n    {%- endif -%}\n'
    "    {{ '<end_of_turn>\\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
)


def gemma_tokenizer_json(texts: list[str], merges: int = 400) -> str:
    """A tokenizer.json in the official Gemma 3's layout, its BPE pieces and merges learned from `texts`."""
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # merges within words: fast to learn
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=merges, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)  # the alphabet, then each merge's piece in order
    vocab = {piece: i for i, piece in enumerate([*CONTROL, *TURNS, *BYTES, *pieces])}
    flags = {"single_word": False, "lstrip": False, "rstrip": False}
    special = [
        {"id": i, "content": t, **flags, "normalized": False, "special": True} for i, t in enumerate([*CONTROL, *TURNS])
    ]
    # Added tokens that are not control tokens (user-defined in SentencePiece terms): one matched in the raw text,
    # one spelled with `▁` and matched after spaces become `▁`.
    user_defined = [
        {"id": len(vocab) + i, "content": t, **flags, "normalized": normalized, "special": False}
        for i, (t, normalized) in enumerate(USER_DEFINED)
    ]
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": special + user_defined,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": None,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
            },
            "decoder": {
                "type": "Sequence",
                "decoders": [
                    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                ],
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": "<unk>",
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": True,
                "byte_fallback": True,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": learned["merges"],
            },
        },
        ensure_ascii=False,
    )


def gemma_chat_directory(path: Path, tie_embeddings: bool = True) -> Path:
    """The tokenizer (with the official chat template) and a tiny random Gemma 3, saved by transformers."""
    texts = [text for text, _ in pydocs().documents()][:20]
    backend = Tokenizer.from_str(gemma_tokenizer_json(texts))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=TURNS,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(path)
    model = random_hf_model(tiny_config(vocab_size=backend.get_vocab_size(), tie_embeddings=tie_embeddings))
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, 2
    model.generation_config.eos_token_id = [1, 106]  # as google/gemma-3-270m's generation_config.json
    model.save_pretrained(path)
    return path
