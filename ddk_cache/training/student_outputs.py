"""What the student's forward hands the loss: its `[tokens x vocabulary]` logits (dense), or its final hidden states and
its head (fused), chosen once by `--loss-impl`.

Why a type of its own: every objective (KD on a cache, KD against a live teacher, MiniLLM's update, its L_PT term)
and the evaluations take the student's outputs; which of the two forms they get is one setting of the run, not
a branch in each caller. The fused form runs the model's own forward (so DDP's and FSDP2's hooks run as they do
for the dense one) with the head recorded instead of applied (`lm_head.hidden_states`); the losses then apply the
head a token chunk at a time (`fused_loss.py`). The dense form is kept as the reference the fused one is tested
and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddk_cache.choices import LossImpl, parse_choice
from ddk_cache.lm_head import LMHead, hidden_states


@dataclass
class StudentOutputs:
    """Either `logits` `[B, L, V]`, or `hidden` `[B, L, d]` with the `head` that turns rows of it into logits."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: LMHead | None = None

    @property
    def fused(self) -> bool:
        return self.logits is None


def student_outputs(model: torch.nn.Module, input_ids: torch.Tensor, impl: LossImpl | str = LossImpl.fused) -> StudentOutputs:
    """The student's forward on `input_ids`, in the form `impl` asks for."""
    if parse_choice(LossImpl, impl, "--loss-impl") == LossImpl.dense:
        return StudentOutputs(logits=model(input_ids=input_ids, use_cache=False).logits)
    hidden, head = hidden_states(model, input_ids)
    return StudentOutputs(hidden=hidden, head=head)
