"""BatchLoader: shapes and shift, determinism, resuming, and its error messages."""

import io

import numpy as np
import pytest
import torch

from data.errors import DataError
from data.loader import BatchLoader
from data.meta import write_meta

N_TRAIN, N_VAL = 10_000, 300


def make_dataset(root, train=None, val=None, **meta_overrides):
    """A dataset directory written by hand: token i of the train split is i % 50257."""
    train = np.arange(N_TRAIN) % 50257 if train is None else train
    val = np.arange(N_VAL) if val is None else val
    root.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype="<u2").tofile(root / "train.bin")
    np.asarray(val, dtype="<u2").tofile(root / "val.bin")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "source": {"kind": "test"}}
    write_meta(root, {**meta, "train_tokens": len(train), "val_tokens": len(val), **meta_overrides})
    return root


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds")


EOT, BOS, EOS, COUNT_FROM = 50256, 2, 1, 10
GEMMA_STYLE = {"kind": "tokenizer.json", "vocab_size": 50257, "sha256": "0" * 64, "bos_id": BOS, "eos_id": EOS}


def make_documents(root, gemma=False, n_train=N_TRAIN, tokenizer=None):
    """Documents of 20 to 300 tokens, with GPT-2's separators (<|endoftext|> after each) or Gemma's (<bos> before,
    <eos> after). Every other token is its offset + COUNT_FROM, so a row says where in the file it was read."""
    rng = np.random.default_rng(0)

    def split(n):
        tokens = np.arange(n) + COUNT_FROM
        ends = np.cumsum(rng.integers(20, 300, size=n // 20))
        ends = ends[ends < n]
        if gemma:
            tokens[np.r_[0, ends]], tokens[ends - 1] = BOS, EOS
        else:
            tokens[ends] = EOT
        return tokens

    tokenizer = tokenizer or (GEMMA_STYLE if gemma else "gpt2")
    return make_dataset(root, split(n_train), split(N_VAL), tokenizer=tokenizer)


def file_offset(row: np.ndarray) -> int:
    """The offset in the file of a row read from make_documents' tokens, from its first counting token."""
    k = int(np.flatnonzero((row >= COUNT_FROM) & (row != EOT))[0])
    return int(row[k]) - COUNT_FROM - k


@pytest.fixture
def documents(tmp_path):
    return make_documents(tmp_path / "docs")


def test_batches_are_shifted_windows(dataset):
    x, y = BatchLoader(dataset, "train", batch_size=4, block_size=16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # the train split counts up, so the next token is always x + 1
    assert int(x.min()) >= 0 and int(y.max()) < N_TRAIN


def test_random_rows_are_nanogpt_s_windows_as_before(dataset):
    x, _ = BatchLoader(dataset, "train", batch_size=4, block_size=16, seed=7).next_batch()
    starts = torch.randint(N_TRAIN - 16, (1, 4), generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(x[:, 0], starts)  # token i is i: the same offsets, drawn the same way


@pytest.mark.parametrize("gemma", [False, True], ids=["gpt2", "gemma"])
@pytest.mark.parametrize("rows", ["bos", "doc"])
def test_rows_start_with_the_document_start_and_hold_the_file_s_tokens(tmp_path, gemma, rows):
    root = make_documents(tmp_path / "docs", gemma)
    tokens = np.fromfile(root / "train.bin", dtype="<u2")
    start = BOS if gemma else EOT
    x, y = BatchLoader(root, "train", batch_size=64, block_size=32, rows=rows, seed=1).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and bool((x[:, 0] == start).all())
    # bos: the start token, then block_size tokens of the file from anywhere; doc: block_size + 1 from a start.
    read = torch.cat([x[:, 1:] if rows == "bos" else x, y[:, -1:]], dim=1).numpy()
    for row in read:
        offset = file_offset(row)
        assert np.array_equal(row, tokens[offset : offset + len(row)])
        assert rows == "bos" or tokens[offset] == start


def test_bos_rows_are_random_rows_with_the_start_token_first_and_the_last_dropped(documents):
    random, bos = (BatchLoader(documents, "train", 8, 32, seed=4, rows=rows).next_batch() for rows in ("random", "bos"))
    assert torch.equal(bos[0][:, 1:], random[0][:, :-1]) and torch.equal(bos[1], random[0])


@pytest.mark.parametrize("rows", ["bos", "doc"])
def test_bos_rows_reach_every_token_and_doc_rows_every_document_start_with_room(tmp_path, rows):
    root = make_documents(tmp_path / "docs", n_train=400)
    tokens = np.fromfile(root / "train.bin", dtype="<u2")
    loader = BatchLoader(root, "train", batch_size=5000, block_size=8, rows=rows)
    x, y = loader.next_batch()
    read = torch.cat([x[:, 1:] if rows == "bos" else x, y[:, -1:]], dim=1).numpy()
    offsets = {file_offset(row) for row in read}
    if rows == "bos":  # offsets 0..391, random's: every token but the file's last
        assert offsets == set(range(len(tokens) - 8))
    else:  # every <|endoftext|> with block_size + 1 tokens from it
        assert offsets == {int(i) for i in np.flatnonzero(tokens == EOT) if i + 9 <= len(tokens)}


def test_a_dataset_without_a_document_start_token_is_one_error_naming_the_setting(tmp_path):
    none = {**GEMMA_STYLE, "bos_id": None, "eos_id": None}
    root = make_documents(tmp_path / "docs", tokenizer=none)
    BatchLoader(root, "train", 2, 8)  # random rows need none
    with pytest.raises(DataError, match="no document start token for batch_rows=bos; use --batch_rows=random"):
        BatchLoader(root, "train", 2, 8, rows="bos")


def test_doc_rows_without_a_document_start_with_room_say_what_to_change(dataset):
    with pytest.raises(DataError, match="has no document start .* use a smaller block_size or --batch_rows=bos"):
        BatchLoader(dataset, "train", 2, 8, rows="doc")  # counts up to 9,999: no <|endoftext|>


def test_same_seed_same_stream_and_seeds_differ(dataset):
    def stream(seed):
        loader = BatchLoader(dataset, "train", batch_size=8, block_size=32, seed=seed)
        return torch.cat([loader.next_batch()[0] for _ in range(3)])

    assert torch.equal(stream(0), stream(0))
    assert not torch.equal(stream(0), stream(1))


@pytest.mark.parametrize("rows", ["random", "bos", "doc"])
def test_resume_from_state_dict(documents, rows):
    a = BatchLoader(documents, "train", batch_size=8, block_size=32, seed=3, rows=rows)
    for _ in range(5):
        a.next_batch()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = BatchLoader(documents, "train", batch_size=8, block_size=32, seed=99, rows=rows)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        for xa, xb in zip(a.next_batch(), b.next_batch(), strict=True):
            assert torch.equal(xa, xb)


@pytest.mark.parametrize("rows", ["random", "bos", "doc"])
def test_ddp_ranks_take_their_slice_and_resume_from_one_state(documents, rows):
    def loader(rank):
        return BatchLoader(documents, "train", batch_size=4, block_size=8, seed=5, rank=rank, world_size=2, rows=rows)

    r0, r1 = loader(0), loader(1)
    one = BatchLoader(documents, "train", batch_size=8, block_size=8, seed=5, rows=rows).next_batch()[0]
    x0, x1 = r0.next_batch()[0], r1.next_batch()[0]
    assert torch.equal(torch.cat([x0, x1]), one)  # the rows one process would draw, shared out by rank
    assert not torch.equal(x0, x1)
    resumed = loader(1)
    resumed.load_state_dict(r0.state_dict())  # checkpoints hold rank 0's state only
    assert torch.equal(resumed.next_batch()[0], r1.next_batch()[0])


def test_val_split_and_padded_model_vocab(dataset):
    x, _ = BatchLoader(dataset, "val", batch_size=2, block_size=N_VAL - 1).next_batch()
    assert torch.equal(x[0], torch.arange(N_VAL - 1))


def test_not_prepared_names_the_command(tmp_path):
    with pytest.raises(DataError, match="not prepared; run: python data/prepare.py"):
        BatchLoader(tmp_path / "nope", "train", 2, 8)


def test_missing_meta_is_incomplete(dataset):
    (dataset / "meta.json").unlink()
    with pytest.raises(DataError, match="incomplete"):
        BatchLoader(dataset, "train", 2, 8)


def test_split_too_short(dataset):
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchLoader(dataset, "val", 2, N_VAL)


def test_size_disagrees_with_meta(tmp_path):
    root = make_dataset(tmp_path / "ds", train_tokens=N_TRAIN + 1)
    with pytest.raises(DataError, match="meta.json says"):
        BatchLoader(root, "train", 2, 8)


def test_token_id_out_of_range(tmp_path):
    root = make_dataset(tmp_path / "ds", train=np.full(100, 60_000))
    with pytest.raises(DataError, match="token id 60000"):
        BatchLoader(root, "train", 2, 8).next_batch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches(dataset):
    x, y = BatchLoader(dataset, "train", 4, 16, device="cuda").next_batch()
    assert x.is_cuda and y.is_cuda and torch.equal(y, x + 1)
