"""Random (x, y) batches of block_size tokens from a prepared dataset's memory-mapped token file.

Design choices:
- Random windows at uniform offsets, as in nanoGPT: no epochs or shuffling state, so the whole
  state of the stream is one `torch.Generator`, and `state_dict()` resumes it exactly.
- Three kinds of rows (`rows`, the training setting batch_rows), all drawn that way:
  `random`, nanoGPT's window, which usually begins mid-document; `bos`, the same random window with the
  document start token (Gemma's `<bos>`, GPT-2's `<|endoftext|>`) put first and its last token dropped, so that
  every row begins as the model's documents do, every token of the file but its last is still trained on, and
  a seed draws the same offsets for both (their evaluations read the same text); `doc`, a window from a random
  occurrence of that token, running on through the documents after it: real document starts only, but a
  document's tokens past its first block are never drawn (most of a corpus of long files).
- `conversation` rows, for chat datasets (data/chat.py), each hold one whole conversation from its start, padded to
  the block: x padded with the start id, y with IGNORE_INDEX, and y is IGNORE_INDEX wherever the dataset's mask
  says a token is no target (the user's turns, the template's markup). A conversation longer than block_size + 1
  tokens is never drawn (`dropped` counts them, and training says so): cut, it could lose its last reply's end of
  turn and teach the model not to stop. One conversation a row, so none attends to another and positions start at
  0, as at inference; the cost is the padding, which a block_size near the longest conversation keeps small.
- `doc` finds the document starts once per process, with numpy over the memory map in chunks: 0.1 s for
  pystdlib's 15M tokens, 0.6 s for 500M (TinyStories' size) read from the page cache, so no index file is kept.
- The generator lives on the CPU, so a seed gives the same stream on every device.
- Under DDP every rank runs the same generator, draws world_size * batch_size offsets per step
  and keeps its own slice: ranks see distinct windows, and one rank's `state_dict()` (the one a
  checkpoint holds) resumes every rank exactly.
- Everything that can be wrong with the files is checked in `__init__` with a message that says
  the fix (prepare command, tokenizer, file size, split length), except the token ids themselves: scanning
  a multi-GB file at every open would cost minutes, so each batch's ids are checked instead,
  which costs microseconds and covers exactly the data the model sees.
- On CUDA, batches are copied from pinned memory with non_blocking=True, so the copy overlaps
  the previous step's compute.
"""

import functools
from pathlib import Path

import numpy as np
import torch

from architecture.loss import IGNORE_INDEX
from data.errors import DataError
from data.meta import (
    BATCH_ROWS,
    data_file,
    document_start_id,
    read_meta,
    token_file_mismatch,
    tokenizer_mismatch,
)
from data.sources import command_source
from data.tokenizer import Tokenizer

__all__ = ["BatchLoader"]

SCAN_CHUNK = 1 << 24  # tokens compared at a time while finding document starts: 32-64 MB of file


@functools.lru_cache(maxsize=4)
def document_starts(path: Path, dtype: np.dtype, start_id: int, end: int, mtime_ns: int) -> np.ndarray:
    """Offsets below `end` of every `start_id` in the token file at `path`, in order. Cached, so that evaluation's
    fresh loaders do not scan again; `mtime_ns` keys the cache to this version of the file."""
    data = np.memmap(path, dtype=dtype, mode="r")
    chunks = [np.flatnonzero(data[i : min(i + SCAN_CHUNK, end)] == start_id) + i for i in range(0, end, SCAN_CHUNK)]
    return np.concatenate(chunks)


def check_rows_fit_dataset(data_dir: str | Path, meta: dict, rows: str) -> None:
    """Conversation rows for a chat dataset, text rows for a text dataset; a DataError with the fix otherwise."""
    if "chat" in meta and rows != "conversation":
        raise DataError(
            f"dataset {data_dir} holds conversations (meta.json), which train one to a row with their loss mask: "
            "use --batch_rows=conversation (config/sft.json sets it)"
        )
    if "chat" not in meta and rows == "conversation":
        raise DataError(
            f"dataset {data_dir} holds text, not conversations: prepare a chat file (README, Chat fine-tuning) or "
            "use --batch_rows=random, bos or doc"
        )


