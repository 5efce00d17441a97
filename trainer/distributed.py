"""Process-group setup from torchrun's environment, and the few rank helpers the trainer needs.

Everything comes from the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT,
TORCHELASTIC_RESTART_COUNT); a plain ``python -m trainer.train`` is a world of one with no process group.
Two lessons are built in: the store is prefixed per restart, because a gloo group re-created after torchrun
restarts its workers otherwise meets the previous round's keys and hangs or fails at random; and the group is
left only once the model, its DDP wrapper and the optimizer are gone (``shutdown``), which avoids a rare SIGABRT
at exit.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0
    backend: str | None = None  # None: single process, no group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes shared outputs (checkpoints, metrics, plots)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from exc


def init_distributed(timeout_minutes: float = 30.0, use_cuda: bool | None = None) -> DistEnv:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    world_size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world = _int_env("LOCAL_WORLD_SIZE", 1)
    restart = _int_env("TORCHELASTIC_RESTART_COUNT", 0)
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(0, 1, 0, 1, restart, None, device)

    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), _int_env("MASTER_PORT", 29500)
    # Under torchrun the elastic agent hosts the store; a hand-started group has rank 0 host it.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    base = dist.TCPStore(host, port, world_size=None if agent_hosts else world_size,
                         is_master=rank == 0 and not agent_hosts, timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore(f"detection-trainer/restart-{restart}", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    log.info("joined process group: rank %d of %d (local %d of %d), backend %s, device %s, restart %d",
             rank, world_size, local_rank, local_world, backend, device, restart)
    return DistEnv(rank, world_size, local_rank, local_world, restart, backend, device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_objects(env: DistEnv, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    if not env.distributed:
        return [value]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def any_rank(env: DistEnv, *flags: bool) -> list[bool]:
    """Each flag OR-ed over every rank (one tiny all-reduce, on the rank's device for NCCL): how ranks agree on a
    decision one of them made (its clock, a signal it received, rank 0's lease)."""
    values = torch.tensor([float(flag) for flag in flags], device=env.device)
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def broadcast_object(env: DistEnv, value: Any, src: int = 0) -> Any:
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown(env: DistEnv) -> None:
    """Leave the process group. Call it after the last reference to the DDP wrapper, model and optimizer is
    dropped (a function that held them has returned): gloo work they still held when the interpreter tore them
    down could abort a rank that had finished (SIGABRT, "terminate called without an active exception"), and
    torchrun then reported a successful run as failed."""
    gc.collect()  # DDP's reducer sits in reference cycles: free it now, while the interpreter is whole
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
