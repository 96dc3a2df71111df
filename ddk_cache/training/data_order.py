"""Which windows make up each global batch: the same answer on 1, 2 or 512 ranks.

A global batch is the `G` windows of one optimizer step. It is decided the same way on every
rank, from state that is global rather than per rank:

1. the domains of its `G` windows are drawn with the sampler's current weights from a
   generator seeded by (seed, step): a function of the global step, nothing else;
2. each draw takes the next window of that domain's endless stream. A stream visits all of a
   domain's `train/` windows once per epoch, in an order that shuffles whole chunks and then the
   windows inside each chunk (so reads stay chunk-aligned), reshuffled every epoch: an exhausted
   domain is reused cyclically, as DDK prescribes. Its cursor is (epoch, position).
3. the `G` windows are grouped by domain in stream order and split into `world_size` contiguous
   slices, one per rank, each cut into micro-batches. Neighbouring windows of a stream share
   chunks, so each rank decodes (almost) only its own chunks; and rank r's slice on W ranks is
   exactly micro-batches r*A .. (r+1)*A-1 of a single process's step, so the arithmetic matches.

The cursors are the only state (`state_dict` / `load_state_dict`): a checkpoint taken on any
number of ranks resumes on any other. Planning is cheap bookkeeping; reading and decoding the
windows is the loader's job (`window_loader.py`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ddk_cache.errors import DDKCacheError
from ddk_cache.ranges import AT_LEAST_ONE, Range, check_ranges
from ddk_cache.training.domain_samplers import DomainSampler

DRAW_STREAM = 0x0DD4  # separates the domain draws' seed sequence from any other use of the seed


@dataclass(frozen=True)
class WindowRef:
    """One training window: domain index, and where it lies in the store (chunk, row inside it)."""

    domain: int
    chunk: int
    row: int


class DomainOrder:
    """The visiting order of one domain's windows: epoch by epoch, chunk-shuffled, deterministic."""

    def __init__(self, domain: str, n_windows: int, chunk_windows: int, seed: int) -> None:
        if n_windows <= 0:
            raise ValueError(f"domain {domain!r} has no train windows")
        self.domain, self.n_windows, self.chunk_windows, self.seed = domain, n_windows, chunk_windows, seed
        self.n_chunks = -(-n_windows // chunk_windows)
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._rows: dict[tuple[int, int], np.ndarray] = {}

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(chunk, row in the store) of the window at `position` of epoch `epoch`'s order."""
        order, sizes, ends = self._layout(epoch)
        slot = int(np.searchsorted(ends, position, side="right"))
        chunk = int(order[slot])
        offset = position - int(ends[slot] - sizes[slot])
        return chunk, chunk * self.chunk_windows + int(self._row_order(epoch, chunk)[offset])

    def chunk_size(self, chunk: int) -> int:
        return min(self.chunk_windows, self.n_windows - chunk * self.chunk_windows)

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk visiting order of `epoch`, each slot's window count and cumulative end (cached)."""
        if epoch not in self._layouts:
            order = self._rng(epoch, -1).permutation(self.n_chunks)
            sizes = np.minimum(self.chunk_windows, self.n_windows - order * self.chunk_windows)
            self._layouts[epoch] = (order, sizes, np.cumsum(sizes))
            for stale in [e for e in self._layouts if e < epoch - 1]:
                del self._layouts[stale]
        return self._layouts[epoch]

    def _row_order(self, epoch: int, chunk: int) -> np.ndarray:
        key = (epoch, chunk)
        if key not in self._rows:
            if len(self._rows) > 4 * self.n_chunks + 64:
                self._rows.clear()
            self._rows[key] = self._rng(epoch, chunk).permutation(self.chunk_size(chunk))
        return self._rows[key]

    def _rng(self, epoch: int, chunk: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.domain.encode()), epoch, chunk + 1])


