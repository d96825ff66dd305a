"""Multi-process set-up for `torchrun`: one process per GPU (nccl) or per CPU worker (gloo).

Only what the loop needs: who am I (rank, world size, local rank), is this the master (logs, evaluates, writes
checkpoints), and a clean shutdown. Without torchrun's environment it is a single process of rank 0.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def setup_distributed(device_type: str) -> Distributed:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, if any."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def teardown_distributed(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
