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


def test_batches_are_shifted_windows(dataset):
    x, y = BatchLoader(dataset, "train", batch_size=4, block_size=16).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y, x + 1)  # the train split counts up, so the next token is always x + 1
    assert int(x.min()) >= 0 and int(y.max()) < N_TRAIN


def test_same_seed_same_stream_and_seeds_differ(dataset):
    def stream(seed):
        loader = BatchLoader(dataset, "train", batch_size=8, block_size=32, seed=seed)
        return torch.cat([loader.next_batch()[0] for _ in range(3)])

    assert torch.equal(stream(0), stream(0))
    assert not torch.equal(stream(0), stream(1))


def test_resume_from_state_dict(dataset):
    a = BatchLoader(dataset, "train", batch_size=8, block_size=32, seed=3)
    for _ in range(5):
        a.next_batch()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = BatchLoader(dataset, "train", batch_size=8, block_size=32, seed=99)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        for xa, xb in zip(a.next_batch(), b.next_batch(), strict=True):
            assert torch.equal(xa, xb)


def test_ddp_ranks_differ_and_resume_from_one_state(dataset):
    def loader(rank):
        return BatchLoader(dataset, "train", batch_size=4, block_size=8, seed=5, rank=rank, world_size=2)

    r0, r1 = loader(0), loader(1)
    assert not torch.equal(r0.next_batch()[0], r1.next_batch()[0])
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
