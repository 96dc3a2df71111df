"""Expected calibration error of next-token top-1 probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from ddk_cache.training.validation_loss import CalibrationBins


def top1(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.softmax(logits, dim=-1).max(dim=-1)


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_when_it_does_not():
    generator = torch.Generator().manual_seed(0)
    n, vocab = 200_000, 4
    confidence = 0.7
    logits = torch.full((n, vocab), math.log((1 - confidence) / (vocab - 1)))
    logits[:, 0] = math.log(confidence)  # top-1 is id 0 with probability 0.7 everywhere
    calibrated = torch.where(torch.rand(n, generator=generator) < confidence, 0, 1)  # right 70 % of the time
    bins = CalibrationBins()
    bins.add(*top1(logits), calibrated)
    assert bins.ece() == pytest.approx(0.0, abs=0.005)
    overconfident = CalibrationBins()
    overconfident.add(*top1(logits), torch.where(torch.rand(n, generator=generator) < 0.4, 0, 1))  # right 40 %: gap 0.3
    assert overconfident.ece() == pytest.approx(0.3, abs=0.005)
    assert math.isnan(CalibrationBins().ece())


def test_ece_accumulates_over_batches_like_one_batch():
    generator = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(1000, 7, generator=generator) * 3, torch.randint(0, 7, (1000,), generator=generator)
    whole, parts = CalibrationBins(), CalibrationBins()
    whole.add(*top1(logits), targets)
    for start in range(0, 1000, 300):
        parts.add(*top1(logits[start : start + 300]), targets[start : start + 300])
    assert parts.ece() == pytest.approx(whole.ece(), abs=1e-12) and whole.ece() > 0
