"""Multi-process set-up for `torchrun`: one process per GPU (nccl) or per CPU worker (gloo).

Only what the loop needs: who am I (rank, world size, local rank), is this the master (logs, evaluates, writes
checkpoints), which device is mine, one-time work done by one process per node while the others wait, and a clean
shutdown. Without torchrun's environment it is a single process of rank 0.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from data.errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


class DistributedError(UserError, RuntimeError):
    """A rank waited too long for another; the message says what to do."""


def world_from_environment() -> Distributed:
    """This process's place in the job torchrun describes in RANK / LOCAL_RANK / WORLD_SIZE (one process without)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def join_process_group(world: Distributed, device: torch.device) -> None:
    """Join the job's process group from `device`, this rank's (`rank_device`): NCCL on CUDA, gloo elsewhere."""
    if not world.enabled:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def teardown_distributed(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, world: Distributed) -> torch.device:
    """This process's device: under DDP on CUDA, the GPU of its local rank; otherwise `device` as it is."""
    if world.enabled and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


# How long the other ranks wait for a node's one-time work (a first TinyStories download and tokenization can take
# longer than NCCL's 10-minute default, which would kill a first `torchrun` on a fresh machine).
NODE_WORK_TIMEOUT = timedelta(hours=2)


def once_per_node(
    world: Distributed, work: Callable[[], object], what: str, fix: str, timeout: timedelta = NODE_WORK_TIMEOUT
) -> None:
    """Run `work` on local rank 0 of each node (a node's disk may be its own; on a shared one, `work` must be safe
    to run concurrently) while every other rank waits at a barrier of a gloo group with its own `timeout`, so the
    training collectives keep their short default. `what` and `fix` complete the timeout's message: "rank 1 waited
    7200 s for local rank 0 to {what}; {fix}"."""
    group = dist.new_group(backend="gloo", timeout=timeout) if world.enabled else None
    if world.local_rank == 0:
        work()
    if group is None:
        return
    try:
        dist.barrier(group=group)
    except RuntimeError as e:  # gloo's timeout (DistBackendError is a RuntimeError)
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise DistributedError(
            f"rank {world.rank} waited {timeout.total_seconds():.0f} s for local rank 0 to {what}; {fix}"
        ) from None
    finally:
        dist.destroy_process_group(group)
