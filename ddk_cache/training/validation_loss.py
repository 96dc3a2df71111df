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

from ddk_cache.choices import LossImpl
from ddk_cache.lm_head import map_rows
from ddk_cache.store.format import RESPONSE_MASK, TARGET_LOGPROBS, TOKENS
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.cross_tokenizer_windows import CrossTokenizerView
from ddk_cache.training.distributed import ParallelContext, all_reduce_sum
from ddk_cache.training.student_outputs import StudentOutputs, student_outputs


@dataclass(frozen=True)
class DomainEval:
    domain: str
    windows: int
    student_loss: float
    teacher_loss: float
    student_ece: float = float("nan")
    per: str = "token"  # what the losses are per: "byte" for a student of another tokenizer

    @property
    def student_ppl(self) -> float:
        return math.exp(self.student_loss)

    @property
    def teacher_ppl(self) -> float:
        return math.exp(self.teacher_loss)

    def to_dict(self) -> dict:
        return {**asdict(self), "student_ppl": self.student_ppl, "teacher_ppl": self.teacher_ppl}


@torch.no_grad()  # not inference_mode: DDP later updates buffers in place, which inference tensors forbid
def evaluate_domains(
    model: torch.nn.Module,
    reader: CacheReader,
    domains: list[str],
    max_windows: int | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    ctx: ParallelContext | None = None,
    loss_impl: LossImpl | str = LossImpl.fused,
    view: CrossTokenizerView | None = None,
) -> list[DomainEval]:
    """Mean next-token CE (nats) of `model` and of the teacher on the first `max_windows` valid windows.

    In a rollout store (MiniLLM rounds) only response positions count: the prompts and the padding are not
    the text either model is judged on.

    Under torchrun the windows of each domain are split into contiguous per-rank slices, and the
    per-domain sums (losses, counts, calibration bins) are all-reduced once at the end: every
    rank returns the same numbers, equal (up to float summation order) to a single process's.
    `loss_impl`: fused (the default) scores the positions from the hidden states a token chunk of logits at a
    time; dense from the model's `[tokens x vocabulary]` logits. Every rank runs the same number of forward passes (a rank with a shorter slice runs one on a
    window that counts for nothing): FSDP2 gathers parameters in every forward, collectively.

    `view`: a student with another tokenizer reads the windows in its own tokens (`cross_tokenizer_windows.py`); then
    both losses are per byte of the text (the student's summed over its tokens, the teacher's over its own), since a
    nat per token of one vocabulary is not one of another: DDK's ratio then compares like with like again.
    """
    ctx = ctx or ParallelContext(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    bins = CalibrationBins()
    sums = torch.zeros(len(domains), 4 + 3 * bins.bins, dtype=torch.float64)  # student CE, teacher CE, their units, ECE bins
    windows = []
    for d, domain in enumerate(domains):
        n = reader.array(domain, "valid", TOKENS).shape[0]
        n = min(n, max_windows) if max_windows else n
        windows.append(n)
        start, stop = _share(n, ctx.rank, ctx.world_size)
        names = (TOKENS, TARGET_LOGPROBS) + ((RESPONSE_MASK,) if reader.header.rollout is not None else ())
        valid = reader.read_arrays(domain, "valid", names, start, stop)  # checked against the chunk checksums
        tokens, teacher = valid[TOKENS], valid[TARGET_LOGPROBS]
        counted = valid[RESPONSE_MASK] > 0 if RESPONSE_MASK in valid else np.ones(teacher.shape, dtype=bool)
        student_units = teacher_units = float(counted.sum())
        if view is not None:  # the student's own tokens of the same windows, scored per byte
            windows_of = view.windows(reader.read(domain, "valid", start, stop))
            tokens, counted = windows_of.tokens, windows_of.mask
            student_units, teacher_units = float(windows_of.units.sum()), float(windows_of.teacher_units.sum())
        calibration = CalibrationBins()
        student_total = 0.0
        for begin in range(0, _share_size(n, ctx.world_size), batch_size):
            rows = tokens[begin : begin + batch_size]
            real = len(rows)
            if real == 0:  # this rank's slice is shorter: a forward on a window that counts for nothing
                rows = np.zeros((1, tokens.shape[1]), dtype=np.int64)
            batch = torch.as_tensor(rows, dtype=torch.long, device=ctx.device)
            autocast = torch.autocast(ctx.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with autocast:
                outputs = student_outputs(model, batch[:, :-1], loss_impl)
            if real == 0:
                continue
            keep = torch.as_tensor(counted[begin : begin + batch_size], device=ctx.device).flatten()
            loss, confidence, prediction = _scores(outputs, batch[:, 1:].flatten(), keep)
            student_total += loss
            calibration.add(confidence, prediction, batch[:, 1:].flatten()[keep])
        teacher_counted = teacher[counted] if view is None else teacher
        sums[d, :4] = torch.tensor([student_total, float(-np.sum(teacher_counted, dtype=np.float64)), student_units, teacher_units],
                                   dtype=torch.float64)
        sums[d, 4:] = calibration.as_tensor()
    sums = all_reduce_sum(ctx, sums)
    model.train(was_training)
    results = []
    for d, domain in enumerate(domains):
        student, teacher, student_units, teacher_units = (float(v) for v in sums[d, :4])
        results.append(DomainEval(domain, windows[d], student / student_units, teacher / teacher_units,
                                  CalibrationBins.from_tensor(sums[d, 4:]).ece(), "byte" if view is not None else "token"))
    return results


def _scores(outputs: StudentOutputs, targets: torch.Tensor, keep: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The summed CE of the kept positions, and their top-1 probability and prediction (for the ECE).

    Fused: from the hidden states, a token chunk of logits at a time (`lm_head.map_rows`); dense: from all of them.
    """
    if not outputs.fused:
        logits = outputs.logits.float().flatten(0, 1)[keep]
        return (float(F.cross_entropy(logits, targets[keep], reduction="sum")), *torch.softmax(logits, dim=-1).max(dim=-1))
    hidden, kept_targets = outputs.hidden.flatten(0, 1)[keep], targets[keep]

    def score(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor, ...]:
        lse = torch.logsumexp(logits, -1)
        top, prediction = logits.max(-1)
        return (lse - logits.gather(1, kept_targets[rows, None])[:, 0]).sum(), torch.exp(top - lse), prediction

    parts = map_rows(hidden, outputs.head, score)
    return float(sum(p[0] for p in parts)), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous slice of `n` windows (the first n % world_size ranks take one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _share_size(n: int, world_size: int) -> int:
    """The largest slice: every rank runs forwards for this many windows."""
    return -(-n // world_size)


class CalibrationBins:
    """Running per-bin sums of top-1 confidence and correctness, for the ECE of many batches."""

    def __init__(self, bins: int = 15) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, prediction: torch.Tensor, targets: torch.Tensor) -> None:
        """Positions with their top-1 probability and top-1 id, and the true next token."""
        index = (confidence * self.bins).long().clamp_(max=self.bins - 1).cpu()
        self.count += torch.bincount(index, minlength=self.bins).double()
        self.confidence += torch.bincount(index, weights=confidence.double().cpu(), minlength=self.bins)
        self.correct += torch.bincount(index, weights=(prediction == targets).double().cpu(), minlength=self.bins)

    def as_tensor(self) -> torch.Tensor:
        return torch.cat([self.count, self.confidence, self.correct])

    @classmethod
    def from_tensor(cls, sums: torch.Tensor) -> "CalibrationBins":
        bins = cls(len(sums) // 3)
        bins.count, bins.confidence, bins.correct = (part.clone() for part in sums.reshape(3, -1))
        return bins

    def ece(self) -> float:
        total = float(self.count.sum())
        if total == 0:
            return float("nan")
        gap = (self.correct - self.confidence).abs()  # per bin: count x |accuracy - confidence|
        return float(gap.sum() / total)
