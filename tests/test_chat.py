"""Chat fine-tuning: rows read from chat files, Gemma's chat template against the official one, the loss mask from
the template to the loader's targets, the masked loss through micro-batches and two-process DDP, and a tiny model
that learns to answer and to stop, driven through the real commands."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gemma_chat import GEMMA3_CHAT_TEMPLATE, gemma_chat_directory
from test_training import TINY_MODEL, losses, run_config, run_train
from transformers import AutoTokenizer

from architecture import IGNORE_INDEX, Gemma3Model, ModelConfig
from data.chat import GEMMA_JINJA, PLAIN_JINJA, chat_template, conversation
from data.errors import DataError
from data.loader import BatchLoader
from data.meta import read_meta
from data.prepare import DATA_ROOT, prepare
from data.sources import pychat
from data.tokenizer import gpt2, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
SYSTEM_CHAT = [
    {"role": "system", "content": "Answer in one sentence. "},
    {"role": "user", "content": "  What is a list?\n"},
    {"role": "assistant", "content": "A mutable sequence. "},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Say 東京 and café"},
    {"role": "model", "content": "東京, café."},
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    SYSTEM_CHAT,
    MULTI_TURN,
    [{"role": "user", "content": "  spaces   and\n\nnewlines \t"}, {"role": "assistant", "content": "\n  ok  \n"}],
    [{"role": "user", "content": "emoji 🙂🚀, tabs\tand\r\nCRLF"}, {"role": "assistant", "content": "🙂"}],
]
SPECIAL_TEXT = [
    {"role": "user", "content": "emoji 🙂🚀 and <eos> as text"},
    {"role": "assistant", "content": "<end_of_turn> too"},
]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, input=stdin)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return gemma_chat_directory(tmp_path_factory.mktemp("gemma-chat") / "tiny-gemma")


def shown(tokenizer, ids: list[int]) -> str:
    """Ids as text with the special tokens spelled out."""
    return tokenizer.backend.decode(ids, skip_special_tokens=False)


def normalised(messages: list[dict]) -> list[dict]:
    return conversation(messages, "test")


# --- the template ---------------------------------------------------------------------------------------------------


def test_gemma_renders_single_turn_system_and_multi_turn_as_the_official_model_expects(gemma_dir):
    tokenizer = load_tokenizer(gemma_dir)
    template = chat_template(tokenizer)
    assert template.name == "gemma" and (template.turn_start, template.turn_end) == (105, 106)
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert shown(tokenizer, template.render(single)[0]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    )
    assert shown(tokenizer, template.render(normalised(SYSTEM_CHAT))[0]) == (
        "<bos><start_of_turn>user\nAnswer in one sentence. \n\nWhat is a list?<end_of_turn>\n"
        "<start_of_turn>model\nA mutable sequence.<end_of_turn>\n"
    )
    assert shown(tokenizer, template.render(normalised(MULTI_TURN)[:3], add_generation_prompt=True)[0]) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nSay 東京 and café<end_of_turn>\n<start_of_turn>model\n"
    )


def test_the_special_tokens_are_ids_never_text(gemma_dir):
    """`<end_of_turn>` or `<eos>` written in a message is text (ordinary ids); the template's turn ends are id 106.
    (transformers' apply_chat_template would read them as the control tokens, so the comparisons below leave such
    text out.)"""
    tokenizer = load_tokenizer(gemma_dir)
    ids, _ = chat_template(tokenizer).render(normalised(SPECIAL_TEXT))
    assert ids.count(106) == 2 and ids.count(105) == 2 and ids.count(1) == 0 and ids.count(2) == 1
    assert "<eos> as text" in tokenizer.decode(ids) and "<end_of_turn> too" in tokenizer.decode(ids)


@pytest.mark.parametrize("which", ["official", "ours"])
def test_transformers_apply_chat_template_gives_our_ids(gemma_dir, which):
    """The directory's own template (the official Gemma 3 one, saved by transformers) and our jinja twin, rendered
    by transformers and tokenized by it, give exactly the ids of ChatTemplate.render, with and without the
    generation prompt."""
    hf = AutoTokenizer.from_pretrained(gemma_dir)
    assert hf.chat_template == GEMMA3_CHAT_TEMPLATE
    if which == "ours":
        hf.chat_template = GEMMA_JINJA
    template = chat_template(load_tokenizer(gemma_dir))
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert template.render(normalised(messages))[0] == expected, messages
        prompt = normalised(messages)[:-1]
        expected = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert template.render(prompt, add_generation_prompt=True)[0] == expected["input_ids"], messages


def test_the_plain_template_for_gpt2_equals_its_jinja():
    tokenizer = gpt2()
    template = chat_template(tokenizer)
    assert template.name == "plain" and template.start == template.turn_end == 50256
    jinja = jinja2.Environment().from_string(PLAIN_JINJA)
    for messages in CONVERSATIONS:
        for generation in (False, True):
            turns = normalised(messages)[: -1 if generation else None]
            text = jinja.render(
                messages=turns, bos_token="<|endoftext|>", eos_token="<|endoftext|>", add_generation_prompt=generation
            )
            expected = tokenizer.encoding.encode(text, allowed_special="all")
            assert template.render(turns, add_generation_prompt=generation)[0] == expected, text
    ids, _ = template.render(normalised(CONVERSATIONS[0]))
    assert tokenizer.decode(ids) == "<|endoftext|>User:\nHi<|endoftext|>Assistant:\nHello.<|endoftext|>"


def spans(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of consecutive masked tokens."""
    runs, current = [], []
    for token, masked in zip(ids, mask, strict=True):
        if masked:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [shown(tokenizer, run) if hasattr(tokenizer, "backend") else tokenizer.decode(run) for run in runs]


