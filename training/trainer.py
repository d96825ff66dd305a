"""The training loop: `train(config)` runs one training job from a `TrainingConfig` to its last checkpoint.

    run = setup_run(config, device, world)            # model_start, prepare_data, place_model, build_optimizer
    while run.iter_num < config.max_iters:
        lr = set_learning_rate(run)                   # each group from its own peak: warmup, cosine or wsd decay
        loss, grad_norm, stop = train_step(run, stop_request)   # micro-batches, clip, optimizer step
        logger.iteration(run, loss, lr, grad_norm)
        evaluate, then checkpoint: run.state_dict()   # every eval_interval, and at the end

Design choices:
- The device is chosen once, in `train`, from the config and this process's rank. `setup_run` builds the run's
  parts in named steps, from one `ModelStart` value that says where the model came from (scratch, resume, or a
  Hugging Face model) and carries what that start brings (its tokenizer, the resumed training state).
- `Run` holds everything that lives from one iteration to the next; its `state_dict()` is exactly what a
  checkpoint holds, and `load_state_dict()` is exactly what resume restores.
- Batches are a pure function of (seed, global batch index): rank r of W takes batches r, r + W, ... so W
  processes see exactly the micro-batches one process would, and resume needs only the loader's state.
- DDP synchronises gradients only on the last micro-step (`no_sync` before). Each micro-batch's loss is its sum over
  its targets; after DDP's average over ranks the gradients are scaled by world size / the iteration's targets (on
  every rank, from one all-reduce), so the update is the mean over every target of the iteration, equal to the
  single-process one even when rows hold different numbers of targets (conversations, data/loader.py).
- Ctrl-C sets a flag; the loop finishes the iteration it is in, saves `latest` and exits, so the checkpoint
  is always at an iteration boundary and resume is exact. A second Ctrl-C stops at once.
- A non-finite loss stops the run before the optimizer step; the checkpoints on disk are left untouched.
- Rank 0 alone evaluates (on the unwrapped model, so no collective runs), logs and writes checkpoints; the other
  ranks get a logger that does nothing (`run_logger.py`).
- The loss is computed without materialising the logits (`return_logits=False`, see architecture/loss.py).
- The next micro-batch is fetched before the current backward: its host work (memmap reads, pinned copy) runs
  while the device works through the queued forward. It never reaches past the iteration, so the loader state
  a checkpoint saves is the iteration boundary's and resume stays exact.
- `compile` compiles the model once (under DDP, the DDP-wrapped model: see `training_models`);
  `activation_checkpointing` recomputes each block in the backward, trading about a third more compute for memory.
- Under torchrun, local rank 0 of each node prepares the dataset while the other ranks wait on a barrier with a
  timeout of its own (`distributed.once_per_node`).
"""

import contextlib
import math
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from architecture import IGNORE_INDEX, Gemma3Model, ModelConfig
from architecture.config import REPO_ROOT, ConfigError, machine_memory
from architecture.hf_weights import hub_snapshot
from data.errors import UserError
from data.loader import BatchLoader
from data.meta import dataset_tokenizer
from data.prepare import DATA_ROOT, ensure_prepared
from data.tokenizer import Tokenizer, document_start, gpt2, tokenizer_from_record

from .checkpoint import (
    CheckpointError,
    check_tokenizer_fits,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    read_iter_num,
    save_checkpoint,
)
from .config import TrainingConfig, decay_start
from .device import DeviceError, allow_tf32, autocast_dtype, keep_freed_memory_for_reuse, select_device
from .distributed import (
    Distributed,
    join_process_group,
    once_per_node,
    rank_device,
    teardown_distributed,
    world_from_environment,
)
from .optimizer import Optimizer, build_optimizer, load_optimizer_state
from .run_dir import RunDirLock, check_out_dir, claim
from .run_logger import NullLogger, make_logger
from .schedule import learning_rate

