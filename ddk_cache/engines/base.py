"""The contract every teacher engine (Hugging Face, vLLM) fulfils, so stores are identical.

An engine receives windows of `seq_len + 1` token ids. For each of the first `seq_len`
positions t it returns the teacher's distribution over token t + 1 given tokens <= t:
the top-k ids in descending log-prob order, their raw log-probs (log_softmax at
temperature 1, so the tail mass 1 - sum(exp) is known), and the log-prob of the actual
next token `window[t + 1]`, whether or not it is in the top-k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class TopKResult:
    """Engine output for `B` windows of `L` scored positions."""

    topk_ids: np.ndarray  # int32 [B, L, k], descending log-prob
    topk_logprobs: np.ndarray  # float32 [B, L, k]
    target_logprobs: np.ndarray  # float32 [B, L], log p(window[t + 1] | window[: t + 1])
    samples: np.ndarray | None = None  # int32 [B, L, n]: n draws from the full distribution (sampled capture) or its tail (headtail)

    def __post_init__(self) -> None:
        b, length, k = self.topk_ids.shape
        if self.topk_logprobs.shape != (b, length, k) or self.target_logprobs.shape != (b, length):
            raise ValueError("inconsistent TopKResult shapes")
        if self.samples is not None and self.samples.shape[:2] != (b, length):
            raise ValueError("inconsistent TopKResult sample shape")

    @classmethod
    def concatenate(cls, parts: list["TopKResult"]) -> "TopKResult":
        """Join results of consecutive window batches."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            topk_ids=np.concatenate([p.topk_ids for p in parts]),
            topk_logprobs=np.concatenate([p.topk_logprobs for p in parts]),
            target_logprobs=np.concatenate([p.target_logprobs for p in parts]),
            samples=None if parts[0].samples is None else np.concatenate([p.samples for p in parts]),
        )

    def windows(self, rows: slice) -> "TopKResult":
        """The result for a contiguous range of the windows (e.g. one shard of a grouped call)."""
        samples = None if self.samples is None else self.samples[rows]
        return TopKResult(self.topk_ids[rows], self.topk_logprobs[rows], self.target_logprobs[rows], samples)


class TeacherEngine(ABC):
    """Scores windows with a teacher model. Subclasses load the model in `__init__`."""

    name: str
    # Windows the stage should hand `score` at once (several shards' worth for engines that
    # schedule internally and only stay busy with a deep queue of requests).
    preferred_windows: int = 1

    @property
    @abstractmethod
    def config(self) -> Any:
        """The teacher's transformers config (vocab size, architecture) for provenance."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Engine name, version and every setting that can change the numbers it produces."""

    # Whether `score` can draw samples from the full distribution (sampled and headtail capture).
    supports_sampling: bool = False

    @abstractmethod
    def score(
        self, windows: np.ndarray, k: int, progress: ProgressCallback | None = None, draws: int | None = None, seed: int = 0,
        tail: bool = False,
    ) -> TopKResult:
        """Top-k distributions for `windows` (int32 `[B, seq_len + 1]`); calls `progress(tokens)` as it goes.

        With `draws`, also `draws` samples per position from the full distribution, reproducible from `seed`;
        with `tail` too, from the distribution restricted to the ids outside the top-k (headtail capture).
        """

    def value_settings(self) -> dict[str, Any]:
        """The subset of `describe()` that must match to resume a store (numbers would differ otherwise)."""
        return {"name": self.name}

    def close(self) -> None:
        """Release what the engine started. Why it matters: vLLM runs its model in processes of its own, which a
        data-parallel worker (a multiprocessing child, which exits without atexit hooks) would otherwise leave running."""


@dataclass(frozen=True)
class EngineInfo:
    """What a store records about an engine, detached from the model (picklable), so a
    data-parallel worker can report it to the process that writes the store's header."""

    description: dict[str, Any]
    value_settings: dict[str, Any]
    vocab_size: int
    architecture: str
    commit_hash: str | None
    context_length: int | None = None  # positions the teacher was built for (None: the config does not say)

    @classmethod
    def of(cls, engine: TeacherEngine) -> "EngineInfo":
        config = engine.config
        return cls(
            description=engine.describe(),
            value_settings=engine.value_settings(),
            vocab_size=int(config.vocab_size),
            architecture=(getattr(config, "architectures", None) or [type(config).__name__])[0],
            commit_hash=getattr(config, "_commit_hash", None),
            context_length=next((int(v) for v in (getattr(config, name, None) for name in ("max_position_embeddings", "n_positions",
                                                                                           "max_sequence_length")) if isinstance(v, int)), None),
        )
