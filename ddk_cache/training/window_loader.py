"""Read and decode this rank's training windows off the training thread, and collate them.

The planner (`data_order.py`) says which windows each step needs; this loader turns them into
model-ready tensors. It reads whole chunks (a chunk is zarr's unit of decompression, and one
large read beats many small ones), only the chunks that hold this rank's windows, and keeps a
decoded chunk while a current or upcoming window still needs it. `prefetch` queues the chunks
of the next step while the current one trains, so decoding hides behind compute.

Why threads rather than DataLoader worker processes: zarr and fsspec run an asyncio loop in a
thread, which a forked worker inherits in a broken state; decompression (blosc/zstd) releases
the GIL, so threads decode in parallel without any fork hazard.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ddk_cache.store.format import TOKENS
from ddk_cache.store.reader import CacheReader, WindowBlock
from ddk_cache.training.cross_tokenizer_windows import CrossTokenizerView, StudentWindows
from ddk_cache.training.data_order import DomainOrder, WindowRef
from ddk_cache.training.losses import TeacherTargets


@dataclass
class Batch:
    """Model-ready tensors for `B` windows of `L` positions."""

    input_ids: torch.Tensor  # int64 [B, L]
    targets: torch.Tensor  # int64 [B, L]
    teacher: TeacherTargets  # sparse teacher entries [B, L, W] (+ validity, rest)
    domains: torch.Tensor  # int64 [B], index into the store's domain list
    rollout: "RolloutTensors | None" = None  # rollout stores (MiniLLM): what the policy gradient needs
    mask: torch.Tensor | None = None  # bool [B, L]: real positions (cross-tokenizer windows are padded); None: all

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=device.type == "cuda")  # noqa: E731
        teacher = TeacherTargets(*(move(t) for t in (self.teacher.ids, self.teacher.logprobs, self.teacher.valid, self.teacher.rest)))
        rollout = None if self.rollout is None else RolloutTensors(*(move(t) for t in (self.rollout.teacher_logprobs, self.rollout.behaviour_logprobs,
                                                                                         self.rollout.response_mask, self.rollout.sampling_logprobs)))
        return Batch(move(self.input_ids), move(self.targets), teacher, move(self.domains), rollout, move(self.mask))


@dataclass
class RolloutTensors:
    """Per position `[B, L]`, about the token after it: the teacher's log-prob of it, the sampling student's, whether
    it is a sampled response token (1) or prompt / padding (0), and, where the teacher was mixed into sampling, the
    mixture's log-prob of it (None: the student sampled alone, so the mixture is the student)."""

    teacher_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor
    response_mask: torch.Tensor
    sampling_logprobs: torch.Tensor | None = None


def domain_orders(reader: CacheReader, domains: list[str], seed: int, split: str = "train") -> list[DomainOrder]:
    """The visiting order of each domain's windows, from the store's sizes and chunking."""
    orders = []
    for domain in domains:
        tokens = reader.array(domain, split, TOKENS)
        orders.append(DomainOrder(domain, tokens.shape[0], tokens.chunks[0], seed))
    return orders


class WindowLoader:
    """Decodes the chunks a rank needs, ahead of need, and stacks windows into batches."""

    def __init__(self, reader: CacheReader, orders: list[DomainOrder], threads: int = 2, split: str = "train",
                 view: "CrossTokenizerView | None" = None) -> None:
        """`view`: a student with another tokenizer; each decoded chunk is re-tokenized and aligned in the same threads."""
        self.reader, self.orders, self.split, self.view = reader, orders, split, view
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ddk-reader")
        self._chunks: dict[tuple[int, int], Future] = {}

    def prefetch(self, refs: list[WindowRef]) -> None:
        """Start decoding every chunk that `refs` need and that is not decoded or queued yet."""
        for key in dict.fromkeys((ref.domain, ref.chunk) for ref in refs):
            if key not in self._chunks:
                self._chunks[key] = self.pool.submit(self._decode, *key)

    def retain(self, refs: list[WindowRef]) -> None:
        """Forget decoded chunks that none of `refs` needs (the current and the next step's windows)."""
        keep = {(ref.domain, ref.chunk) for ref in refs}
        for key in [k for k in self._chunks if k not in keep]:
            self._chunks.pop(key).cancel()

    def batch(self, refs: list[WindowRef]) -> Batch:
        """The windows `refs`, stacked in that order."""
        self.prefetch(refs)
        rows = [(self._chunks[(ref.domain, ref.chunk)].result(), ref.row - ref.chunk * self.orders[ref.domain].chunk_windows) for ref in refs]

        def stack(name: str, dtype=None) -> torch.Tensor | None:
            if getattr(rows[0][0], name) is None:
                return None
            stacked = np.stack([getattr(block, name)[row] for block, row in rows])
            return torch.from_numpy(stacked if dtype is None else stacked.astype(dtype))

        tokens = stack("tokens", np.int64)
        teacher = TeacherTargets(stack("ids", np.int64), stack("logprobs"), stack("valid"), stack("rest_logprobs"))
        rollout = None
        if rows[0][0].response_mask is not None:
            rollout = RolloutTensors(stack("target_logprobs"), stack("behaviour_logprobs"), stack("response_mask", np.float32),
                                     stack("sampling_logprobs"))
        return Batch(tokens[:, :-1], tokens[:, 1:], teacher, torch.as_tensor([ref.domain for ref in refs], dtype=torch.long), rollout,
                     stack("mask") if self.view is not None else None)

    def _decode(self, domain: int, chunk: int) -> "WindowBlock | StudentWindows":
        order = self.orders[domain]
        start = chunk * order.chunk_windows
        block = self.reader.read(order.domain, self.split, start, start + order.chunk_size(chunk))
        return block if self.view is None else self.view.windows(block)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
