"""The training loop: `train(config)` runs one training job from a `TrainingConfig` to its last checkpoint.

Design choices:
- One function that reads top to bottom like nanoGPT's train.py: set-up, then the loop of
  (learning rate, accumulate micro-batches, clip, step, log, evaluate, checkpoint).
- Batches are a pure function of (seed, global batch index): rank r of W takes batches r, r + W, ... so W
  processes see exactly the micro-batches one process would, and resume needs only the iteration count.
- DDP synchronises gradients only on the last micro-step (`no_sync` before). The loss is scaled by
  1 / local micro-steps and DDP averages over ranks, so the update equals the single-process one.
- Ctrl-C sets a flag; the loop finishes the iteration it is in, saves `latest` and exits, so the checkpoint
  is always at an iteration boundary and resume is exact. A second Ctrl-C stops at once.
- A non-finite loss stops the run before the optimizer step, leaving the last good checkpoint as it was.
- Rank 0 alone evaluates (on the unwrapped model, so no collective runs), logs and writes checkpoints.
- The loss is computed without materialising the logits (`return_logits=False`, see architecture/gemma3.py).
- The next micro-batch is fetched before the current backward: its host work (memmap reads, pinned copy) runs
  while the device works through the queued forward. It never reaches past the iteration, so the loader state
  a checkpoint saves is the iteration boundary's and resume stays exact.
- `compile` compiles the model once; the first iteration's time (compilation included) is logged as such.
  `activation_checkpointing` recomputes each block in the backward, trading ~1/3 more compute for memory.
"""

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from architecture import Gemma3Model, ModelConfig
from architecture.config import ConfigError
from architecture.hf_weights import hub_snapshot
from data.loader import BatchLoader
from data.meta import dataset_tokenizer
from data.prepare import DATA_ROOT, ensure_prepared
from data.tokenizer import Tokenizer, gpt2, load_tokenizer, tokenizer_from_record

from .checkpoint import check_tokenizer_fits, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import REPO_ROOT, TrainingConfig
from .distributed import Distributed, setup_distributed, teardown_distributed
from .metrics import MetricsLog, flops_per_token, peak_flops
from .optimizer import configure_optimizer
from .schedule import learning_rate

EVAL_SEED = 1_000_003  # evaluation reads the same batches every time, whatever the training seed


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says what to do."""


def resolve_device(config: TrainingConfig) -> torch.device:
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{config.source}: device is '{config.device}' but CUDA is not available on this machine. "
            "The full 164.7M-parameter model does not train on a CPU in any useful time: run the demo, "
            "`python train.py --config config/demo.json` (a small model on the offline pydocs corpus, about "
            "6 minutes on a 2-core CPU), or pass --device=cpu to run this config anyway"
        )
    return torch.device(config.device)


def build_model(config: TrainingConfig) -> tuple[Gemma3Model, Tokenizer | None, dict | None]:
    """The model to train, the tokenizer it speaks (None from scratch: the dataset's) and, when resuming, the
    checkpoint it came from."""
    if config.init_from == "resume":
        path = Path(config.out_dir) / "latest.pt"
        checkpoint = load_checkpoint(path)
        model, tokenizer = model_from_checkpoint(checkpoint, path), tokenizer_from_record(checkpoint.get("tokenizer"))
        check_tokenizer_fits(model, tokenizer, path)
        return model, tokenizer, checkpoint
    if config.init_from == "scratch":
        return Gemma3Model(ModelConfig.from_json(REPO_ROOT / config.model_config)), None, None
    directory = Path(config.init_from)
    if not directory.exists() and config.init_from.count("/") == 1:  # a hub id such as google/gemma-3-270m
        directory = hub_snapshot(config.init_from)
    if (directory / "config.json").is_file():
        if not (directory / "tokenizer.json").is_file():
            raise ConfigError(f"{config.source}: init_from {directory} has no tokenizer.json, so the model's "
                              "tokenizer is unknown; copy in the one it was trained with")  # fmt: skip
        model, tokenizer = Gemma3Model.from_hf(str(directory)), load_tokenizer(directory)
        check_tokenizer_fits(model, tokenizer, directory)
        return model, tokenizer, None
    raise ConfigError(
        f"{config.source}: 'init_from' is '{config.init_from}'; use scratch, resume, a Hugging Face model directory "
        "(config.json, *.safetensors, tokenizer.json) or a hub id such as google/gemma-3-270m"
    )


class StopRequest:
    """Turns the first Ctrl-C into a request to stop at the end of the current iteration."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: finishing this iteration, saving a checkpoint, then stopping (again to abort)")

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader_args: dict, eval_iters: int, autocast) -> dict:
    """Mean loss per split over `eval_iters` batches: fresh loaders with a fixed seed, so every evaluation of a
    run (and of a resumed run) reads the same batches and the figures are comparable."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        loader = BatchLoader(split=split, seed=EVAL_SEED, **loader_args)
        total = torch.zeros((), device=loader.device)
        for _ in range(eval_iters):
            x, y = loader.next_batch()
            with autocast:
                total += model(x, y, return_logits=False)[1].float()
        losses[split] = (total / eval_iters).item()
    model.train()
    return losses


def train(config: TrainingConfig) -> dict:
    """Run the training job described by `config`; returns the last evaluation's losses."""
    device = resolve_device(config)
    world = setup_distributed(device.type)
    try:
        return _train(config, device, world)
    finally:
        teardown_distributed(world)


