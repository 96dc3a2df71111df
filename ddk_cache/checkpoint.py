"""Training checkpoints that make a killed run resume onto the same loss curve.

A checkpoint holds everything the next step depends on: model, optimizer, scheduler, the
domain sampler's weights, the reader's per-domain cursors and every random generator.
It is written to a temporary file and renamed, so a kill never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state(generator: np.random.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "sampler_generator": generator.bit_generator.state,
    }


def restore_rng_state(state: dict[str, Any], generator: np.random.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.bit_generator.state = state["sampler_generator"]


def save_checkpoint(out_dir: Path, state: dict[str, Any]) -> Path:
    path = out_dir / CHECKPOINT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def remove_checkpoint(out_dir: Path) -> None:
    (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