class BatchLoader:
    """Samples `(x, y)` int64 batches of shape (batch_size, block_size); y is x shifted by one."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        block_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        rank: int = 0,
        world_size: int = 1,
        rows: str = "random",
    ) -> None:
        if rows not in BATCH_ROWS:
            raise ValueError(f"rows must be one of {', '.join(BATCH_ROWS)}, got {rows!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.path = Path(data_dir) / f"{split}.bin"
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.device = torch.device(device)
        meta = read_meta(data_dir)
        if tokenizer is not None and (mismatch := tokenizer_mismatch(data_dir, meta, tokenizer)):
            raise DataError(mismatch)
        # The tokenizer's range, which each batch is checked against; that the model's embedding holds this range is
        # the model's check (training.checkpoint.check_tokenizer_fits), made once where the model is built.
        self.vocab_size = meta["vocab_size"]
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        mismatch = token_file_mismatch(data_dir, meta, split)
        if mismatch:
            raise DataError(f"{mismatch}; rebuild with --force")
        self.num_tokens = meta[f"{split}_tokens"]
        self.rebuild = f"python data/prepare.py {command_source(meta['source'])} --name {Path(data_dir).name} --force"
        if self.num_tokens < block_size + 1 and rows != "conversation":  # a conversation row is padded
            raise DataError(
                f"{self.path} has {self.num_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller block_size or a larger dataset / --val-fraction"
            )
        self.rows = rows
        check_rows_fit_dataset(data_dir, meta, rows)
        # A `bos` row is its start token and block_size tokens of the file, the others block_size + 1 of the file.
        self.read = block_size if rows == "bos" else block_size + 1
        if rows == "conversation":
            self.start_id = meta["chat"]["template"]["start"]
            self._conversations(data_dir, split, block_size)
        else:
            self.start_id = None if rows == "random" else document_start_id(data_dir, meta, rows)
        if rows == "doc":
            end = self.num_tokens - block_size
            self.doc_starts = document_starts(self.path, self.dtype, self.start_id, end, self.path.stat().st_mtime_ns)
            if not len(self.doc_starts):
                raise DataError(
                    f"{self.path} has no document start (id {self.start_id}) with block_size + 1 = {block_size + 1} "
                    "tokens after it; use a smaller block_size or --batch_rows=bos"
                )
        self.generator = torch.Generator().manual_seed(seed)

    def _conversations(self, data_dir: Path, split: str, block_size: int) -> None:
        """Where each conversation that fits a row starts, and its length; how many do not fit (`dropped`)."""
        starts = np.fromfile(Path(data_dir) / data_file(split, "starts"), dtype="<u8").astype(np.int64)
        lengths = np.diff(starts, append=self.num_tokens)
        fits = lengths <= block_size + 1
        self.conversation_starts, self.conversation_lengths = starts[fits], lengths[fits]
        self.conversation_count, self.dropped = len(starts), int((~fits).sum())
        self.mask_path = Path(data_dir) / data_file(split, "mask")
        if not fits.any():
            raise DataError(
                f"{self.path}: none of its {len(starts):,} conversations fits block_size + 1 = {block_size + 1} "
                f"tokens (the shortest has {lengths.min():,}); raise block_size"
            )

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, int64 of shape (batch_size, block_size), on the loader's device."""
        size = (self.world_size, self.batch_size)
        if self.rows == "conversation":
            picks = torch.randint(len(self.conversation_starts), size, generator=self.generator)[self.rank].numpy()
            x, y = self._conversation_rows(picks)
            return self._to_device(x, y)
        if self.rows == "doc":
            picks = torch.randint(len(self.doc_starts), size, generator=self.generator)[self.rank]
            starts = self.doc_starts[picks.numpy()].tolist()
        else:
            offsets = torch.randint(self.num_tokens - self.block_size, size, generator=self.generator)
            starts = offsets[self.rank].tolist()
        # A fresh memmap per batch: a long-lived one keeps every page it touched mapped, and the
        # process's resident memory grows towards the file size (nanoGPT does the same).
        data = self._token_file()
        windows = np.stack([data[s : s + self.read] for s in starts])
        del data
        if self.rows == "bos":
            windows = np.insert(windows, 0, self.start_id, axis=1)
        if windows.max() >= self.vocab_size:
            raise DataError(f"{self.path} holds token id {windows.max()} >= vocab_size {self.vocab_size}; rebuild it")
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))  # astype copies into a contiguous array
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        return self._to_device(x, y)

    def _conversation_rows(self, picks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.full((len(picks), self.block_size), self.start_id, dtype=np.int64)
        y = np.full((len(picks), self.block_size), IGNORE_INDEX, dtype=np.int64)
        data, mask = self._token_file(), np.memmap(self.mask_path, dtype=np.uint8, mode="r")
        for row, pick in enumerate(picks):
            start, length = self.conversation_starts[pick], self.conversation_lengths[pick]
            ids, targets = data[start : start + length].astype(np.int64), mask[start + 1 : start + length]
            x[row, : length - 1] = ids[:-1]
            y[row, : length - 1] = np.where(targets == 1, ids[1:], IGNORE_INDEX)
        del data, mask
        if x.max() >= self.vocab_size:
            raise DataError(f"{self.path} holds token id {x.max()} >= vocab_size {self.vocab_size}; rebuild it")
        return torch.from_numpy(x), torch.from_numpy(y)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def _token_file(self) -> np.memmap:
        """The token file, mapped afresh. One emptied, truncated or rewritten by another prepare since the loader
        opened it is a DataError naming the file and the command that rebuilds it, not numpy's error from inside a
        batch. (A file cut during the microseconds of a read is beyond any check: the OS kills the process.)"""
        try:
            data = np.memmap(self.path, dtype=self.dtype, mode="r")
        except (OSError, ValueError):  # removed, or emptied: numpy cannot map an empty file
            data = np.empty(0, dtype=self.dtype)
        if len(data) != self.num_tokens:
            raise DataError(
                f"{self.path} changed under the run: it holds {len(data)} tokens, {self.num_tokens} when the run "
                f"started; rebuild it ({self.rebuild}), then resume from the last checkpoint"
            )
        return data

    def state_dict(self) -> dict:
        """Position in the random stream; tensors, ints and strs only (torch.load weights_only=True)."""
        return {"generator": self.generator.get_state(), "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Resume the stream where `state_dict()` was taken."""
        if state["split"] != self.split:
            raise ValueError(f"state is for the {state['split']!r} split, this loader reads {self.split!r}")
        self.generator.set_state(state["generator"])
