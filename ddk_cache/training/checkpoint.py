"""One checkpointer that receives every state of a training run, as torchtitan's does.

Every stateful piece of `distill` speaks `state_dict()` / `load_state_dict()`: the model and its
optimizer, the LR schedule, the domain sampler, the data cursors and the train state (step,
first evaluation). The checkpointer saves them together with `torch.distributed.checkpoint`
(DCP): each rank writes its own shard files in parallel, and the model/optimizer tensors are
stored as global tensors with their layout, so a checkpoint taken by N ranks under DDP or FSDP2
loads on M ranks under either (DCP reshards on load). The non-tensor states are global (equal
on every rank) and stored once, pickled.

Atomic: DCP writes `.metadata` last, after every rank has written its files, through a
temporary name and a rename. A checkpoint folder without it is a save that a kill interrupted;
it is never taken as whole and is removed on the next save. `--out` must be a folder every rank
sees (shared disk), like torchtitan's checkpoint folder.

The checkpointer also owns the run's identity (a resumed run must use the same settings). The metrics
log truncates itself to the checkpoint's step on resume (`metrics_log.py`), so its lines after that step are rewritten.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ddk_cache.errors import DDKCacheError, SettingError
from ddk_cache.ranges import NON_NEGATIVE, Range, check_ranges
from ddk_cache.training.distributed import ParallelContext, barrier, broadcast_from_main

CHECKPOINT_DIR = "checkpoints"
METADATA_FILE = ".metadata"  # written last by DCP: its presence marks a whole checkpoint
RUN_KEY = "run"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelAndOptimizer:
    """Model and optimizer state as DCP wants them: plain FQN keys, sharded tensors kept sharded."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class Pickled:
    """A non-tensor state stored as one pickled value, so its shape may change between saves."""

    def __init__(self, component: Stateful) -> None:
        self.component = component

    def state_dict(self) -> dict[str, Any]:
        return {"pickle": pickle.dumps(self.component.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.component.load_state_dict(pickle.loads(state["pickle"]))


class RunIdentity:
    """The settings a resumed run must share with the run that wrote the checkpoint."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings, self.saved = settings, None

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.settings, sort_keys=True, default=str)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = json.loads(state["json"])


class Checkpointer:
    """Saves and restores every state of a run under `<out>/checkpoints/step-NNNNNNNN`."""

    def __init__(self, out: Path, states: dict[str, Any], settings: dict[str, Any], ctx: ParallelContext, keep: int = 1) -> None:
        self.folder, self.ctx, self.keep = out / CHECKPOINT_DIR, ctx, keep
        self.identity = RunIdentity(settings)
        self.states = {name: state if isinstance(state, ModelAndOptimizer) else Pickled(state) for name, state in states.items()}

    def latest_step(self) -> int | None:
        """The step of the newest whole checkpoint, as rank 0 sees it (every rank loads that one)."""
        return broadcast_from_main(self.ctx, _latest_complete(self.folder) if self.ctx.is_main else None)

    def load(self, step: int) -> None:
        """Restore every state from the checkpoint of `step`, refusing a run with other settings."""
        path = self._path(step)
        with _single_process_is_intended():
            dcp.load({RUN_KEY: self.identity}, checkpoint_id=str(path), no_dist=not self.ctx.distributed)
            _check_same_run(self.identity.saved or {}, json.loads(self.identity.state_dict()["json"]), self.folder.parent)
            dcp.load(dict(self.states), checkpoint_id=str(path), no_dist=not self.ctx.distributed)

    def save(self, step: int) -> None:
        """Write a whole checkpoint of every state (all ranks take part), then drop older ones."""
        path = self._path(step)
        if self.ctx.is_main:
            if path.exists():  # a save of this step that a kill interrupted
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier(self.ctx)
        with _single_process_is_intended():
            dcp.save({RUN_KEY: self.identity, **self.states}, checkpoint_id=str(path), no_dist=not self.ctx.distributed)
        if self.ctx.is_main:
            complete = _complete_steps(self.folder)
            for old in [p for p in self.folder.glob("step-*") if _step_of(p) not in complete[-self.keep :]]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.ctx)

    def remove_all(self) -> None:
        """The run is finished (its saved student is the result): checkpoints are no longer needed."""
        barrier(self.ctx)
        if self.ctx.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
        barrier(self.ctx)

    def _path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}"


def has_checkpoint(out: Path) -> bool:
    return _latest_complete(out / CHECKPOINT_DIR) is not None


@contextmanager
def _single_process_is_intended():
    """DCP warns on every single-process save/load that it assumes one process: here that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step-"))
    except ValueError:
        return -1


def _complete_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(_step_of(p) for p in folder.glob("step-*") if (p / METADATA_FILE).is_file() and _step_of(p) >= 0)


def _latest_complete(folder: Path) -> int | None:
    steps = _complete_steps(folder)
    return steps[-1] if steps else None


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    differing = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differing:
        key = differing[0]
        raise DDKCacheError(
            f"{out} was trained with a different {', '.join(differing)} (checkpoint: {saved.get(key)}, now: {current.get(key)}): "
            "resume with the original settings, or choose another --out"
        )


@dataclass(frozen=True)
class CheckpointSettings:
    """When to checkpoint (`every` steps; 0: at every evaluation) and whether this run continues one.

    `resume`: False starts a run, True continues the one in `--out`, "auto" continues it if it has a
    checkpoint (job scripts re-run after preemption). The stage resolves "auto" once it has looked.
    """

    every: int = 0
    resume: bool | str = False

    RANGES: ClassVar[dict[str, Range]] = {"checkpoint_every": NON_NEGATIVE}

    def __post_init__(self) -> None:
        check_ranges({"checkpoint_every": self.every}, self.RANGES)
        if self.resume not in (True, False, "auto"):
            raise SettingError(f"resume must be True, False or 'auto', not {self.resume!r}")
