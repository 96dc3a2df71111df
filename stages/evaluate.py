"""`ddk-cache eval`: per-domain validation loss and perplexity of any model next to the teacher's."""

from __future__ import annotations

import torch

from ddk_cache.devices import resolve_device
from ddk_cache.ranges import AT_LEAST_ONE, check_ranges
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.student import check_compatible, load_student
from ddk_cache.training.validation_loss import DomainEval, evaluate_domains


def run_eval(model_path: str, store: str, tokenizer: str | None = None, max_windows: int | None = None,
             batch_size: int = 8, device: str = "auto", storage_options: dict | None = None, random_init: bool = False,
             loss_impl: str = "fused") -> list[DomainEval]:
    """Why a folder without weights is refused: transformers builds it from its config with fresh random weights,
    so the scores (about ln(vocab)) change on every run and describe no model; `random_init` asks for them on purpose."""
    check_ranges({"max_windows": max_windows, "batch_size": batch_size}, {"max_windows": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE})
    target = resolve_device(device, local_rank=0)
    reader = CacheReader(store, storage_options=storage_options)
    refusal = ("its scores would be of a fresh random initialisation; evaluate a saved model (distill writes one), or pass "
               "--random-init to score the initialisation on purpose")
    model, tok = load_student(model_path, tokenizer, needs_weights=None if random_init else refusal)
    check_compatible(model, tok, reader.header)
    model.to(target)
    autocast = torch.bfloat16 if target.type == "cuda" else None
    return evaluate_domains(model, reader, reader.domains, max_windows, batch_size, autocast, loss_impl=loss_impl)
