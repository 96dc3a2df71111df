"""One process per device, as torchrun starts them: which rank this is, which device is its own,
and the few collectives that `distill` needs.

torchrun (and srun through torchrun) sets RANK / WORLD_SIZE / LOCAL_RANK; then the process group
is initialised with NCCL on GPUs and gloo on CPUs, and each rank is pinned to `cuda:LOCAL_RANK`.
Without those variables the process is alone: no process group is created and every collective
below is the identity, so a single-device run behaves exactly as it did before distributed
training existed.

Collectives carry a timeout (`init_process_group(timeout=...)`): a rank that dies makes the
others fail instead of waiting forever, and torchrun then ends the whole job with a non-zero exit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ddk_cache.devices import resolve_device
from ddk_cache.errors import DDKCacheError

T = TypeVar("T")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the job. A lone process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def init_parallel(device_flag: str = "auto", timeout_s: float = 600.0) -> ParallelContext:
    """Join the job torchrun started (or stay alone) and pin this rank to its device."""
    if not launched_by_torchrun():
        return ParallelContext(device=resolve_device(device_flag))
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in LAUNCH_VARIABLES)
    except ValueError:
        raise DDKCacheError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (got {[os.environ[n] for n in LAUNCH_VARIABLES]}): launch with torchrun") from None
    if not 0 <= rank < world_size:
        raise DDKCacheError(f"RANK {rank} is outside WORLD_SIZE {world_size}: launch with torchrun")
    device = resolve_device(device_flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: ParallelContext, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (float64 sums stay exact enough to be rank-count independent)."""
    if not ctx.distributed:
        return values
    on_device = values.to(ctx.device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    return on_device.to(values.device)


def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_from_main(ctx: ParallelContext, value: T) -> T:
    """Rank 0's value on every rank (a decision only one rank may take, e.g. which checkpoint)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(ctx: ParallelContext, step: Callable[[], T]) -> T:
    """Run `step` on every rank; if it fails on any rank, fail on all of them with that rank's message.

    Without this, a rank that cannot (say) open the store would exit while the others wait in the
    next collective until the timeout. Every rank raises the same `DDKCacheError`, so rank 0 prints
    one line and every rank exits 2. Other exceptions are bugs: the failing rank keeps its traceback.
    """
    result, error, unexpected = None, None, None
    try:
        result = step()
    except DDKCacheError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - told to the other ranks, then re-raised here
        error, unexpected = f"{type(exc).__name__}: {exc}".splitlines()[0], exc
    if ctx.distributed:
        errors: list[str | None] = [None] * ctx.world_size
        dist.all_gather_object(errors, error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message]
        if failed and unexpected is None:
            rank, message = failed[0]
            raise DDKCacheError(message if rank == ctx.rank or ctx.world_size == 1 else f"rank {rank}: {message}")
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise DDKCacheError(error)
    return result  # type: ignore[return-value]
