"""AdamW and the warmup + cosine schedule used by DDK (warmup to the peak, cosine to a floor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddk_cache.ranges import FRACTION, NON_NEGATIVE, Range, check_ranges


def warmup_cosine_factor(step: int, warmup: int, total: int, floor_ratio: float) -> float:
    """LR multiplier at `step`: linear warmup over `warmup` steps, then cosine down to `floor_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases), as is standard for LMs."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total, floor_ratio))


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's and the schedule's settings; `warmup` None is min(1000, steps / 10) of the run it serves."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # DDK: 3e-5 -> 3e-6
    warmup: int | None = None
    weight_decay: float = 0.1
    clip: float = 1.0  # gradient-norm clip; 0: off

    RANGES: ClassVar[dict[str, Range]] = {"lr": Range(0, 1, open_low=True), "min_lr_ratio": FRACTION, "warmup": NON_NEGATIVE,
                                          "weight_decay": Range(0, 1), "clip": NON_NEGATIVE}

    def __post_init__(self) -> None:
        check_ranges({"lr": self.lr, "min_lr_ratio": self.min_lr_ratio, "warmup": self.warmup, "weight_decay": self.weight_decay,
                      "clip": self.clip}, self.RANGES)

    def warmup_steps(self, steps: int) -> int:
        return self.warmup if self.warmup is not None else min(1000, steps // 10)

    def build(self, model: torch.nn.Module, steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = build_optimizer(model, self.lr, self.weight_decay)
        return optimizer, build_scheduler(optimizer, self.warmup_steps(steps), steps, self.min_lr_ratio)
