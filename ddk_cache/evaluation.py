"""Per-domain validation loss of a model on a store's `valid/` windows, next to the teacher's.

The teacher's number is computed from the stored actual-token log-probs of exactly the same
windows, so the student/teacher perplexity ratio that DDK uses compares like with like even
when only a subset of the validation windows is evaluated.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ddk_cache.cache_format import TARGET_LOGPROBS, TOKENS
from ddk_cache.cache_reader import CacheReader


@dataclass(frozen=True)
class DomainEval:
    domain: str
    windows: int
    student_loss: float
    teacher_loss: float

    @property
    def student_ppl(self) -> float:
        return math.exp(self.student_loss)

    @property
    def teacher_ppl(self) -> float:
        return math.exp(self.teacher_loss)

    def to_dict(self) -> dict:
        return {**asdict(self), "student_ppl": self.student_ppl, "teacher_ppl": self.teacher_ppl}


@torch.inference_mode()
def evaluate_domains(
    model: torch.nn.Module,
    reader: CacheReader,
    domains: list[str],
    max_windows: int | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> list[DomainEval]:
    """Mean next-token CE (nats) of `model` and of the teacher on the first `max_windows` valid windows."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    for domain in domains:
        n = reader.array(domain, "valid", TOKENS).shape[0]
        n = min(n, max_windows) if max_windows else n
        tokens = reader.array(domain, "valid", TOKENS)[:n]
        teacher = reader.array(domain, "valid", TARGET_LOGPROBS)[:n]
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            batch = torch.as_tensor(tokens[start : start + batch_size], dtype=torch.long, device=device)
            autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with autocast:
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            total += float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
        results.append(DomainEval(domain, n, total / count, float(-np.mean(teacher, dtype=np.float64))))
    model.train(was_training)
    return results