class GlobalBatchPlanner:
    """Plans every global batch from the step, the sampler's weights and the domain cursors."""

    def __init__(self, orders: list[DomainOrder], global_batch: int, seed: int) -> None:
        self.orders, self.global_batch, self.seed = orders, global_batch, seed
        self.cursors = [(0, 0) for _ in orders]  # per domain: (epoch, position) of its next window

    def plan(self, step: int, sampler: DomainSampler) -> list[WindowRef]:
        """The global batch of `step`, advancing the cursors past it."""
        refs, self.cursors = self._plan(step, sampler, self.cursors)
        return refs

    def peek(self, step: int, sampler: DomainSampler) -> list[WindowRef]:
        """What `plan(step)` would return with today's weights, without advancing: for read-ahead."""
        return self._plan(step, sampler, self.cursors)[0]

    def _plan(self, step: int, sampler: DomainSampler, cursors: list[tuple[int, int]]) -> tuple[list[WindowRef], list[tuple[int, int]]]:
        draws = sampler.draw(np.random.default_rng([self.seed, DRAW_STREAM, step]), self.global_batch)
        counts = np.bincount(draws, minlength=len(self.orders))
        refs, moved = [], list(cursors)
        for domain, (order, count) in enumerate(zip(self.orders, counts)):  # grouped by domain, in stream order
            epoch, position = moved[domain]
            for _ in range(int(count)):
                chunk, row = order.locate(epoch, position)
                refs.append(WindowRef(domain, chunk, row))
                position += 1
                if position == order.n_windows:
                    epoch, position = epoch + 1, 0
            moved[domain] = (epoch, position)
        return refs, moved

    def state_dict(self) -> dict[str, Any]:
        return {"cursors": {order.domain: {"epoch": e, "position": p} for order, (e, p) in zip(self.orders, self.cursors)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cursors = state["cursors"]
        self.cursors = [(int(cursors[o.domain]["epoch"]), int(cursors[o.domain]["position"])) for o in self.orders]


def rank_slice(refs: list[WindowRef], rank: int, world_size: int) -> list[WindowRef]:
    """Rank `rank`'s contiguous share of a global batch (the batch size divides by the world size)."""
    per_rank = len(refs) // world_size
    return refs[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(refs: list[WindowRef], size: int) -> list[list[WindowRef]]:
    return [refs[i : i + size] for i in range(0, len(refs), size)]


@dataclass(frozen=True)
class BatchSettings:
    """How many windows a step trains on and how they are cut: `batch_size` per forward pass on each rank,
    `grad_accum` micro-batches per rank, or the `global_batch_size` over all ranks that implies it."""

    batch_size: int = 8
    grad_accum: int | None = None  # default: what the global batch implies, else 1
    global_batch_size: int | None = None  # default: batch_size x grad_accum x ranks

    RANGES: ClassVar[dict[str, Range]] = {"batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "global_batch_size": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        check_ranges({"batch_size": self.batch_size, "grad_accum": self.grad_accum, "global_batch_size": self.global_batch_size}, self.RANGES)


@dataclass(frozen=True)
class BatchShape:
    """A global batch of `global_size` windows = ranks x `accum` micro-batches x `micro` windows."""

    global_size: int
    micro: int
    accum: int

    @classmethod
    def resolve(cls, settings: BatchSettings, world_size: int) -> "BatchShape":
        micro = settings.batch_size
        if settings.global_batch_size is None:
            accum = settings.grad_accum or 1
            return cls(micro * accum * world_size, micro, accum)
        per_step = world_size * micro
        if settings.global_batch_size % per_step:
            raise DDKCacheError(
                f"--global-batch-size {settings.global_batch_size} is not a multiple of {world_size} ranks x --batch-size {micro} = {per_step}: "
                "change one of them"
            )
        accum = settings.global_batch_size // per_step
        if settings.grad_accum is not None and settings.grad_accum != accum:
            raise DDKCacheError(
                f"--grad-accum {settings.grad_accum} contradicts --global-batch-size {settings.global_batch_size} "
                f"({world_size} ranks x --batch-size {micro} x {accum}): give one of them"
            )
        return cls(settings.global_batch_size, micro, accum)
