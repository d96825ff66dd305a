"""Multi-process logic without GPUs: each rank's device, the once-per-node barrier and its timeout (two real gloo
processes), and how the trainer wraps the model for DDP and torch.compile (a real gloo group; the CUDA branch with
the device faked, since DDP cannot be built on a CUDA device here)."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_reference import tiny_config
from torch.nn.parallel import DistributedDataParallel

from architecture import Gemma3Model
from training import trainer
from training.distributed import Distributed, DistributedError, once_per_node, rank_device


def test_each_rank_takes_the_gpu_of_its_local_rank():
    rank_3_of_8 = Distributed(rank=11, local_rank=3, world_size=16)  # the second node's fourth GPU
    assert rank_device(torch.device("cuda"), rank_3_of_8) == torch.device("cuda", 3)
    assert rank_device(torch.device("cpu"), rank_3_of_8) == torch.device("cpu")
    assert rank_device(torch.device("cuda", 1), Distributed()) == torch.device("cuda", 1)  # one process: as asked


def once_per_node_worker(rank: int, port: int, work_seconds: float, out_dir: str) -> None:
    """Two ranks on one node: local rank 0 works for `work_seconds`, the barrier times out after 2 s."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world, marker = Distributed(rank, rank, 2), os.path.join(out_dir, "prepared")
    try:
        once_per_node(
            world,
            lambda: (time.sleep(work_seconds), open(marker, "w").close()),
            "prepare dataset x",
            "prepare it before torchrun",
            timeout=timedelta(seconds=2),
        )
        result = f"ok, prepared: {os.path.exists(marker)}"
    except DistributedError as e:
        result = f"error: {e}"
    except RuntimeError:  # rank 0 after the other rank gave up: its barrier's peer is gone
        result = "peer gone"
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write(result)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("work_seconds, port", [(0.5, 29741), (4.0, 29742)], ids=["in-time", "too-slow"])
def test_other_ranks_wait_for_the_node_work_then_give_up_in_one_line(tmp_path, work_seconds, port):
    mp.spawn(once_per_node_worker, args=(port, work_seconds, str(tmp_path)), nprocs=2)
    waiting_rank = (tmp_path / "rank1").read_text()
    if work_seconds < 2:
        assert waiting_rank == "ok, prepared: True"  # it left the barrier after the work was done, not before
    else:
        assert waiting_rank == (
            "error: rank 1 waited 2 s for local rank 0 to prepare dataset x; prepare it before torchrun"
        )


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group, enough to build a real DistributedDataParallel on the CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("compile", [False, True])
def test_ddp_goes_inside_compile_and_evaluation_is_never_ddp(gloo_group, compile):
    model = Gemma3Model(tiny_config())
    world = Distributed(rank=0, local_rank=0, world_size=2)
    step_model, eval_model = trainer.training_models(model, compile, world, torch.device("cpu"))
    ddp = step_model._orig_mod if compile else step_model
    assert isinstance(ddp, DistributedDataParallel) and ddp.module is model and ddp.device_ids is None
    assert not isinstance(getattr(eval_model, "_orig_mod", eval_model), DistributedDataParallel)
    assert getattr(eval_model, "_orig_mod", eval_model) is model
    assert hasattr(step_model, "no_sync")  # the loop's gradient accumulation reaches DDP through the compiled wrapper
    single = trainer.training_models(model, compile, Distributed(), torch.device("cpu"))
    assert single[0] is single[1] and getattr(single[0], "_orig_mod", single[0]) is model


def test_ddp_on_cuda_is_given_the_rank_device(monkeypatch):
    built = {}
    monkeypatch.setattr(trainer, "DistributedDataParallel", lambda module, device_ids: built.update(ids=device_ids))
    world = Distributed(rank=5, local_rank=1, world_size=8)
    trainer.training_models(Gemma3Model(tiny_config()), False, world, rank_device(torch.device("cuda"), world))
    assert built["ids"] == [1]