def _train(config: TrainingConfig, device: torch.device, world: Distributed) -> dict:
    if world.enabled and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if config.gradient_accumulation_steps % world.world_size:
        raise ConfigError(
            f"{config.source}: 'gradient_accumulation_steps' ({config.gradient_accumulation_steps}) must be "
            f"divisible by the number of processes ({world.world_size}) so the global batch stays the same"
        )
    local_accum = config.gradient_accumulation_steps // world.world_size
    out_dir = Path(config.out_dir)
    log = tqdm.write if world.is_master else (lambda *_: None)

    # Model and data. The dataset is prepared by rank 0 alone, while the others wait at the barrier.
    torch.manual_seed(config.seed)
    model, tokenizer, checkpoint = build_model(config)
    model_config = model.config
    if config.block_size > model_config.context_length:
        raise ConfigError(
            f"{config.source}: 'block_size' ({config.block_size}) exceeds the model's "
            f"context_length ({model_config.context_length})"
        )
    if world.is_master:
        ensure_prepared(config.dataset, tokenizer or gpt2())
    if world.enabled:
        dist.barrier()
    # A model trained from scratch speaks its dataset's tokenizer; any other must be the dataset's (the loader checks).
    if tokenizer is None:
        tokenizer = dataset_tokenizer(DATA_ROOT / config.dataset)
        check_tokenizer_fits(model, tokenizer, config.model_config)
    loader_args = dict(data_dir=DATA_ROOT / config.dataset, batch_size=config.batch_size,
                       block_size=config.block_size, device=device, tokenizer=tokenizer)  # fmt: skip
    train_loader = BatchLoader(split="train", seed=config.seed, rank=world.rank, world_size=world.world_size,
                               **loader_args)  # fmt: skip

    if world.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
        log(f"model config:\n{json.dumps(model_config.to_dict(), indent=1)}")
        log(f"training config:\n{json.dumps(config.to_dict(), indent=1)}")
        n_params = sum(p.numel() for p in model.parameters())
        shape = f"{config.batch_size} x {config.block_size} x {config.gradient_accumulation_steps} micro-batches"
        log(f"{n_params / 1e6:.1f}M parameters, tokenizer {tokenizer}; {config.tokens_per_iter:,} tokens per "
            f"iteration ({shape})")  # fmt: skip

    # Precision: float32 master weights; bf16 autocast on CUDA; float32 on the CPU.
    model.to(device)
    model.activation_checkpointing = config.activation_checkpointing
    model.attention_backend = config.attention_backend
    use_bf16 = device.type == "cuda" and config.dtype == "bfloat16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif config.dtype != "float32":
        log(f"note: training on the CPU in float32 (config dtype '{config.dtype}' applies on CUDA only)")

    optimizer = configure_optimizer(model, config, device.type)
    iter_num, best_val_loss = 0, math.inf
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_loader.load_state_dict(checkpoint["loader"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        log(f"resumed from {out_dir / 'latest.pt'} at iteration {iter_num}")
        del checkpoint

    raw_model = model
    if config.compile:
        model = torch.compile(model)
    eval_model = model
    if world.enabled:
        model = DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)

    wandb_run = None
    if config.wandb_log and world.is_master:
        import wandb  # only where enabled: it is slow to import

        wandb_run = wandb.init(
            project=config.wandb_project, name=config.wandb_run_name or None, dir=str(out_dir),
            config={"model": model_config.to_dict(), "training": config.to_dict()},
        )  # fmt: skip
    metrics = (
        MetricsLog(out_dir, iter_num if config.init_from == "resume" else None, wandb_run) if world.is_master else None
    )
    flops_per_iter = flops_per_token(raw_model, config.block_size) * config.tokens_per_iter / world.world_size
    peak = peak_flops(device)

    def diverged_message(what: str) -> str:
        return (
            f"{what} at iteration {iter_num}: training diverged and stopped without saving. The last good "
            f"checkpoint, if one was written, is {out_dir / 'latest.pt'}; lower learning_rate or check the data"
        )

    def checkpoint_state() -> dict:
        rng = {"torch": torch.get_rng_state()}  # the batches have their own generator (in "loader")
        return {
            "model": raw_model.state_dict(), "model_config": model_config.to_dict(),
            "training_config": config.to_dict(), "tokenizer": tokenizer.record(), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "optimizer": optimizer.state_dict(), "rng": rng,
            "loader": train_loader.state_dict(),
        }  # fmt: skip

    def run_evaluation() -> dict:
        nonlocal best_val_loss
        losses = evaluate(eval_model, loader_args, config.eval_iters, autocast)
        if not all(map(math.isfinite, losses.values())):
            raise TrainingError(diverged_message(f"evaluation losses are {losses}"))
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        log(f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            + (" (best)" if improved else ""))  # fmt: skip
        metrics.log("eval", iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr)
        state = checkpoint_state()
        save_checkpoint(state, out_dir / "latest.pt")
        if improved:
            save_checkpoint(state, out_dir / "best.pt")
        return losses

    stop = StopRequest()
    progress = tqdm(
        total=config.max_iters, initial=iter_num, disable=not world.is_master, unit="it", dynamic_ncols=True
    )
    losses, t_last = {}, time.perf_counter()
    start_iter = iter_num  # the first iteration of this process, resumed or not, is the one that compiles
    try:
        while iter_num < config.max_iters:
            lr = learning_rate(iter_num, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = torch.zeros((), device=device)
            x, y = train_loader.next_batch()
            for micro_step in range(local_accum):
                last = micro_step == local_accum - 1
                # DDP all-reduces gradients on the last micro-step only; no_sync's context can be entered once.
                with model.no_sync() if world.enabled and not last else contextlib.nullcontext():
                    with autocast:
                        _, loss = model(x, y, return_logits=False)
                        loss = loss / local_accum
                    if not last:  # prefetch within the iteration only: checkpoints stay at its boundary
                        x, y = train_loader.next_batch()
                    loss.backward()
                loss_sum += loss.detach()

            # One small all-reduce carries both the mean loss and any rank's stop request.
            status = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=device)])
            if world.enabled:
                dist.all_reduce(status)
                status[0] /= world.world_size
            loss_value, stop_requested = status[0].item(), status[1].item() > 0
            if not math.isfinite(loss_value):
                raise TrainingError(diverged_message(f"loss is {loss_value}"))
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            progress.update(1)

            now = time.perf_counter()
            dt, t_last = now - t_last, now
            first_iter = iter_num == start_iter + 1
            if first_iter and config.compile:
                log(f"torch.compile: first iteration took {dt:.1f} s, compilation included")
                if world.is_master:
                    metrics.log("compile", iter_num, first_iter_s=dt)
            if world.is_master and (iter_num % config.log_interval == 0 or first_iter):
                row = {
                    "loss": loss_value,
                    "lr": lr,
                    "tokens_per_sec": config.tokens_per_iter / dt,
                    "ms_per_iter": dt * 1e3,
                }
                if peak:
                    row["mfu"] = flops_per_iter / dt / peak
                metrics.log("train", iter_num, **row)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                mfu = f", MFU {row['mfu']:.1%}" if peak else ""
                log(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {row['tokens_per_sec']:,.0f} tok/s, "
                    f"{row['ms_per_iter']:.0f} ms{mfu}")  # fmt: skip

            evaluates = iter_num % config.eval_interval == 0 or iter_num == config.max_iters
            if world.is_master and evaluates:
                losses = run_evaluation()
                t_last = time.perf_counter()  # the next iteration's timing excludes evaluation and checkpointing
            if stop_requested:
                if world.is_master and not evaluates:  # an evaluation just wrote latest.pt
                    save_checkpoint(checkpoint_state(), out_dir / "latest.pt")
                log(f"stopped at iteration {iter_num}; continue with --init_from=resume")
                break
    finally:
        progress.close()
        stop.restore()
        if wandb_run is not None:
            wandb_run.finish()
    return losses
