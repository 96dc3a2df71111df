"""`ddk-cache prune-student`: a pretrained student cut from the teacher (pruning.py says how and why).

The result is a plain transformers folder (weights, config, the teacher's tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads and `distill --student` accepts, plus `ddk_prune.json`
recording the criterion, the layers kept and, for block influence, every layer's score and the store
and windows it was measured on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddk_cache.errors import DDKCacheError, first_line
from ddk_cache.hub import require_loadable
from ddk_cache.ranges import AT_LEAST_ONE, check_ranges
from ddk_cache.store.fingerprints import require_same_tokenizer
from ddk_cache.store.format import TOKENS
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.pruning import CRITERIA, block_influence, decoder_layers, even_layers, influence_layers, prune

RECORD_NAME = "ddk_prune.json"


@dataclass
class PruneConfig:
    teacher: str
    layers: int  # decoder layers to keep
    out: Path
    criterion: str = "block-influence"
    store: str | None = None  # block-influence: the valid/ windows it is measured on
    windows: int = 16  # block-influence: validation windows per domain
    storage_options: dict | None = None


@dataclass
class PruneSummary:
    out: Path
    total_layers: int
    kept: list[int]
    scores: list[float] | None = field(default=None)


def run_prune(config: PruneConfig) -> PruneSummary:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers loads only when a model or tokenizer does
    from transformers.utils import logging as hf_logging  # heavy: transformers loads only when a model or tokenizer does

    hf_logging.disable_progress_bar()  # one line says where the student went; no "Writing model shards" bar
    check_ranges({"layers": config.layers, "windows": config.windows}, {"layers": AT_LEAST_ONE, "windows": AT_LEAST_ONE})
    if config.criterion not in CRITERIA:
        raise DDKCacheError(f"unknown --criterion {config.criterion!r}: choose {' or '.join(CRITERIA)}")
    if config.criterion == "block-influence" and config.store is None:
        raise DDKCacheError("--criterion block-influence measures the layers on real windows: pass --store (or use --criterion even)")
    if config.out.exists() and any(config.out.iterdir()):
        raise DDKCacheError(f"--out {config.out} is not empty: choose a new folder")
    require_loadable(config.teacher, "teacher")
    try:
        model = AutoModelForCausalLM.from_pretrained(config.teacher, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"cannot load teacher {config.teacher!r}: {first_line(exc)}") from None
    reader = None
    if config.criterion == "block-influence":  # the store's windows are the teacher's input: its tokenizer must be the teacher's
        reader = CacheReader(config.store, storage_options=config.storage_options, allow_incomplete=True)
        require_same_tokenizer(tokenizer, reader.header.tokenizer, "teacher's", f"{config.store}'s",
                               "measure the layers on a store made with the teacher's tokenizer (or use --criterion even)")
    total = len(decoder_layers(model))
    if not 1 <= config.layers < total:
        raise DDKCacheError(f"--layers must be between 1 and {total - 1} (the teacher has {total} decoder layers), got {config.layers}")
    scores = None
    if config.criterion == "even":
        keep = even_layers(total, config.layers)
    else:
        scores = block_influence(model, _valid_windows(reader, config.windows))
        keep = influence_layers(scores, config.layers)
    prune(model, keep)
    config.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(config.out)
    tokenizer.save_pretrained(config.out)
    record = {"teacher": str(config.teacher), "criterion": config.criterion, "teacher_layers": total, "kept_layers": keep,
              "block_influence": None if scores is None else [s if np.isfinite(s) else None for s in scores],
              "measured_on": None if scores is None else {"store": config.store, "windows_per_domain": config.windows}}
    (config.out / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return PruneSummary(config.out, total, keep, scores)


def _valid_windows(reader: CacheReader, windows: int) -> np.ndarray:
    """The first `windows` validation windows of every domain of the store (their inputs)."""
    parts = [reader.read_array(domain, "valid", TOKENS, 0, windows)[:, :-1] for domain in reader.domains]
    return np.concatenate(parts)
