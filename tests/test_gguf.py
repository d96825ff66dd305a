"""GGUF export for llama.cpp's gemma3: read back with the `gguf` package's reader (hyperparameters, tensor names,
shapes, types and values), the file's tokenizer against tiktoken's ids, and every refusal through the real command."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_reference import random_hf_model, tiny_config
from test_export import random_model
from test_finetune import gemma_like_directory
from test_tokenizer import varied_strings
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from architecture import Gemma3Model
from architecture.gguf_export import export_gguf, gguf_tensor_names
from architecture.hf_export import export_hf
from data.tokenizer import gpt2, load_tokenizer
from training.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parent.parent
LAYERS = ["sliding_attention"] * 5 + ["full_attention"]


def gemma_like_config(**overrides):
    values = dict(
        vocab_size=50257,
        context_length=256,
        emb_dim=64,
        n_heads=2,
        n_kv_groups=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        hidden_dim=128,
        n_layers=6,
        sliding_window=16,
        layer_types=LAYERS,
        rms_norm_eps=1e-6,
    )
    return tiny_config(**(values | overrides))


def fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def model():
    return random_model(gemma_like_config())


@pytest.fixture(scope="module")
def files(model, tmp_path_factory) -> dict[str, gguf.GGUFReader]:
    out = tmp_path_factory.mktemp("gguf")
    return {
        dtype: gguf.GGUFReader(export_gguf(model, gpt2(), out / f"m-{dtype}.gguf", dtype))
        for dtype in ("f32", "f16", "bf16", "q8_0")
    }


def test_hyperparameters_are_the_ones_llama_cpp_reads(files, model):
    meta = fields(files["f32"])
    config = model.config
    expected = {
        "general.architecture": "gemma3",
        "gemma3.context_length": 256,
        "gemma3.embedding_length": 64,
        "gemma3.block_count": 6,
        "gemma3.feed_forward_length": 128,
        "gemma3.attention.head_count": 2,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 32,
        "gemma3.attention.value_length": 32,
        "gemma3.rope.freq_base": config.rope_base,
        "gemma3.attention.sliding_window": 16,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.eot_token_id": 50256,
        "tokenizer.ggml.padding_token_id": 50256,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {key: meta[key] for key in expected} == expected
    assert meta["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(meta["tokenizer.ggml.tokens"]) == 50257 and meta["tokenizer.ggml.token_type"][50256] == 3  # control
    assert {fields(r)["general.file_type"] for r in files.values()} == {0, 1, 32, 7}


@pytest.mark.parametrize("tied", [True, False])
def test_tensor_names_and_shapes(tmp_path, tied):
    model = random_model(gemma_like_config(tie_embeddings=tied))
    reader = gguf.GGUFReader(export_gguf(model, gpt2(), tmp_path / "m.gguf"))
    names = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    params = dict(model.named_parameters())
    assert names == {theirs: tuple(params[ours].shape) for ours, theirs in gguf_tensor_names(model).items()}
    assert ("output.weight" in names) == (not tied) and "blk.5.attn_q_norm.weight" in names


def test_values_in_every_dtype(files, model):
    params = dict(model.named_parameters())
    for dtype, reader in files.items():
        for tensor in reader.tensors:
            ours = next(k for k, v in gguf_tensor_names(model).items() if v == tensor.name)
            expected = params[ours].detach().float().numpy()
            if ours.endswith("norm.weight"):  # llama.cpp multiplies by the stored weight: Gemma's 1 + weight
                assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
                assert np.array_equal(tensor.data, expected + 1), tensor.name
                continue
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
            if dtype == "f32":
                assert np.array_equal(values, expected), tensor.name
            elif dtype == "f16":
                assert np.array_equal(values, expected.astype(np.float16).astype(np.float32)), tensor.name
            elif dtype == "bf16":
                assert np.array_equal(values, torch.from_numpy(expected).bfloat16().float().numpy()), tensor.name
            else:  # q8_0: each block of 32 is round(x / d) * d with d = max|x| / 127 (stored as float16)
                blocks = np.abs(expected).reshape(-1, 32).max(axis=1, keepdims=True) / 127
                error = np.abs(values - expected).reshape(-1, 32)
                assert (error <= blocks * 0.5 + blocks * 127 * 2**-10).all(), tensor.name


def test_q8_0_is_about_half_of_bf16(files):
    sizes = {dtype: reader.data.nbytes for dtype, reader in files.items()}
    assert sizes["q8_0"] < 0.6 * sizes["bf16"] < 0.6 * sizes["f32"]


def test_file_tokenizer_gives_tiktokens_ids(files):
    meta = fields(files["f32"])
    tokens, merges = meta["tokenizer.ggml.tokens"], [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    strings = varied_strings()
    assert len(strings) > 300
    for text in strings:
        assert bpe.encode(text).ids == gpt2().encode(text), text


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/export_gguf.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_export_command_writes_a_checkpoint(tmp_path, model):
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "run" / "best.pt")
    result = run_export("--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert (
        "q8_0, tokenizer gpt2" in result.stdout
        and fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == 7
    )


@pytest.mark.slow
def test_export_command_defaults_to_the_model_configs_dtype(tmp_path, model):
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "m.pt")
    result = run_export("--ckpt", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.gguf"))
    assert result.returncode == 0, result.stderr
    assert model.config.dtype == "bfloat16" and "bf16, tokenizer gpt2" in result.stdout
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16


def word_level_directory(path: Path, model) -> Path:
    """A Hugging Face directory whose tokenizer is not byte-level BPE."""
    export_hf(model, path)
    backend = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, fragment",
    [
        (
            lambda tmp, m: {"model_config": gemma_like_config(layer_types=["full_attention"] * 6)},
            "layer_types must be five sliding layers then one full layer",
        ),
        (
            lambda tmp, m: {"model_config": gemma_like_config(query_pre_attn_scalar=24)},
            "query_pre_attn_scalar is 24; llama.cpp scales queries by 32^-0.5",
        ),
        (
            lambda tmp, m: {"model_config": gemma_like_config(rope_local_base=5000.0)},
            "rope_local_base is 5000; llama.cpp fixes sliding layers' at 10000",
        ),
        (
            lambda tmp, m: {"hf_dir": word_level_directory(tmp / "hf", m)},
            "is neither byte-level BPE with GPT-2's split nor Gemma's kind",
        ),
        (lambda tmp, m: {"ckpt": tmp / "missing.pt"}, "checkpoint not found"),
        (lambda tmp, m: {"ckpt": tmp / "run", "out": tmp / "nowhere" / "m.gguf"}, "must be a file in an existing"),
    ],
    ids=["layer-pattern", "query-scale", "rope-local-base", "tokenizer", "missing", "out-dir"],
)
def test_refusals_through_the_command(tmp_path, model, make, fragment):
    case = make(tmp_path, model)
    if "model_config" in case:
        bad = Gemma3Model(case["model_config"])
        save_checkpoint({"model": bad.state_dict(), "model_config": bad.config.to_dict()}, tmp_path / "bad.pt")
        case = {"ckpt": tmp_path / "bad.pt"}
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "run" / "best.pt")
    source = ["--hf-dir", str(case["hf_dir"])] if "hf_dir" in case else ["--ckpt", str(case["ckpt"])]
    out = case.get("out", tmp_path / "m.gguf")
    result = run_export(*source, "--out", str(out))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert not Path(out).exists() and not list(tmp_path.glob("*.tmp"))


def test_hugging_face_byte_level_bpe_tokenizer(tmp_path):
    """A model fine-tuned with its own byte-level BPE tokenizer: the file's tokens and merges encode as it does."""
    directory = gemma_like_directory(tmp_path / "hf")
    random_hf_model(gemma_like_config(vocab_size=400, tie_embeddings=True)).save_pretrained(directory)
    result = run_export("--hf-dir", str(directory), "--out", str(tmp_path / "m.gguf"))
    assert result.returncode == 0, result.stderr
    meta = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    tokenizer = load_tokenizer(directory)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]
    vocab = {token: i for i, token in enumerate(meta["tokenizer.ggml.tokens"])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in varied_strings()[:100]:
        assert bpe.encode(text).ids == tokenizer.encode(text), text


def expect_refusal(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_existing_file_is_replaced_only_with_force(tmp_path, model):
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "m.pt")
    (tmp_path / "m.gguf").write_text("someone's model")
    (tmp_path / "file").write_text("")
    ckpt = ["--ckpt", str(tmp_path / "m.pt")]
    expect_refusal(run_export(*ckpt, "--out", str(tmp_path / "m.gguf")), "exists; pass --force to replace it")
    expect_refusal(run_export(*ckpt, "--out", str(tmp_path / ("x" * 300))), "(File name too long); nothing was")
    expect_refusal(run_export(*ckpt, "--out", str(tmp_path / "file" / "m.gguf")), "must be a file in an existing")
    assert (tmp_path / "m.gguf").read_text() == "someone's model"
    result = run_export(*ckpt, "--out", str(tmp_path / "m.gguf"), "--force", "--dtype", "q8_0")
    assert result.returncode == 0 and result.stdout.startswith(f"wrote {tmp_path / 'm.gguf'} ("), result.stderr
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == 7


@pytest.mark.slow
def test_a_full_disk_leaves_the_old_file(tmp_path, model):
    from test_faults import tmpfs

    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "m.pt")
    disk = tmpfs(tmp_path / "small", "1m")  # the q8_0 file is about 4 MB
    try:
        (disk / "m.gguf").write_text("the old export")
        result = run_export("--ckpt", str(tmp_path / "m.pt"), "--out", str(disk / "m.gguf"), "--force")
        expect_refusal(result, f"cannot write {disk / 'm.gguf'} (No space left on device); {disk / 'm.gguf'} was left")
        assert [p.name for p in disk.iterdir()] == ["m.gguf"] and (disk / "m.gguf").read_text() == "the old export"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- Gemma's own tokenizer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> tuple[Path, Path, Gemma3Model]:
    """A Gemma-layout tokenizer (tests/gemma_chat.py) with a random model that llama.cpp's gemma3 graph runs, written
    as GGUF: (the file, the tokenizer's directory, the model)."""
    from gemma_chat import gemma_chat_directory

    directory = gemma_chat_directory(tmp_path_factory.mktemp("gemma") / "tokenizer")
    tokenizer = load_tokenizer(directory)
    model = random_model(gemma_like_config(vocab_size=tokenizer.vocab_size, tie_embeddings=True))
    return export_gguf(model, tokenizer, directory.parent / "gemma.gguf", "f32"), directory, model


