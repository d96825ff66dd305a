"""Fine-tuning a Hugging Face Gemma 3 with its own tokenizer, end to end through the real commands: prepare with
--tokenizer, train with --init_from, sample and export without the original directory, reload with transformers.
And every refusal of a dataset, checkpoint or directory whose tokenizer is not the model's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_reference import random_hf_model, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from data.errors import DataError
from data.loader import BatchLoader
from data.meta import read_meta
from data.prepare import DATA_ROOT, ensure_prepared
from data.sources import pydocs
from data.tokenizer import load_tokenizer
from training.checkpoint import load_checkpoint, load_model

REPO = Path(__file__).resolve().parent.parent
DATASET, GPT2_DATASET = "pytest-finetune", "pytest-finetune-gpt2"  # under data/, removed afterwards
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's first four ids
TEXTS = ["def f(x):\n    return x ** 2\n", "naïve café — 東京", "a literal <eos> and <bos> stay text", "  x  \n\n"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def gemma_like_directory(path: Path, vocab_size: int = 400) -> Path:
    """A small byte-level BPE trained here with Gemma's special tokens and `<bos>` added by its post-processor, and a
    tiny random tied Gemma 3, both saved by transformers as `google/gemma-3-270m` is laid out."""
    texts = [text for text, _ in pydocs().documents()][:20]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet)
    )
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(path)
    model = random_hf_model(tiny_config(vocab_size=backend.get_vocab_size(), tie_embeddings=True))
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, 2
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    path = gemma_like_directory(tmp_path_factory.mktemp("gemma") / "tiny-gemma")
    for name in (DATASET, GPT2_DATASET):
        shutil.rmtree(DATA_ROOT / name, ignore_errors=True)
    yield path
    for name in (DATASET, GPT2_DATASET):
        shutil.rmtree(DATA_ROOT / name, ignore_errors=True)


@pytest.fixture(scope="module")
def gemma_dataset(gemma_dir) -> subprocess.CompletedProcess:
    """pydocs prepared into data/pytest-finetune by the real command, with the model directory's tokenizer."""
    result = run("data/prepare.py", "pydocs", "--name", DATASET, "--tokenizer", str(gemma_dir), "--num-proc", "2")
    assert result.returncode == 0, result.stderr
    return result