EVAL_SEED = 1_000_003  # evaluation reads the same batches every time, whatever the training seed
RESUME_KEYS = ("training_config", "iter_num", "best_val_loss", "optimizer", "loader", "rng")  # a training state


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says what to do."""


def resolve_device(config: TrainingConfig) -> torch.device:
    try:
        return select_device(config.device)
    except DeviceError as e:
        hint = ""
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            hint = (
                ". The full 164.7M-parameter model does not train on a CPU in any useful time: run the demo, "
                "`python train.py --config config/demo.json` (a small model on the offline pystdlib corpus; its "
                "time on your CPU class: README, Quick start), or pass --device=cpu to run this config anyway"
            )
        raise ConfigError(f"{config.origin.source}: {e}{hint}") from None


@dataclass(frozen=True)
class ModelStart:
    """Where the run's model comes from, decided once from `init_from`."""

    kind: str  # "scratch" (a model config file), "resume" (out_dir/latest.pt) or "pretrained" (Hugging Face)
    model: Gemma3Model
    tokenizer: Tokenizer  # what the model speaks; from scratch GPT-2's, unless the dataset was prepared in another
    origin: str  # recorded in every checkpoint: the model config file, Hugging Face directory or hub id
    checkpoint: dict = field(default_factory=dict)  # resume: the training state to continue

    @property
    def resumes(self) -> bool:
        return self.kind == "resume"


