"""Per-domain validation loss of a model on a store's `valid/` windows, next to the teacher's.

The teacher's number is computed from the stored actual-token log-probs of exactly the same
windows, so the student/teacher perplexity ratio that DDK uses compares like with like even
when only a subset of the validation windows is evaluated.

Calibration is reported as the expected calibration error (ECE) of the model's next-token
top-1 probability: positions binned by that confidence (15 equal-width bins), ECE = sum over
bins of (share of positions) x |accuracy - mean confidence|. It is what biased (top-k) targets
are said to hurt and unbiased sampled targets to keep (Anshumann et al. 2025).
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
    student_ece: float = float("nan")

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
        calibration = CalibrationBins()
        for start in range(0, n, batch_size):
            batch = torch.as_tensor(tokens[start : start + batch_size], dtype=torch.long, device=device)
            autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with autocast:
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            flat_logits, flat_targets = logits.float().flatten(0, 1), batch[:, 1:].flatten()
            total += float(F.cross_entropy(flat_logits, flat_targets, reduction="sum"))
            count += flat_targets.numel()
            calibration.add(flat_logits, flat_targets)
        results.append(DomainEval(domain, n, total / count, float(-np.mean(teacher, dtype=np.float64)), calibration.ece()))
    model.train(was_training)
    return results


class CalibrationBins:
    """Running per-bin sums of top-1 confidence and correctness, for the ECE of many batches."""

    def __init__(self, bins: int = 15) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        probs = torch.softmax(logits.float(), dim=-1)
        confidence, prediction = probs.max(dim=-1)
        index = (confidence * self.bins).long().clamp_(max=self.bins - 1).cpu()
        self.count += torch.bincount(index, minlength=self.bins).double()
        self.confidence += torch.bincount(index, weights=confidence.double().cpu(), minlength=self.bins)
        self.correct += torch.bincount(index, weights=(prediction == targets).double().cpu(), minlength=self.bins)

    def ece(self) -> float:
        total = float(self.count.sum())
        if total == 0:
            return float("nan")
        gap = (self.correct - self.confidence).abs()  # per bin: count x |accuracy - confidence|
        return float(gap.sum() / total)