def test_the_mask_covers_each_reply_its_end_of_turn_and_the_newline_after_it(gemma_dir):
    tokenizer = load_tokenizer(gemma_dir)
    ids, mask = chat_template(tokenizer).render(normalised(MULTI_TURN))
    assert spans(tokenizer, ids, mask) == ["Hello! How can I help?<end_of_turn>\n", "東京, café.<end_of_turn>\n"]
    ids, mask = chat_template(gpt2()).render(normalised(MULTI_TURN))
    assert spans(gpt2(), ids, mask) == ["Hello! How can I help?<|endoftext|>", "東京, café.<|endoftext|>"]
    ids, mask = chat_template(tokenizer).render(normalised(MULTI_TURN), loss_on="all")
    assert mask == [1] * len(ids)


# --- rows -----------------------------------------------------------------------------------------------------------


def test_every_row_format_reads_as_the_same_messages():
    expected = [{"role": "user", "content": "Reverse abc"}, {"role": "assistant", "content": "cba"}]
    rows = [
        {"messages": expected},
        expected,
        [{"role": "user", "content": "Reverse abc"}, {"role": "model", "content": "cba"}],
        {"prompt": "Reverse abc", "completion": "cba"},
        {"prompt": expected[:1], "completion": expected[1:]},
    ]
    for row in rows:
        assert conversation(row, "x") == expected, row
    assert conversation({"instruction": "Reverse", "input": "abc", "output": "cba"}, "x") == [
        {"role": "user", "content": "Reverse\n\nabc"},
        {"role": "assistant", "content": "cba"},
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        ([{"role": "assistant", "content": "hi"}], "message 1 is assistant, expected user"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 is user, expected assistant"),
        ([{"role": "user", "content": "a"}], "does not end with an assistant reply, so it has nothing to learn"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "a system message may only come first",
        ),
        ([{"role": "robot", "content": "a"}], "role 'robot'; use system, user or assistant"),
        ([{"role": "user", "content": 3}], "message 1 is not a {'role', 'content'} object with string content"),
        ({"prompt": "a"}, "a prompt without a completion"),
        ({"text": "plain"}, "not a conversation"),
        ({"messages": []}, "non-empty list"),
    ],
)
def test_a_bad_row_names_where_and_what(row, message):
    with pytest.raises(DataError, match="^chat.jsonl:7: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        conversation(row, "chat.jsonl:7")


def test_prepare_stops_at_a_bad_row_in_one_line_or_skips_and_counts_them(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    lines = [json.dumps(good)] * 20 + ["{not json", json.dumps({"messages": [{"role": "user", "content": "?"}]})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    command = ["data/prepare.py", str(tmp_path / "chat.jsonl"), "--data-root", str(tmp_path / "data")]
    result = run(*command)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: {tmp_path / 'chat.jsonl'}:21: not valid JSON" in result.stderr
    assert "--skip-bad-rows" in result.stderr and not (tmp_path / "data" / "chat").exists()
    result = run(*command, "--skip-bad-rows")
    assert result.returncode == 0, result.stderr
    assert f"skipped 2 bad rows (--skip-bad-rows); the first: {tmp_path / 'chat.jsonl'}:21" in result.stdout
    assert read_meta(tmp_path / "data" / "chat")["chat"]["skipped_rows"] == 2


def test_a_json_array_file_and_loss_on_all(tmp_path):
    rows = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(30)]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    out = prepare(str(tmp_path / "chat.json"), data_root=tmp_path, num_proc=1, progress=False)
    meta = read_meta(out)
    chat = meta["chat"]
    assert chat["template"] == {"name": "plain", "start": 50256, "turn_end": 50256} and chat["loss_on"] == "assistant"
    assert chat["train_conversations"] + chat["val_conversations"] == 30
    masks = [np.fromfile(out / f"{split}.mask.bin", dtype=np.uint8) for split in ("train", "val")]
    assert [int(m.sum()) for m in masks] == [chat["train_supervised_tokens"], chat["val_supervised_tokens"]]
    out = prepare(str(tmp_path / "chat.json"), "all", data_root=tmp_path, num_proc=1, loss_on="all", progress=False)
    assert np.fromfile(out / "train.mask.bin", dtype=np.uint8).all()
    with pytest.raises(DataError, match="--loss-on is for conversations"):
        prepare("pydocs", data_root=tmp_path, loss_on="all", progress=False)


# --- the loader's targets ---------------------------------------------------------------------------------------------


def hand_made_dataset(path: Path, ids: list[int], mask: list[int], starts: list[int]) -> Path:
    """A chat dataset written by hand: the same files and meta.json that prepare writes."""
    path.mkdir(parents=True)
    for split in ("train", "val"):
        np.array(ids, dtype="<u2").tofile(path / f"{split}.bin")
        np.array(mask, dtype=np.uint8).tofile(path / f"{split}.mask.bin")
        np.array(starts, dtype="<u8").tofile(path / f"{split}.starts.bin")
    counts = {"train_conversations": len(starts), "val_conversations": len(starts)}
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "dtype": "uint16",
        "train_tokens": len(ids),
        "val_tokens": len(ids),
        "source": {"kind": "hand"},
        "chat": {"template": {"name": "plain", "start": 50256, "turn_end": 50256}, **counts},
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_the_targets_are_the_masked_next_tokens_one_conversation_a_row(tmp_path):
    """Conversation A = ids 10..14 (targets 12 and 13: mask on ids 2 and 3), B = 20..22 (target 22), C = 30..39
    (too long for a block of 6: never drawn)."""
    ids = [10, 11, 12, 13, 14, 20, 21, 22, *range(30, 40)]
    mask = [0, 0, 1, 1, 0, 0, 0, 1, *[1] * 10]
    loader = BatchLoader(hand_made_dataset(tmp_path / "d", ids, mask, [0, 5, 8]), "train", 64, 6, rows="conversation")
    assert (loader.conversation_count, loader.dropped) == (3, 1)
    x, y = loader.next_batch()
    a, b = (x[:, 0] == 10), (x[:, 0] == 20)
    assert a.any() and b.any() and (a | b).all()
    pad, no = 50256, IGNORE_INDEX
    assert (x[a] == torch.tensor([10, 11, 12, 13, pad, pad])).all()
    assert (y[a] == torch.tensor([no, 12, 13, no, no, no])).all()
    assert (x[b] == torch.tensor([20, 21, pad, pad, pad, pad])).all()
    assert (y[b] == torch.tensor([no, 22, no, no, no, no])).all()


def test_conversation_rows_and_text_datasets_do_not_mix(tmp_path):
    text = prepare("pydocs", data_root=tmp_path, progress=False)
    with pytest.raises(DataError, match="holds text, not conversations"):
        BatchLoader(text, "train", 2, 32, rows="conversation")
    chat = hand_made_dataset(tmp_path / "d", [1, 2, 3], [0, 1, 1], [0])
    with pytest.raises(DataError, match="holds conversations .*--batch_rows=conversation"):
        BatchLoader(chat, "train", 2, 2, rows="random")
    with pytest.raises(DataError, match="none of its 1 conversations fits block_size"):
        BatchLoader(chat, "train", 2, 1, rows="conversation")


def test_the_masked_loss_is_the_mean_over_the_targets_and_the_sum_their_total():
    prepare("pychat", progress=False)
    loader = BatchLoader(DATA_ROOT / "pychat", "train", 4, 128, rows="conversation", seed=3)
    x, y = loader.next_batch()
    torch.manual_seed(0)
    model = Gemma3Model(ModelConfig(**TINY_MODEL)).eval()
    with torch.no_grad():
        logits, mean = model(x, y)
        _, chunked = model(x, y, return_logits=False)
        _, total = model(x, y, return_logits=False, reduction="sum")
    kept = y != IGNORE_INDEX
    manual = -torch.log_softmax(logits.float(), dim=-1)[kept].gather(1, y[kept][:, None]).mean()
    assert 0 < kept.sum() < y.numel() / 2
    assert mean.item() == pytest.approx(manual.item(), rel=1e-5)
    assert chunked.item() == pytest.approx(manual.item(), rel=1e-5)
    assert total.item() == pytest.approx(manual.item() * kept.sum().item(), rel=1e-5)
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten()).item() == pytest.approx(mean.item(), rel=1e-5)


# --- training ---------------------------------------------------------------------------------------------------------


def chat_config(tmp_path: Path, **overrides) -> Path:
    return run_config(tmp_path, **{"dataset": "pychat", "batch_rows": "conversation", "block_size": 128, **overrides})


@pytest.mark.slow
def test_micro_batches_and_two_process_ddp_give_the_one_big_batch_update(tmp_path):
    """Rows hold different numbers of targets, so a mean per micro-batch would weigh them unequally: the loss is
    summed and divided by the targets of the whole iteration, and 4 micro-batches of 4 conversations, or 2 on each
    of two processes, train as one batch of 16 does."""
    prepare("pychat", progress=False)
    runs = {name: tmp_path / name for name in ("big", "micro", "ddp")}
    for path in runs.values():
        path.mkdir()
    run_train(chat_config(runs["big"], batch_size=16, gradient_accumulation_steps=1, max_iters=6))
    run_train(chat_config(runs["micro"], batch_size=4, gradient_accumulation_steps=4, max_iters=6))
    config = chat_config(runs["ddp"], batch_size=4, gradient_accumulation_steps=4, max_iters=6)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29751"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "train.py", "--config", str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    big = losses(runs["big"] / "run")
    for name in ("micro", "ddp"):
        other = losses(runs[name] / "run")
        assert other.keys() == big.keys()
        for iteration in big:
            assert other[iteration] == pytest.approx(big[iteration], rel=1e-5), (name, iteration)


def overfit_chat_file(path: Path, count: int = 5) -> tuple[Path, list[list[dict]]]:
    """The first `count` two-turn conversations of the shipped pychat data, as a chat file."""
    rows = [row for row, _ in pychat().documents() if len(row) == 2][:count]
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    return path, rows


@pytest.mark.slow
def test_a_tiny_model_fitted_to_chat_data_answers_and_stops_on_its_own(tmp_path):
    """Prepare, train and chat through the real commands: a tiny GPT-2-vocabulary model fitted to four pychat
    conversations answers their question with the reply and stops at its end-of-turn, well before the limit."""
    chat_file, rows = overfit_chat_file(tmp_path / "chat.jsonl")
    data_root = DATA_ROOT / "pytest-chat"
    shutil.rmtree(data_root, ignore_errors=True)
    try:
        result = run("data/prepare.py", str(chat_file), "--name", "pytest-chat", "--val-fraction", "0.3")
        assert result.returncode == 0, result.stderr
        config = chat_config(
            tmp_path,
            dataset="pytest-chat",
            batch_size=4,
            gradient_accumulation_steps=1,
            max_iters=150,
            eval_interval=150,
            learning_rate=1e-2,
            min_lr=1e-3,
            optimizer="adamw",
        )
        output = run_train(config)
        assert "note: train: " in output and "--chat" in output
        trained = gpt2().decode(np.fromfile(data_root / "train.bin", dtype="<u2").tolist())
        rows = [row for row in rows if row[1]["content"] in trained]  # not those held out for val
        assert len(rows) >= 2
        question = rows[0][:1]
        (tmp_path / "question.json").write_text(json.dumps(question))
        result = run(
            "sample.py",
            "--ckpt",
            str(tmp_path / "run"),
            "--messages",
            str(tmp_path / "question.json"),
            "--temperature",
            "0",
            "--max-new-tokens",
            "100",
            "--device",
            "cpu",
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == rows[0][1]["content"]
        generated = int(result.stderr.strip().splitlines()[-1].split()[0])
        assert generated < 100
        cut = run(
            "sample.py", "--ckpt", str(tmp_path / "run"), "--messages", str(tmp_path / "question.json"),
            "--temperature", "0", "--max-new-tokens", "2", "--device", "cpu",
        )  # fmt: skip
        assert cut.returncode == 0 and "the reply reached --max-new-tokens (2); its turn ends there" in cut.stderr
        transcript = run(
            "sample.py", "--ckpt", str(tmp_path / "run"), "--chat", "--temperature", "0", "--device", "cpu",
            stdin=f"{rows[1][0]['content']}\n/exit\n",
        )  # fmt: skip
        assert transcript.returncode == 0, transcript.stderr
        assert transcript.stdout.splitlines()[:2] == [f"> {rows[1][0]['content']}", rows[1][1]["content"]]
    finally:
        shutil.rmtree(data_root, ignore_errors=True)


# --- fine-tuning a Gemma 3 and exporting it -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_finetune(gemma_dir, tmp_path_factory) -> Path:
    """pychat prepared with the Gemma directory's tokenizer and a 2-iteration fine-tune of its model on it, through
    the real commands, as the README's chat walk-through runs them for the official model."""
    data_root = DATA_ROOT / "pytest-chat-gemma"
    shutil.rmtree(data_root, ignore_errors=True)
    result = run("data/prepare.py", "pychat", "--name", "pytest-chat-gemma", "--tokenizer", str(gemma_dir))
    assert result.returncode == 0, result.stderr
    assert "gemma chat template" in result.stdout
    out = tmp_path_factory.mktemp("sft") / "run"
    flags = {
        "init_from": gemma_dir,
        "dataset": "pytest-chat-gemma",
        "out_dir": out,
        "device": "cpu",
        "dtype": "float32",
        "max_iters": 2,
        "warmup_steps": 1,
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "eval_interval": 2,
        "eval_iters": 1,
        "log_interval": 1,
    }
    result = run("train.py", "--config", "config/sft.json", *(f"--{k}={v}" for k, v in flags.items()))
    assert result.returncode == 0, result.stdout + result.stderr
    yield out
    shutil.rmtree(data_root, ignore_errors=True)


@pytest.mark.slow
def test_a_gemma_finetune_starts_at_transformers_masked_loss_on_the_same_rows(gemma_dir, gemma_finetune):
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (gemma_finetune / "metrics.jsonl").read_text().splitlines()]
    first = next(row["loss"] for row in rows if row["kind"] == "train" and row["iter"] == 1)
    config = json.loads((REPO / "config" / "sft.json").read_text())
    loader = BatchLoader(
        DATA_ROOT / "pytest-chat-gemma", "train", 2, config["block_size"], seed=config["seed"], rows="conversation"
    )
    x, y = loader.next_batch()
    assert (x[:, 0] == 2).all() and (x[:, 1] == 105).all()  # <bos><start_of_turn>
    hf_model = AutoModelForCausalLM.from_pretrained(gemma_dir).eval()
    with torch.no_grad():
        expected = F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()).item()  # ignore_index -100
    assert first == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_the_hf_export_renders_our_ids_and_generate_stops_where_we_do(gemma_finetune, tmp_path):
    from transformers import AutoModelForCausalLM

    from architecture.generate import generate_stream
    from training.checkpoint import load_model

    out = tmp_path / "hf"
    result = run("scripts/export_hf.py", "--ckpt", str(gemma_finetune), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    ours, tokenizer = load_model(gemma_finetune)
    template = chat_template(tokenizer)
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = normalised(MULTI_TURN)[:3]
    ids = template.render(prompt, add_generation_prompt=True)[0]
    rendered = hf_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert rendered == ids
    idx = torch.tensor([ids])
    greedy = [t.item() for t in generate_stream(ours.eval(), idx, 12, temperature=0)]
    with torch.no_grad():
        theirs = hf_model.generate(idx, max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    stop = template.stop_ids & set(greedy)
    expected = greedy[: min(greedy.index(s) for s in stop) + 1] if stop else greedy
    assert theirs == expected  # transformers stops on the first end-of-turn id we stop on, or runs as we do
    # Stopping itself: with our 5th token as the end of turn, transformers stops right after it, as we would.
    with torch.no_grad():
        cut = hf_model.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=greedy[4])[0, len(ids) :]
    assert cut.tolist() == greedy[: greedy.index(greedy[4]) + 1]


def test_the_shipped_chat_data_is_the_same_in_every_process():
    """pychat is made from the running Python's docstrings and signatures; a signature that shows an object's memory
    address would make another dataset in every process."""
    script = "import json, torch; from data.sources import pychat_answers; print(json.dumps(pychat_answers()))"
    result = run("-c", script)
    assert result.returncode == 0, result.stderr
    from data.sources import pychat_answers

    assert json.loads(result.stdout) == [list(answer) for answer in pychat_answers()]
    assert len(pychat_answers()) > 250


def test_a_history_that_outgrows_the_context_drops_its_oldest_exchanges_first():
    import sample

    template = chat_template(gpt2())
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"{r} turn {i} " * 5} for i in range(4) for r in ("user", "assistant")][:-1]
    everything, _ = template.render([system, *turns], add_generation_prompt=True)
    ids, dropped = sample.fit_history(template, [system, *turns], len(everything))
    assert (ids, dropped) == (everything, 0)
    ids, dropped = sample.fit_history(template, [system, *turns], len(everything) - 1)
    assert dropped == 1 and ids == template.render([system, *turns[2:]], add_generation_prompt=True)[0]
    ids, dropped = sample.fit_history(template, [system, *turns], 10)  # only the last question is left
    assert dropped == 3 and ids == template.render([system, turns[-1]], add_generation_prompt=True)[0]
