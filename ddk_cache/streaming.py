"""Stream a store's training windows into batches, with decoding off the training thread.

Each domain is an endless, seeded stream over its `train/` windows: every epoch visits the
windows in a fresh order that shuffles whole chunks and then the windows inside each chunk,
so every read is one chunk-aligned block (a few large reads, never per-window reads) and an
exhausted domain is reused cyclically, as DDK prescribes. The order depends only on the seed,
the domain and the epoch, never on the sampler's weights, so a background thread pool can
decode chunks ahead of need, and a cursor (epoch, position) per domain is enough to resume.

Why threads rather than DataLoader worker processes: zarr and fsspec run an asyncio loop in a
thread, which a forked worker inherits in a broken state; decompression (blosc/zstd) releases
the GIL, so threads decode in parallel without any fork hazard.
"""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ddk_cache.cache_format import TOKENS
from ddk_cache.cache_reader import CacheReader, WindowBlock
from ddk_cache.losses import TeacherTargets


@dataclass
class Batch:
    """Model-ready tensors for `B` windows of `L` positions."""

    input_ids: torch.Tensor  # int64 [B, L]
    targets: torch.Tensor  # int64 [B, L]
    teacher: TeacherTargets  # sparse teacher entries [B, L, W] (+ validity, rest)
    domains: torch.Tensor  # int64 [B], index into the batcher's domain list

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=device.type == "cuda")  # noqa: E731
        teacher = TeacherTargets(*(move(t) for t in (self.teacher.ids, self.teacher.logprobs, self.teacher.valid, self.teacher.rest)))
        return Batch(move(self.input_ids), move(self.targets), teacher, move(self.domains))


class DomainStream:
    """Endless seeded stream of one domain's windows, decoded `prefetch` chunks ahead."""

    def __init__(self, reader: CacheReader, domain: str, seed: int, pool: ThreadPoolExecutor, prefetch: int = 2, split: str = "train") -> None:
        self.reader, self.domain, self.split, self.seed, self.pool, self.prefetch = reader, domain, split, seed, pool, prefetch
        self.n_windows = reader.array(domain, split, TOKENS).shape[0]
        self.chunk_windows = reader.array(domain, split, TOKENS).chunks[0]
        if self.n_windows == 0:
            raise ValueError(f"domain {domain!r} has no {split} windows")
        self.n_chunks = -(-self.n_windows // self.chunk_windows)
        self.epoch, self.position = 0, 0  # the cursor: next window is `position` in epoch `epoch`'s order
        self._pending: deque[tuple[int, int, Future]] = deque()  # (epoch, chunk slot, decoded chunk)
        self._current: tuple[WindowBlock, np.ndarray] | None = None
        self._current_slot: tuple[int, int] | None = None
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._pending.clear()
        self._current = self._current_slot = None

    def next_window(self) -> tuple[WindowBlock, int]:
        """The next window of the stream: its decoded chunk and the row inside it."""
        slot, offset = self._slot_of(self.epoch, self.position)
        if self._current_slot != (self.epoch, slot):
            self._current = self._take(self.epoch, slot)
            self._current_slot = (self.epoch, slot)
        chunk, window_order = self._current
        row = window_order[offset]
        self.position += 1
        if self.position == self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        return chunk, int(row)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk visiting order of `epoch`, each slot's window count and cumulative end (cached)."""
        if epoch not in self._layouts:
            order = self._rng(epoch, -1).permutation(self.n_chunks)
            sizes = np.minimum(self.chunk_windows, self.n_windows - order * self.chunk_windows)
            self._layouts[epoch] = (order, sizes, np.cumsum(sizes))
            for stale in [e for e in self._layouts if e < epoch - 1]:
                del self._layouts[stale]
        return self._layouts[epoch]

    def _slot_of(self, epoch: int, position: int) -> tuple[int, int]:
        """Which slot of the epoch's chunk order holds `position`, and the offset inside it."""
        _, sizes, ends = self._epoch_layout(epoch)
        slot = int(np.searchsorted(ends, position, side="right"))
        return slot, position - int(ends[slot] - sizes[slot])

    def _rng(self, epoch: int, chunk: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.domain.encode()), epoch, chunk + 1])

    def _take(self, epoch: int, slot: int) -> tuple[WindowBlock, np.ndarray]:
        """The decoded chunk at (epoch, slot), scheduling reads of the following chunks."""
        while self._pending and (self._pending[0][0], self._pending[0][1]) != (epoch, slot):
            self._pending.popleft()  # stale read-ahead (after a restore)
        if not self._pending:
            self._pending.append((epoch, slot, self._submit(epoch, slot)))
        next_epoch, next_slot = self._pending[-1][0], self._pending[-1][1]
        while len(self._pending) <= self.prefetch:
            next_epoch, next_slot = (next_epoch, next_slot + 1) if next_slot + 1 < self.n_chunks else (next_epoch + 1, 0)
            self._pending.append((next_epoch, next_slot, self._submit(next_epoch, next_slot)))
        _, _, future = self._pending.popleft()
        chunk_id = int(self._epoch_layout(epoch)[0][slot])
        return future.result(), self._rng(epoch, chunk_id).permutation(self._chunk_size(chunk_id))

    def _chunk_size(self, chunk_id: int) -> int:
        return min(self.chunk_windows, self.n_windows - chunk_id * self.chunk_windows)

    def _submit(self, epoch: int, slot: int) -> Future:
        chunk_id = int(self._epoch_layout(epoch)[0][slot])
        return self.pool.submit(self._decode, chunk_id)

    def _decode(self, chunk_id: int) -> WindowBlock:
        start = chunk_id * self.chunk_windows
        return self.reader.read(self.domain, self.split, start, start + self._chunk_size(chunk_id))


class CacheBatcher:
    """Assembles batches from per-domain streams given the sampler's domain draws."""

    def __init__(self, reader: CacheReader, domains: list[str], seed: int, prefetch_chunks: int = 2, threads: int = 2) -> None:
        self.domains = domains
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ddk-reader")
        self.streams = [DomainStream(reader, d, seed, self.pool, prefetch_chunks) for d in domains]

    def next_batch(self, domain_indices: np.ndarray) -> Batch:
        windows = [self.streams[i].next_window() for i in domain_indices]

        def stack(field: str, dtype=None) -> torch.Tensor | None:
            rows = [getattr(block, field) for block, _ in windows]
            if rows[0] is None:
                return None
            stacked = np.stack([array[row] for array, (_, row) in zip(rows, windows)])
            return torch.from_numpy(stacked if dtype is None else stacked.astype(dtype))

        tokens = stack("tokens", np.int64)
        teacher = TeacherTargets(stack("ids", np.int64), stack("logprobs"), stack("valid"), stack("rest_logprobs"))
        return Batch(tokens[:, :-1], tokens[:, 1:], teacher, torch.as_tensor(domain_indices, dtype=torch.long))

    def state(self) -> dict[str, dict[str, int]]:
        return {s.domain: s.state() for s in self.streams}

    def restore(self, state: dict[str, dict[str, int]]) -> None:
        for stream in self.streams:
            stream.restore(state[stream.domain])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
