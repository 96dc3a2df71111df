"""Data parallelism for the student with PyTorch's own engines: DDP, or FSDP2 (`fully_shard`).

- `ddp`: every rank holds the whole student and optimizer; gradients are averaged after each
  optimizer step's last micro-batch. Fastest when the student, its gradients and AdamW's two
  moments (16 bytes per parameter in float32) fit one device.
- `fsdp`: FSDP2 shards parameters, gradients and optimizer state over the ranks, as torchtitan
  does: `fully_shard` on every decoder layer, then on the root (embeddings, final norm, head).
  On GPU parameters are gathered in bf16 and gradients reduced in float32
  (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the sharded master weights stay
  float32. For students whose weights plus optimizer state do not fit one device.

Either way the model's state dict has the plain module's keys (`torch.distributed.checkpoint`'s
`get_state_dict` strips wrappers), so a checkpoint taken under one mode resumes under the other,
and at another world size.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, ContextManager

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ddk_cache.choices import ParallelMode, parse_choice, values
from ddk_cache.errors import DDKCacheError
from ddk_cache.ranges import POSITIVE, Range, check_ranges
from ddk_cache.training.distributed import ParallelContext

PARALLEL_MODES = values(ParallelMode)


def resolve_parallel_mode(mode: str, ctx: ParallelContext) -> str:
    """`auto`: DDP when torchrun started several ranks, none for a lone process."""
    if mode not in PARALLEL_MODES:
        raise DDKCacheError(f"unknown --parallel {mode!r}: choose {', '.join(PARALLEL_MODES)}")
    if mode == "auto":
        return "ddp" if ctx.distributed else "none"
    if mode != "none" and not ctx.distributed:
        raise DDKCacheError(f"--parallel {mode} needs one process per device: launch with torchrun (see README, Multi-GPU and multi-node training)")
    if mode == "none" and ctx.world_size > 1:
        raise DDKCacheError(f"--parallel none with {ctx.world_size} ranks would train {ctx.world_size} unrelated students: use ddp or fsdp")
    return mode


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found the way HF itself marks them (`_no_split_modules`)."""
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in block_names]
    if not layers:
        raise DDKCacheError(
            f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules): use --parallel ddp for this student"
        )
    return layers


def parallelize(model: torch.nn.Module, mode: str, ctx: ParallelContext) -> torch.nn.Module:
    """The model wrapped for `mode` ('none', 'ddp', 'fsdp'), already on this rank's device."""
    if mode == "none":
        return model.to(ctx.device)
    if mode == "ddp":
        model.to(ctx.device)
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if ctx.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:  # CPU: bf16 matmuls are slow there; train in float32 as the single-process path does
        policy = MixedPrecisionPolicy()
    # no model.to(device) first: each fully_shard call moves only its own module's tensors to the device
    # and shards them there, so a GPU holds the shards plus one whole layer at a time, never the whole student
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DDP wrapper (FSDP2 changes the module in place: nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: torch.nn.Module, last_micro_batch: bool) -> ContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
    return nullcontext()


def reshard(model: torch.nn.Module) -> None:
    """Free FSDP2's gathered parameters after forwards without a backward (evaluation).

    The root module keeps its parameters (embeddings, head) gathered after a forward, expecting the
    backward; after an evaluation none comes, so they would stay whole until the next step.
    """
    if isinstance(model, FSDPModule):
        model.reshard()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` over all ranks' gradients; returns the total norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor reduced over the shards
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole student's weights on CPU (gathered from the shards under FSDP), for save_pretrained.

    Every rank must call it (it gathers); only rank 0 receives tensors under FSDP.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def uses_autocast(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU without FSDP (FSDP2's mixed-precision policy casts instead); none on CPU."""
    return torch.bfloat16 if device.type == "cuda" and mode != "fsdp" else None


@dataclass(frozen=True)
class ParallelSettings:
    """How the student is spread over the ranks torchrun started, on which device, and how long a collective waits."""

    mode: ParallelMode = ParallelMode.auto
    device: str = "auto"
    dist_timeout: float = 600.0  # seconds a collective may wait for a rank before the job fails

    RANGES: ClassVar[dict[str, Range]] = {"dist_timeout": POSITIVE}

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_choice(ParallelMode, self.mode, "--parallel"))
        check_ranges({"dist_timeout": self.dist_timeout}, self.RANGES)
