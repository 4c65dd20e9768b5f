"""Data-parallel training under ``torchrun``: the process group from the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), gloo on the CPU and NCCL on CUDA, and the few
collectives the training loop needs. Without torchrun everything is a single process (rank 0 of 1)."""

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module started the process group (and ends it)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1


def launched_by_torchrun():
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device=None):
    """The process's Context; starts the process group when launched by torchrun with more than one
    process. ``device``: "cpu", "cuda" or None (CUDA when available)."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError("--device cuda: CUDA is not available on this machine")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Context(device=torch.device(want))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if want.startswith("cuda"):
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
        owns = True
    return Context(rank=rank, world=world, local_rank=local, device=dev, owns_group=owns)


def teardown(ctx, clean=True):
    """End the process group this module started. ``clean``: every rank got here normally, so they meet
    at a barrier first: a rank that destroys its gloo group while a peer is still working (rank 0
    writing the run's files) can abort in gloo's threads ("terminate called without an active
    exception"). After an error no barrier is tried (the peer may never arrive)."""
    if ctx.owns_group and dist.is_initialized():
        if clean and ctx.distributed:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(ctx, values):
    """Sum a list of floats over the processes (one collective)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(ctx, obj):
    """Rank 0's ``obj`` on every process."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
