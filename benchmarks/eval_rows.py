"""Loss of trained models on every kind of batch row (the training setting batch_rows), on the same rows for each.

    python benchmarks/eval_rows.py /tmp/bos_random/best.pt /tmp/bos_bos/best.pt --dataset pystdlib

A run's logged val loss is measured on the rows it trained on (the trainer evaluates on its own kind), so runs on
different kinds are not compared by their logs. This evaluates each checkpoint (or Hugging Face directory) with the
trainer's `evaluate` on each kind in turn: the same seeded batches for every model, so the figures compare across
runs (a chat dataset has one kind, `conversation`, where the loss is the masked one training uses). A `bos` or `doc`
row spends its first target on a document's first token seen after the start token alone, a `random` row on a token
seen after one of its own; the mean over a block hides neither.
"""

import contextlib

import torch

from data.cli import ArgumentParser
from data.meta import BATCH_ROWS, read_meta
from data.prepare import DATA_ROOT
from training.checkpoint import load_model
from training.trainer import evaluate


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="checkpoints (.pt) or Hugging Face model directories")
    parser.add_argument("--dataset", required=True, help="data/<dataset>/, prepared with the models' tokenizer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--eval-iters", type=int, default=50, help="batches per split and kind")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads torch computes with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | rows | train loss | val loss | val bpb |\n| --- | --- | --- | --- | --- |")
    chat = "chat" in read_meta(DATA_ROOT / args.dataset)  # conversations are read one to a row, text any other way
    for path in args.models:
        model, tokenizer = load_model(path)
        for rows in [rows for rows in BATCH_ROWS if (rows == "conversation") == chat]:
            loader_args = dict(
                data_dir=DATA_ROOT / args.dataset,
                batch_size=args.batch_size,
                block_size=args.block_size,
                device="cpu",
                tokenizer=tokenizer,
                rows=rows,
            )
            losses = evaluate(model, loader_args, args.eval_iters, contextlib.nullcontext())
            print(f"| {path} | {rows} | {losses['train']:.4f} | {losses['val']:.4f} | {losses['val_bpb']:.4f} |")


if __name__ == "__main__":
    main()