def model_start(config: TrainingConfig) -> ModelStart:
    """The model to train and where it came from: a fresh one, out_dir/latest.pt, or a Hugging Face model."""
    if config.init_from == "resume":
        path = Path(config.out_dir) / "latest.pt"
        checkpoint = load_checkpoint(path)
        missing = [key for key in RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(
                f"{path} lacks {', '.join(missing)}: it holds a model but not a training state, so "
                "it can be sampled or exported, not resumed"
            )
        model, tokenizer = model_from_checkpoint(checkpoint, path), tokenizer_from_record(checkpoint.get("tokenizer"))
        check_tokenizer_fits(model, tokenizer, path)
        origin = checkpoint.get("model_origin", "")
        origin = config.model_config if origin == "scratch" else origin  # as checkpoints of early versions say
        return ModelStart("resume", model, tokenizer, origin, checkpoint)
    if config.init_from == "scratch":
        model = Gemma3Model(ModelConfig.from_json(REPO_ROOT / config.model_config))
        return ModelStart("scratch", model, gpt2(), config.model_config)
    directory = Path(config.init_from)
    if not directory.exists() and config.init_from.count("/") == 1:  # a hub id such as google/gemma-3-270m
        directory = hub_snapshot(config.init_from)
    if (directory / "config.json").is_file():
        return ModelStart("pretrained", *load_model(directory), config.init_from)
    raise ConfigError(
        f"{config.origin.source}: 'init_from' is '{config.init_from}'; use scratch, resume, a Hugging Face model "
        "directory (config.json, *.safetensors, tokenizer.json) or a hub id such as google/gemma-3-270m"
    )


class StopRequest:
    """Turns the first Ctrl-C, SIGTERM or SIGHUP (what Slurm, Kubernetes and a closed terminal send) into a request
    to stop at the end of the current iteration, after saving; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.requested = False
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: the user (or scheduler) means it
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        tqdm.write(f"{name}: finishing this iteration, saving a checkpoint, then stopping (again to abort)")

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def target_bytes(x: torch.Tensor, y: torch.Tensor, table: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """The UTF-8 bytes of text each target token stands for, by position: `table` (the tokenizer's `token_bytes()`
    on the device) gathered at the targets, 0 at ignored ones, less a dummy prefix's `▁` on the first piece of a
    document (the target that follows the token a document starts with)."""
    valid = y != IGNORE_INDEX
    counts = table[y.masked_fill(~valid, 0)] * valid
    if tokenizer.dummy_prefix:
        start = document_start(tokenizer.bos_id, tokenizer.eos_id)
        counts -= ((x == start) & (counts > 0)).long()
    return counts


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader_args: dict, eval_iters: int, autocast) -> dict:
    """Loss per split over `eval_iters` batches, in nats per token ("train", "val") and bits per byte ("train_bpb",
    "val_bpb"): both are sums over every evaluated target (nats / tokens, nats / (ln 2 x bytes)), not means of
    per-batch figures, so targets ignored by the loss count in neither. Fresh loaders with a fixed seed: every
    evaluation of a run (and of a resumed run) reads the same batches and the figures are comparable."""
    model.eval()
    tokenizer, device = loader_args["tokenizer"], loader_args["device"]
    table = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    losses = {}
    for split in ("train", "val"):
        loader = BatchLoader(split=split, seed=EVAL_SEED, **loader_args)
        nats = torch.zeros((), device=loader.device)
        tokens = torch.zeros((), dtype=torch.int64, device=loader.device)
        n_bytes = torch.zeros((), dtype=torch.int64, device=loader.device)
        for _ in range(eval_iters):
            x, y = loader.next_batch()
            with autocast:
                mean = model(x, y, return_logits=False)[1].float()  # over the targets that count
            batch_tokens = (y != IGNORE_INDEX).sum()
            nats += torch.where(batch_tokens > 0, mean * batch_tokens, 0.0)  # a batch with none has a NaN mean
            tokens += batch_tokens
            n_bytes += target_bytes(x, y, table, tokenizer).sum()
        losses[split] = (nats / tokens).item()
        losses[f"{split}_bpb"] = (nats / (math.log(2) * n_bytes)).item()
    model.train()
    return losses


@dataclass
class Run:
    """A training run between iterations. `state_dict()` is what a checkpoint holds; the fields after `world` are
    how this process runs it (device, wrapped model, precision), rebuilt at every start."""

    config: TrainingConfig
    model: Gemma3Model  # the unwrapped model: its weights, config and checkpoints
    tokenizer: Tokenizer
    optimizer: Optimizer
    train_loader: BatchLoader
    model_origin: str = ""  # the model config file, Hugging Face directory or hub id the run started from
    iter_num: int = 0  # optimizer updates done
    best_val_loss: float = math.inf
    best_iter: int | None = None  # where best_val_loss was reached
    best_val_bpb: float | None = None  # val bits per byte there (None in checkpoints written before it was measured)
    loss_ema: float | None = None  # running mean of the training loss, for the spike guard
    world: Distributed = field(default_factory=Distributed)
    device: torch.device = torch.device("cpu")
    step_model: torch.nn.Module | None = None  # what trains: compiled and/or DDP-wrapped
    eval_model: torch.nn.Module | None = None  # what evaluates: compiled, never DDP (no collectives on rank 0)
    autocast: Any = field(default_factory=contextlib.nullcontext)
    precision_note: str | None = None  # why bf16 was asked for and float32 runs
    local_accum: int = 1  # micro-batches per iteration in this process
    loader_args: dict = field(default_factory=dict)
    saved_iter: int | None = None  # the iteration of latest.pt on disk
    lock: RunDirLock | None = None  # rank 0's hold on out_dir

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    def state_dict(self) -> dict:
        """Tensors and plain values only (read back with torch.load(weights_only=True))."""
        return {
            "model": self.model.state_dict(),
            "model_config": self.model.config.to_dict(),
            "training_config": self.config.to_dict(),
            "tokenizer": self.tokenizer.record(),
            "model_origin": self.model_origin,
            "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss,
            "best_iter": self.best_iter,
            "best_val_bpb": self.best_val_bpb,
            "loss_ema": self.loss_ema,
            "optimizer": self.optimizer.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()},  # the batches have their own generator, in "loader"
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Continue where `checkpoint` stopped (the model's weights are loaded with the model itself)."""
        load_optimizer_state(self.optimizer, checkpoint["optimizer"])
        self.train_loader.load_state_dict(checkpoint["loader"])
        self.iter_num, self.best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        self.best_iter, self.loss_ema = checkpoint.get("best_iter"), checkpoint.get("loss_ema")
        self.best_val_bpb = checkpoint.get("best_val_bpb")
        self.saved_iter = self.iter_num
        torch.set_rng_state(checkpoint["rng"]["torch"])


def train(config: TrainingConfig) -> dict:
    """Run the training job described by `config`; returns the last evaluation's losses."""
    world = world_from_environment()
    device = rank_device(resolve_device(config), world)  # this process's device, chosen here once
    if device.type == "cpu" and config.threads:  # else torch's choice: OMP_NUM_THREADS, or one per core
        torch.set_num_threads(config.threads)
    join_process_group(world, device)
    try:
        return _train(config, device, world)
    finally:
        teardown_distributed(world)


def _train(config: TrainingConfig, device: torch.device, world: Distributed) -> dict:
    if world.is_master:  # before any work: a run needs an out_dir of its own, and a resume something to resume
        check_out_dir(config.out_dir, resume=config.init_from == "resume")
    run = setup_run(config, device, world)
    logger = NullLogger()  # until make_logger, which starts wandb: its failure, too, releases the lock below
    stop_request = StopRequest()
    losses, stopped = {}, False
    try:
        logger = make_logger(run)
        logger.start(run)
        while run.iter_num < config.max_iters:
            lr = set_learning_rate(run)
            loss, grad_norm, stopped = train_step(run, stop_request)
            if run.lock is not None:  # rank 0 writes only while the out_dir is still the one it locked
                run.lock.check()
            logger.iteration(run, loss, lr, grad_norm)
            if world.is_master and config.lr_schedule == "wsd" and run.iter_num == config.decay_start:
                save_checkpoint(run.state_dict(), run.out_dir / "pre_decay.pt")  # longer runs branch from here
            evaluates = run.iter_num % config.eval_interval == 0 or run.iter_num == config.max_iters
            if evaluates and world.is_master:
                losses = evaluate_and_checkpoint(run, logger, lr)
            if stopped:
                if world.is_master and not evaluates:  # an evaluation has just written latest.pt
                    save_checkpoint(run.state_dict(), run.out_dir / "latest.pt")
                break
        logger.summary(run, stopped)
    finally:
        logger.close()
        stop_request.restore()
        if run.lock is not None:
            run.lock.release()
    return losses


def check_batch_fits(config: TrainingConfig, model: ModelConfig) -> None:
    """Refuse a micro-batch that could never fit in this machine's memory, before the loader gathers it (a batch_size
    of 10**8 spent many minutes gathering rows, only to run out of memory then). The bound is a floor: the backward
    keeps at least each layer's input, batch_size x block_size x emb_dim values, 2 bytes each even in bf16."""
    needed, memory = 2 * config.batch_size * config.block_size * model.emb_dim * model.n_layers, machine_memory()
    if needed > memory:
        raise ConfigError(
            f"{config.where('batch_size', 'block_size')}: 'batch_size' {config.batch_size:,} x 'block_size' "
            f"{config.block_size:,} tokens per micro-batch need at least {needed / 2**30:,.0f} GiB for what the "
            f"backward keeps of the model's {model.n_layers} layers, and this machine has "
            f"{memory / 2**30:,.0f} GiB; lower batch_size, raising gradient_accumulation_steps to keep the "
            "tokens per iteration"
        )


def setup_run(config: TrainingConfig, device: torch.device, world: Distributed) -> Run:
    """The model, its tokenizer and data, the optimizer and the precision; restored from latest.pt on resume."""
    if config.gradient_accumulation_steps % world.world_size:
        raise ConfigError(
            f"{config.origin.source}: 'gradient_accumulation_steps' ({config.gradient_accumulation_steps}) must be "
            f"divisible by the number of processes ({world.world_size}) so the global batch stays the same"
        )
    torch.manual_seed(config.seed)
    start = model_start(config)
    if start.resumes:
        for note in check_resume(config, start.model, start.checkpoint):
            if world.is_master:
                tqdm.write(f"note: {note}")
    if config.block_size > start.model.config.context_length:
        raise ConfigError(
            f"{config.where('block_size')}: 'block_size' ({config.block_size}) exceeds the model's "
            f"context_length ({start.model.config.context_length})"
        )
    check_batch_fits(config, start.model.config)
    tokenizer = prepare_data(config, world, start)
    loader_args = dict(
        data_dir=DATA_ROOT / config.dataset,
        batch_size=config.batch_size,
        block_size=config.block_size,
        device=device,
        tokenizer=tokenizer,
        rows=config.batch_rows,  # evaluation's too, so that its losses are on the rows trained on
    )
    train_loader = BatchLoader(
        split="train", seed=config.seed, rank=world.rank, world_size=world.world_size, **loader_args
    )
    val_loader = BatchLoader(split="val", **loader_args)  # a val split too short for a block fails now, not later
    if config.batch_rows == "conversation" and world.is_master:
        for loader in (train_loader, val_loader):
            tqdm.write(f"note: {conversation_note(loader)}")

    model = start.model
    autocast, precision_note = place_model(model, config, device)
    run = Run(
        config,
        model,
        tokenizer,
        build_optimizer(model, config, device.type),
        train_loader,
        start.origin,
        world=world,
        device=device,
        autocast=autocast,
        precision_note=precision_note,
        loader_args=loader_args,
        local_accum=config.gradient_accumulation_steps // world.world_size,
    )
    if start.resumes:
        run.load_state_dict(start.checkpoint)
    if world.is_master:  # one run per out_dir, from here to the end of the process
        run.lock = claim(run.out_dir, resume=start.resumes, overwrite=config.overwrite)
        if start.resumes:
            make_best_consistent(run)
    run.step_model, run.eval_model = training_models(model, config.compile, world, device)
    return run


def conversation_note(loader: BatchLoader) -> str:
    """How a split's conversations fill the rows: how many are dropped as too long, how much of a row is padding."""
    kept, rows = loader.conversation_lengths, loader.block_size + 1
    dropped = f", {loader.dropped:,} longer than block_size + 1 = {rows} tokens left out" if loader.dropped else ""
    return (
        f"{loader.split}: {loader.conversation_count:,} conversations{dropped}; {kept.mean():,.0f} tokens on "
        f"average, so about {1 - kept.mean() / rows:.0%} of a row is padding"
    )


def prepare_data(config: TrainingConfig, world: Distributed, start: ModelStart) -> Tokenizer:
    """Prepare the dataset once per node, in the model's tokenizer; return the tokenizer the run speaks. A model
    trained from scratch speaks its dataset's; any other must be the dataset's (the loader checks)."""
    once_per_node(
        world,
        lambda: ensure_prepared(config.dataset, start.tokenizer),
        what=f"prepare dataset {config.dataset}",
        fix=f"prepare it before torchrun: python data/prepare.py {config.dataset}",
    )
    if start.kind != "scratch":
        return start.tokenizer
    tokenizer = dataset_tokenizer(DATA_ROOT / config.dataset)
    check_tokenizer_fits(start.model, tokenizer, config.model_config)
    return tokenizer


def place_model(model: Gemma3Model, config: TrainingConfig, device: torch.device) -> tuple[Any, str | None]:
    """Move `model` to `device` with the run's attention settings; return its autocast context and, when bf16 was
    asked for and float32 runs, why. Float32 master weights; bf16 autocast where the hardware has bf16."""
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    model.to(device)
    model.activation_checkpointing = config.activation_checkpointing
    model.attention_backend = config.attention_backend
    dtype, precision_note = autocast_dtype(device, config.dtype)
    allow_tf32(device)
    return (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()), precision_note


def training_models(
    model: Gemma3Model, compile: bool, world: Distributed, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(what trains, what evaluates): compiled if asked; what trains is DDP-wrapped under torchrun, what evaluates
    never is (rank 0 evaluates alone). DDP goes inside torch.compile, not around it: dynamo then cuts the graph at
    DDP's gradient buckets, so each bucket's all-reduce starts while the backward of earlier layers goes on. A
    compiled module inside DDP has one backward whose gradients all arrive at its end, too late to overlap."""
    eval_model = torch.compile(model) if compile else model
    if not world.enabled:
        return eval_model, eval_model
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return (torch.compile(ddp) if compile else ddp), eval_model


def set_learning_rate(run: Run) -> float:
    """Set each parameter group's lr from its own peak; return learning_rate's (the one logged)."""
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.iter_num, run.config, group["peak_lr"])
    return learning_rate(run.iter_num, run.config)


def train_step(run: Run, stop_request: StopRequest) -> tuple[float, torch.Tensor, bool]:
    """One optimizer update over the iteration's micro-batches; returns the mean loss, the gradients' global norm
    before clipping (a tensor: reading it waits for the device, so only the logged iterations do) and whether any
    rank asked to stop."""
    model, loader, world = run.step_model, run.train_loader, run.world
    nats, targets = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    x, y = loader.next_batch()
    for micro_step in range(run.local_accum):
        last = micro_step == run.local_accum - 1
        # DDP all-reduces gradients on the last micro-step only; no_sync's context can be entered once.
        with model.no_sync() if world.enabled and not last else contextlib.nullcontext():
            with run.autocast:
                loss = model(x, y, return_logits=False, reduction="sum")[1]
            targets += (y != IGNORE_INDEX).sum()
            if not last:  # prefetch within the iteration only: checkpoints stay at its boundary
                x, y = loader.next_batch()
            loss.backward()
        nats += loss.detach()

    # One small all-reduce carries the summed loss, the targets it was summed over and any rank's stop request.
    status = torch.stack([nats, targets, torch.tensor(float(stop_request.requested), device=run.device)])
    if world.enabled:
        dist.all_reduce(status)
    total_nats, total_targets, stops = status.tolist()
    loss_value, stop = total_nats / total_targets, stops > 0
    check_loss(run, loss_value)
    # The gradients are of summed losses, averaged over ranks by DDP: this makes them the mean over every target of
    # the iteration, so that micro-batches and ranks whose rows hold different numbers of targets (conversations)
    # update the model as one big batch would.
    torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], world.world_size / total_targets)
    # With grad_clip 0 the norm is still measured: an infinite bound scales every gradient by exactly 1.
    max_norm = run.config.grad_clip if run.config.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    return loss_value, grad_norm, stop


def evaluate_and_checkpoint(run: Run, logger: NullLogger, lr: float) -> dict:
    """Evaluate, then write latest.pt, and best.pt when val loss improved (rank 0 only)."""
    losses = evaluate(run.eval_model, run.loader_args, run.config.eval_iters, run.autocast)
    if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
        raise TrainingError(diverged_message(run, f"evaluation losses are {losses} at iteration {run.iter_num}"))
    improved = losses["val"] < run.best_val_loss
    if improved:
        run.best_val_loss, run.best_val_bpb, run.best_iter = losses["val"], losses["val_bpb"], run.iter_num
    logger.evaluation(run, losses, lr, improved)
    run.lock.check()  # the evaluation took a while: the out_dir may have been removed meanwhile
    state = run.state_dict()
    save_checkpoint(state, run.out_dir / "latest.pt")
    run.saved_iter = run.iter_num
    if improved:
        save_checkpoint(state, run.out_dir / "best.pt")
    return losses


SPIKE_RATIO, SPIKE_NATS, EMA_DECAY = 3.0, 2.0, 0.9


def check_loss(run: Run, loss: float) -> None:
    """Stop before the optimizer step on a non-finite loss, or on a spike: a loss more than SPIKE_RATIO times and
    SPIKE_NATS above the running mean of the previous iterations' losses (an exponential mean, decay EMA_DECAY).
    Ordinary noise, even early in a run, stays far below both; a run blowing up crosses them at once."""
    iteration, ema = run.iter_num + 1, run.loss_ema
    if not math.isfinite(loss):
        raise TrainingError(diverged_message(run, f"the loss is {loss} at iteration {iteration}"))
    if ema is not None and loss > SPIKE_RATIO * ema and loss > ema + SPIKE_NATS:
        raise TrainingError(
            diverged_message(
                run, f"the loss spiked to {loss:.4g} at iteration {iteration}, against a running mean of {ema:.4g}"
            )
        )
    run.loss_ema = loss if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * loss


def diverged_message(run: Run, what: str) -> str:
    if run.saved_iter is None:
        good = "no checkpoint was written before it"
    else:
        good = f"the last good checkpoint is {run.out_dir / 'latest.pt'} (iteration {run.saved_iter})"
    return f"{what}: training diverged and stopped without saving; {good}. Lower learning_rate or check the data"


# The settings that shape every update after the resume: changed, the run is no longer the one the checkpoint began.
# (max_iters is not among them: raising it is how a run is extended, and check_resume notes how that bends the
# cosine schedule, or refuses it under wsd once the decay has begun; the optimizer and the batch shape have checks of
# their own.)
RECIPE = (
    "learning_rate",
    "min_lr",
    "warmup_steps",
    "lr_schedule",
    "decay_fraction",
    "decay_shape",
    "weight_decay",
    "betas",
    "muon_lr",
    "muon_weight_decay",
    "grad_clip",
    "seed",
    "dtype",
    "batch_rows",
)
BEFORE_SETTING = {"batch_rows": "random", "lr_schedule": "cosine"}  # how checkpoints from before a setting ran


def check_resume(config: TrainingConfig, model: Gemma3Model, checkpoint: dict) -> list[str]:
    """Refuse a resume whose settings differ from the checkpoint's where that would silently change the run, unless
    allowed; return notes on what an allowed change, or a new max_iters, does to the run."""
    previous, where = checkpoint["training_config"], Path(config.out_dir) / "latest.pt"
    if config.max_iters <= checkpoint["iter_num"]:
        raise ConfigError(
            f"{where} is at iteration {checkpoint['iter_num']} and max_iters is {config.max_iters}: "
            "nothing to train; raise --max_iters to continue"
        )
    if config.dataset != previous["dataset"]:
        raise ConfigError(
            f"{where} trained on dataset '{previous['dataset']}', this run names '{config.dataset}'; "
            f"resume with --dataset={previous['dataset']}, or start a new run"
        )
    optimizer = previous.get("optimizer", "adamw")  # checkpoints from before the setting existed used AdamW
    if config.optimizer != optimizer:
        raise ConfigError(
            f"{where} was trained with optimizer {optimizer}, this run names {config.optimizer}; its state would "
            f"not carry over: resume with --optimizer={optimizer}, or start a new run"
        )
    origin = checkpoint.get("model_origin", "")
    if origin.endswith(".json"):  # a model config file: it must still describe the checkpoint's model
        if config.model_config != origin:
            raise ConfigError(
                f"{where} is a model of {origin}, this run names model_config {config.model_config}; "
                f"resume with --model_config={origin}"
            )
        now, saved = ModelConfig.from_json(REPO_ROOT / origin).to_dict(), model.config.to_dict()
        changed = [f"{k} {saved[k]} -> {v}" for k, v in now.items() if saved[k] != v]
        if changed:
            raise ConfigError(
                f"{origin} changed since {where} was written ({', '.join(changed)}); restore it, or "
                "start a new run with another out_dir"
            )
    shape = ("batch_size", "block_size", "gradient_accumulation_steps")
    changed = [f"{k} {previous[k]} -> {getattr(config, k)}" for k in shape if previous[k] != getattr(config, k)]
    if changed and not config.allow_batch_change:
        raise ConfigError(
            f"{where} trained with other batches ({', '.join(changed)}), so the resume would not be "
            "exact; pass --allow_batch_change=true to go on anyway"
        )
    # Settings of a checkpoint from before one existed are taken as unchanged, except where it ran otherwise.
    before = {k: previous.get(k, BEFORE_SETTING.get(k, getattr(config, k))) for k in RECIPE}
    changed = [f"{k} {before[k]} -> {getattr(config, k)}" for k in RECIPE if before[k] != getattr(config, k)]
    if changed and not config.allow_recipe_change:
        raise ConfigError(
            f"{where} trained with another recipe ({', '.join(changed)}), so the resume would not continue the "
            "same run; resume with its values, or pass --allow_recipe_change=true to change them on purpose"
        )
    notes = [f"resuming with another recipe on purpose: {', '.join(changed)}"] if changed else []
    if config.max_iters != previous["max_iters"]:
        notes.append(max_iters_note(config, previous, checkpoint["iter_num"], where))
    return notes


def max_iters_note(config: TrainingConfig, previous: dict, iter_num: int, where: Path) -> str:
    """What a new max_iters does to a resumed run. Under wsd, before the old and the new decay's start, nothing:
    every update done had the peak lr under both, so the run is the one a straight run to the new max_iters is.
    Past either start it would reshape a decay already begun: refused unless allowed."""
    change = f"max_iters {previous['max_iters']} -> {config.max_iters}"
    if config.lr_schedule != "wsd":
        return (
            f"{change}: the cosine decay now ends at iteration {config.max_iters}, so the learning rate from "
            f"iteration {iter_num} on follows the new curve"
        )
    start = decay_start(previous["max_iters"], previous.get("decay_fraction", config.decay_fraction))
    decay = f"the wsd decay starts at iteration {config.decay_start} (was {start})"
    if iter_num <= min(start, config.decay_start):
        return f"{change}: {decay}; the {iter_num} iterations done all came before it, so nothing done changes"
    if not config.allow_recipe_change:
        raise ConfigError(
            f"{where} is at iteration {iter_num}, and with {change} {decay}: the change would reshape a decay "
            f"already begun; branch a longer run from {where.with_name('pre_decay.pt')} (README, Training), or "
            "pass --allow_recipe_change=true to change it anyway"
        )
    return f"{change}: {decay}, so the learning rate from iteration {iter_num} on follows the new curve"


def make_best_consistent(run: Run) -> None:
    """After a crash between the latest.pt and best.pt writes, best.pt is stale or missing: restore it from
    latest.pt when that is the best, else forget the lost best so the next improvement writes a new one."""
    best = run.out_dir / "best.pt"
    if run.best_iter is None or (best.is_file() and read_iter_num(best) == run.best_iter):
        return
    if run.best_iter == run.iter_num:
        tmp = best.with_name(f"best.pt.{os.getpid()}.tmp")
        shutil.copyfile(run.out_dir / "latest.pt", tmp)
        os.replace(tmp, best)
        tqdm.write(f"note: {best} was stale or missing; restored from latest.pt (iteration {run.iter_num})")
    else:
        tqdm.write(
            f"note: {best} (iteration {run.best_iter}) is missing or stale; the next evaluation that improves "
            "on the val loss writes a new one"
        )
        run.best_val_loss, run.best_val_bpb, run.best_iter = math.inf, None, None
