"""What a training step minimises, as one object the loop calls: `loss(outputs, batch)` and `log_parts(parts)`.

Why an object (torchtitan's loop calls one loss function it was handed): the step used to choose between KD
on a cache, KD against a live teacher and MiniLLM's update by string and `isinstance` in three places
(the forward, the parts it logs, the checks). Each objective now carries its own settings and knows its own
parts; the loop does not know which one it runs. MiniLLM's objective lives with MiniLLM
(`minillm/objective.py`) and fulfils the same protocol. Each takes the student's outputs in either form
(`student_outputs.py`: logits, or hidden states and head for the fused losses) and computes the same loss.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ddk_cache.lm_head import hidden_states
from ddk_cache.training.cross_tokenizer_loss import cross_tokenizer_kd
from ddk_cache.training.fused_loss import fused_distillation_loss, fused_online_loss
from ddk_cache.training.losses import KDConfig, LossParts, TeacherTargets, dense_distillation_loss, distillation_loss
from ddk_cache.training.student_outputs import StudentOutputs
from ddk_cache.training.window_loader import Batch


class TrainingObjective(Protocol):
    """The loss of one micro-batch from the student's outputs, and the named scalars a step logs from it."""

    def loss(self, outputs: StudentOutputs, batch: Batch) -> Any: ...

    def log_parts(self, parts: Any) -> dict[str, float]: ...


def language_model_loss(outputs: StudentOutputs, targets: torch.Tensor) -> torch.Tensor:
    """The next-token CE alone (MiniLLM's L_PT term), in either form."""
    config = KDConfig()
    if outputs.fused:
        return fused_distillation_loss(outputs.hidden, outputs.head, targets, None, config).total
    return distillation_loss(outputs.logits, targets, None, config).total


def kd_log_parts(parts: LossParts) -> dict[str, float]:
    return {"loss": float(parts.total.detach()), "ce": float(parts.ce.detach()), "kd": float(parts.kd.detach()) if parts.kd is not None else 0.0}


@dataclass(frozen=True)
class KDObjective:
    """CE + KD on the cached sparse targets (DDK's loss). A store of reference answers trains on the answers only."""

    kd: KDConfig
    teacher_vocab: int | None

    def loss(self, outputs: StudentOutputs, batch: Batch) -> LossParts:
        return self.loss_on(outputs, batch.targets, batch.teacher, batch.rollout.response_mask if batch.rollout is not None else None)

    def loss_on(self, outputs: StudentOutputs, targets: torch.Tensor, teacher: TeacherTargets | None, mask: torch.Tensor | None) -> LossParts:
        """The loss of next tokens `targets` and the teacher's entries, means over `mask` (None: every position)."""
        if outputs.fused:
            return fused_distillation_loss(outputs.hidden, outputs.head, targets, teacher, self.kd, self.teacher_vocab, mask)
        return distillation_loss(outputs.logits, targets, teacher, self.kd, teacher_vocab=self.teacher_vocab, mask=mask)

    def log_parts(self, parts: LossParts) -> dict[str, float]:
        return kd_log_parts(parts)


@dataclass(frozen=True)
class CrossTokenizerObjective:
    """CE on every student position + KD at the positions aligned with the teacher's (`cross_tokenizer_loss.py`).

    The KD term is summed over aligned positions and divided by all real positions, so an unaligned position
    contributes CE alone and the term keeps its per-token scale; mixed with CE as `kd.form` says (DDK's CE +
    gamma KD by default). The student's logits are needed whole (`[tokens x student vocabulary]`): a fused
    forward's head is applied here, which the small vocabularies of students of another tokenizer afford.
    """

    kd: KDConfig
    method: str
    uld_weight: float

    def loss(self, outputs: StudentOutputs, batch: Batch) -> LossParts:
        mask = batch.mask if batch.mask is not None else torch.ones(batch.targets.shape, dtype=torch.bool, device=batch.targets.device)
        logits = outputs.logits[mask] if not outputs.fused else outputs.head.logits(outputs.hidden[mask])  # [real positions, V]
        count = mask.sum().clamp(min=1)
        ce = torch.nn.functional.cross_entropy(logits.float(), batch.targets[mask], reduction="sum") / count
        teacher = batch.teacher
        ids, logprobs, valid = teacher.ids[mask], teacher.logprobs[mask], teacher.valid[mask]
        aligned = valid.any(-1)
        kd = cross_tokenizer_kd(logits[aligned], ids[aligned], logprobs[aligned], valid[aligned], self.method, self.uld_weight).sum() / count
        total = ce + self.kd.gamma * kd if self.kd.form == "add" else (1 - self.kd.mix) * ce + self.kd.mix * kd
        return LossParts(total, ce, kd)

    def log_parts(self, parts: LossParts) -> dict[str, float]:
        return kd_log_parts(parts)


@dataclass(frozen=True)
class OnlineKDObjective:
    """The dense reference the cache approximates: KD against a live teacher's full distribution (`--online-teacher`)."""

    teacher: torch.nn.Module
    kd: KDConfig
    autocast: Callable[[], AbstractContextManager]  # the student's autocast, so both forwards run alike

    def loss(self, outputs: StudentOutputs, batch: Batch) -> LossParts:
        with self.autocast(), torch.no_grad():
            if outputs.fused:  # both heads a token chunk at a time: neither side's [N, V] logits
                teacher_hidden, teacher_head = hidden_states(self.teacher, batch.input_ids)
            else:
                teacher_logits = self.teacher(input_ids=batch.input_ids, use_cache=False).logits
        if outputs.fused:
            return fused_online_loss(outputs.hidden, outputs.head, batch.targets, teacher_hidden, teacher_head, self.kd)
        return dense_distillation_loss(outputs.logits, batch.targets, teacher_logits, self.kd)

    def log_parts(self, parts: LossParts) -> dict[str, float]:
        return kd_log_parts(parts)