def finetune_args(gemma_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """train.py's arguments for a short fine-tune; `extra` flags replace the ones of the same name (train.py refuses a
    flag given twice)."""
    flags = [
        f"--init_from={gemma_dir}",
        f"--dataset={DATASET}",
        f"--out_dir={out_dir}",
        "--device=cpu",
        "--dtype=float32",
        "--max_iters=3",
        "--warmup_steps=1",
        "--batch_size=2",
        "--block_size=32",
        "--gradient_accumulation_steps=1",
        "--eval_interval=3",
        "--eval_iters=1",
        "--log_interval=1",
        *extra,
    ]
    given = dict(flag.split("=", 1) for flag in flags)
    return ["train.py", "--config", "config/finetune.json", *(f"{key}={value}" for key, value in given.items())]


def first_loss_and_transformers_loss(gemma_dir: Path, out: Path, rows: str) -> tuple[float, float, torch.Tensor]:
    """A fine-tune's first logged loss, transformers' loss on the same first batch (batch_rows `rows`), and x."""
    result = run(*finetune_args(gemma_dir, out, f"--batch_rows={rows}"))
    assert result.returncode == 0, result.stdout + result.stderr
    rows_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(row["loss"] for row in rows_logged if row["kind"] == "train" and row["iter"] == 1)
    loader = BatchLoader(DATA_ROOT / DATASET, "train", batch_size=2, block_size=32, seed=1337, rows=rows)
    x, y = loader.next_batch()
    hf_model = AutoModelForCausalLM.from_pretrained(gemma_dir).eval()
    with torch.no_grad():
        expected = F.cross_entropy(hf_model(x).logits.flatten(0, 1), y.flatten()).item()
    return first_loss, expected, x


@pytest.mark.slow
def test_a_finetune_on_bos_rows_starts_at_transformers_loss_on_those_rows(gemma_dir, gemma_dataset, tmp_path):
    """With --batch_rows=bos every row starts with <bos>, as the pretrained model's documents did, and the first
    logged loss is transformers' loss on exactly those rows."""
    first_loss, expected, x = first_loss_and_transformers_loss(gemma_dir, tmp_path / "run", "bos")
    assert (x[:, 0] == 2).all()
    assert abs(first_loss - expected) < 1e-4


@pytest.mark.slow
def test_finetune_end_to_end(gemma_dir, gemma_dataset, tmp_path):
    # Prepared with the model directory's tokenizer: <bos> before each document, <eos> after.
    tokenizer = load_tokenizer(gemma_dir)
    meta = read_meta(DATA_ROOT / DATASET)
    assert meta["tokenizer"] == {**tokenizer.identity(), "origin": str(gemma_dir)} and meta["dtype"] == "uint16"
    tokens = np.fromfile(DATA_ROOT / DATASET / "train.bin", dtype="<u2")
    assert tokens[0] == 2 and tokens[-1] == 1
    assert np.array_equal(np.flatnonzero(tokens == 2)[1:], np.flatnonzero(tokens == 1)[:-1] + 1)

    # Fine-tune: the first loss is the pretrained model's loss on the first batch, as transformers computes it.
    out = tmp_path / "run"
    first_loss, expected, _ = first_loss_and_transformers_loss(gemma_dir, out, "random")
    assert abs(first_loss - expected) < 1e-4
    state = load_checkpoint(out / "latest.pt")
    assert state["model_config"]["tie_embeddings"] and state["tokenizer"]["sha256"] == tokenizer.sha256

    # Sample and export with the original directory gone: the run directory is self-contained.
    moved = gemma_dir.with_name("moved-away")
    gemma_dir.rename(moved)
    try:
        result = run(
            "sample.py", "--ckpt", str(out), "--prompt", "def f(x):", "--max-new-tokens", "8", "--temperature", "0"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("def f(x):") and "tokens/s" in result.stderr
        result = run("scripts/export_hf.py", "--ckpt", str(out), "--out", str(tmp_path / "exported"))
        assert result.returncode == 0, result.stderr
    finally:
        moved.rename(gemma_dir)

    exported = tmp_path / "exported"
    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    for text in TEXTS[:2] + [t for t, _ in pydocs().documents()][30:35]:
        assert hf_tokenizer(text).input_ids == tokenizer.prompt_ids(text), text
    # Special-token strings in text: transformers makes them control tokens unless told not to; we never do.
    text = TEXTS[2]
    assert hf_tokenizer(text, split_special_tokens=True).input_ids == tokenizer.prompt_ids(text)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (2, 1)
    ours, _ = load_model(out)
    exported_model = AutoModelForCausalLM.from_pretrained(exported).eval()
    idx = torch.tensor([tokenizer.prompt_ids(TEXTS[0] * 6)])  # past the 16-token window
    with torch.no_grad():
        assert (exported_model(idx).logits - ours.eval()(idx)[0]).abs().max() < 1e-4


def test_special_token_text_is_ordinary_text(gemma_dir):
    tokenizer = load_tokenizer(gemma_dir)
    ids = tokenizer.encode("a literal <eos> and <bos> stay text")
    assert 1 not in ids and 2 not in ids and tokenizer.decode(ids) == "a literal <eos> and <bos> stay text"


def expect_refusal(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.slow
def test_refusals(gemma_dir, gemma_dataset, tmp_path):
    tokenizer = load_tokenizer(gemma_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "a few words. " * 20}) + "\n" for i in range(20)))
    assert run("data/prepare.py", str(corpus), "--name", GPT2_DATASET, "--val-fraction", "0.5").returncode == 0
    before = {p.name: p.read_bytes() for p in (DATA_ROOT / GPT2_DATASET).iterdir()}

    # Tokenizer paths that are not tokenizers; the existing dataset is left as it was.
    for bad, fragment in [
        (tmp_path / "nowhere", "does not exist"),
        (corpus, "is not a tokenizer.json"),
        (tmp_path, "holds no tokenizer.json"),
    ]:
        result = run("data/prepare.py", str(corpus), "--name", GPT2_DATASET, "--tokenizer", str(bad))
        expect_refusal(result, fragment, str(bad))
    assert before == {p.name: p.read_bytes() for p in (DATA_ROOT / GPT2_DATASET).iterdir()}

    # A GPT-2 dataset under a Gemma-tokenizer model: both tokenizers named, and the command that fixes it.
    out = tmp_path / "refused"
    result = run(*finetune_args(gemma_dir, out, f"--dataset={GPT2_DATASET}"))
    fix = f"python data/prepare.py {corpus} --name {GPT2_DATASET}-tiny-gemma --tokenizer {gemma_dir}"
    expect_refusal(result, "was tokenized with gpt2", f"the model speaks {tokenizer}", fix)
    assert not out.exists()

    # A known corpus that is not prepared yet is prepared with GPT-2 only.
    with pytest.raises(DataError, match="is not prepared and the model speaks .* --name pydocs-tiny-gemma --tokenizer"):
        ensure_prepared("pydocs", tokenizer, data_root=tmp_path / "data")
    assert not (tmp_path / "data" / "pydocs" / "meta.json").exists()

    # Resume of a Gemma-tokenizer run on another (GPT-2) dataset; latest.pt is not touched.
    run_dir = tmp_path / "run"
    result = run(*finetune_args(gemma_dir, run_dir, "--max_iters=1"))
    assert result.returncode == 0, result.stderr
    latest = (run_dir / "latest.pt").read_bytes()
    result = run(*finetune_args(gemma_dir, run_dir, "--init_from=resume", f"--dataset={GPT2_DATASET}"))
    expect_refusal(result, f"trained on dataset '{DATASET}', this run names '{GPT2_DATASET}'")
    assert (run_dir / "latest.pt").read_bytes() == latest

    # A model directory whose tokenizer has more ids than the embedding.
    big = tmp_path / "big-vocab"
    shutil.copytree(gemma_dir, big)
    small = tiny_config(vocab_size=300, tie_embeddings=True)
    random_hf_model(small).save_pretrained(big)
    result = run(*finetune_args(big, tmp_path / "big-run"))
    expect_refusal(result, "the model's vocab_size is 300 but its tokenizer", "has 400 tokens")
    expect_refusal(run("sample.py", "--hf-dir", str(big)), "the model's vocab_size is 300")


def test_from_scratch_on_a_hugging_face_dataset_speaks_its_tokenizer(gemma_dir, gemma_dataset, tmp_path):
    model_file = tmp_path / "model.json"
    model_file.write_text(json.dumps({**tiny_config(vocab_size=512, tie_embeddings=True).to_dict()}))
    out = tmp_path / "scratch"
    args = finetune_args(gemma_dir, out, "--init_from=scratch", f"--model_config={model_file}", "--max_iters=1")
    result = run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    model, tokenizer = load_model(out)
    assert tokenizer.identity() == load_tokenizer(gemma_dir).identity() and model.config.vocab_size == 512