def test_gemma_tokenizer_is_written_as_llama_cpps_sentencepiece_vocabulary(gemma_gguf):
    from gemma_chat import BYTES, CONTROL, TURNS, USER_DEFINED

    path, directory, _ = gemma_gguf
    meta = fields(gguf.GGUFReader(path))
    spec = json.loads((directory / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    assert meta["tokenizer.ggml.model"] == "llama"
    tokens, types, scores = (
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.token_type"],
        meta["tokenizer.ggml.scores"],
    )
    assert len(tokens) == len(types) == len(scores) == len(vocab) + len(USER_DEFINED)
    assert tokens[: len(vocab)] == sorted(vocab, key=vocab.get)  # every piece, in id order
    control, byte, normal, user = (int(t) for t in (gguf.TokenType.CONTROL, gguf.TokenType.BYTE,
                                                    gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED))  # fmt: skip
    first_byte, first_normal = len(CONTROL) + len(TURNS), len(CONTROL) + len(TURNS) + len(BYTES)
    assert types[:first_byte] == [control] * first_byte and set(scores[:first_byte]) == {-1000.0}
    assert tokens[first_byte:first_normal] == BYTES and set(types[first_byte:first_normal]) == {byte}
    assert set(scores[first_byte:first_normal]) == {0.0}
    normal_scores = scores[first_normal : len(vocab)]
    assert set(types[first_normal : len(vocab)]) == {normal}
    assert all(a > b for a, b in itertools.pairwise(normal_scores)), "scores must fall with the id"
    assert tokens[len(vocab) :] == ["<h1>", "    "] and types[len(vocab) :] == [user, user]  # `▁` as a space
    assert (tokens[105], tokens[106]) == ("<start_of_turn>", "<end_of_turn>")
    ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding", "eot")}
    assert ids == {"bos": 2, "eos": 1, "unknown": 3, "padding": 0, "eot": 106}
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.chat_template"].startswith("{{ bos_token }}")


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (README, Tests)")


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_the_hugging_face_tokenizer_does(gemma_gguf):
    """llama.cpp itself (llama-cpp-python), reading the file's vocabulary, against the tokenizer.json it came from,
    on a few hundred texts: prose and code, several scripts, emoji, runs of spaces and newlines, tags, special-token
    text."""
    llama = llama_cpp().Llama(model_path=str(gemma_gguf[0]), vocab_only=True, verbose=False)
    tokenizer = load_tokenizer(gemma_gguf[1])
    texts = varied_strings() + [
        "<h1>Title</h1>\n\n\n",
        "a    b     c      d",
        "  leading spaces",
        "tab\tand\r\nCRLF",
        "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
        "literal <eos> <start_of_turn> <unused3> stay text",
        "😀😃😄 🙂 🚀🌍",
        " ",
        "\n",
    ]
    assert len(texts) >= 300
    for text in texts:
        assert llama.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text


@pytest.mark.slow
def test_llama_cpp_greedy_decoding_equals_ours(gemma_gguf):
    from architecture.generate import generate_stream

    path, directory, model = gemma_gguf
    llama = llama_cpp().Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    tokenizer = load_tokenizer(directory)
    prompt = tokenizer.prompt_ids("def main():\n    print('hello')")
    ours = [t.item() for t in generate_stream(model, torch.tensor([prompt]), 20, temperature=0)]
    llama.eval(prompt)
    theirs = []
    for _ in range(20):
        theirs.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
        llama.eval(theirs[-1:])
    assert theirs == ours


@pytest.mark.slow
@pytest.mark.parametrize("vocabulary", ["gemma", "gpt2"])
def test_llama_cpp_renders_a_chat_with_the_files_template_as_we_do(gemma_gguf, model, tmp_path, vocabulary):
    """llama-cpp-python's chat formatter, given the template and special tokens the file carries, and llama.cpp's
    tokenizer (control tokens parsed) give the ids that sample.py --chat feeds the model."""
    llama_cpp()  # skipped without llama-cpp-python, before importing from it
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from data.chat import chat_template

    if vocabulary == "gemma":
        path, tokenizer = gemma_gguf[0], load_tokenizer(gemma_gguf[1])
    else:
        path, tokenizer = export_gguf(model, gpt2(), tmp_path / "gpt2.gguf", "f32"), gpt2()
    llama = llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)
    meta = fields(gguf.GGUFReader(path))
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = (tokens[meta[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos"))
    formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    messages = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
    ]
    prompt = formatter(messages=messages).prompt
    expected = chat_template(tokenizer).render(messages, add_generation_prompt=True)[0]
    assert llama.tokenize(prompt.encode(), add_bos=False, special=True) == expected
