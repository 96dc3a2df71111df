"""What a training step minimises, as one object the loop calls: `loss(logits, batch)` and `log_parts(parts)`.

Why an object (torchtitan's loop calls one loss function it was handed): the step used to choose between KD
on a cache, KD against a live teacher and MiniLLM's update by string and `isinstance` in three places
(the forward, the parts it logs, the checks). Each objective now carries its own settings and knows its own
parts; the loop does not know which one it runs. MiniLLM's objective lives with MiniLLM
(`minillm/objective.py`) and fulfils the same protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ddk_cache.training.losses import KDConfig, LossParts, dense_distillation_loss, distillation_loss
from ddk_cache.training.window_loader import Batch


class TrainingObjective(Protocol):
    """The loss of one micro-batch from the student's logits, and the named scalars a step logs from it."""

    def loss(self, logits: torch.Tensor, batch: Batch) -> Any: ...

    def log_parts(self, parts: Any) -> dict[str, float]: ...


def kd_log_parts(parts: LossParts) -> dict[str, float]:
    return {"loss": float(parts.total.detach()), "ce": float(parts.ce.detach()), "kd": float(parts.kd.detach()) if parts.kd is not None else 0.0}


@dataclass(frozen=True)
class KDObjective:
    """CE + KD on the cached sparse targets (DDK's loss). A store of reference answers trains on the answers only."""

    kd: KDConfig
    teacher_vocab: int

    def loss(self, logits: torch.Tensor, batch: Batch) -> LossParts:
        mask = batch.rollout.response_mask if batch.rollout is not None else None
        return distillation_loss(logits, batch.targets, batch.teacher, self.kd, teacher_vocab=self.teacher_vocab, mask=mask)

    def log_parts(self, parts: LossParts) -> dict[str, float]:
        return kd_log_parts(parts)


@dataclass(frozen=True)
class OnlineKDObjective:
    """The dense reference the cache approximates: KD against a live teacher's full distribution (`--online-teacher`)."""

    teacher: torch.nn.Module
    kd: KDConfig
    autocast: Callable[[], AbstractContextManager]  # the student's autocast, so both forwards run alike

    def loss(self, logits: torch.Tensor, batch: Batch) -> LossParts:
        with self.autocast(), torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch.input_ids, use_cache=False).logits
        return dense_distillation_loss(logits, batch.targets, teacher_logits, self.kd)

    def log_parts(self, parts: LossParts) -> dict[str, float]:
        return kd_log_parts(parts)
