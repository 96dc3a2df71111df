"""PyTorch datasets over a cache, for the HF `Trainer`, Lightning or a plain loop.

Each item is one window as tensors, named the way Hugging Face code expects:

- `input_ids` `[L]` (int64): the window's first L tokens;
- `labels` `[L]` (int64): the next token at each position, *already shifted* (labels[t] is the
  token after input_ids[t]). Give them to `kd_loss`'s CE partner, not to a HF model's `labels=`
  argument, which would shift them once more;
- `teacher_ids`, `teacher_logprobs` `[L, W]`: the teacher's cached entries for the next token at
  each position (log-probs as float32; sampled stores: log(count / draws));
- `teacher_valid` `[L, W]` (bool; only where the number of entries varies: top-p and sampled
  stores) and `teacher_rest` `[L]` (the log of the teacher mass outside the entries; version-2
  top-k and top-p stores);
- `domain` (int64 scalar): the domain's index in `store.domains`;
- `teacher_sampled` (bool scalar tensor): the entries are sampled counts, not log-probs (`kd_loss`
  then refuses the settings that would make its estimate biased).

Every value is a tensor, so a batch is what accelerate, DeepSpeed and `datasets` know how to
concatenate, slice and convert: under several GPUs the HF Trainer dispatches batches by
concatenating them, and a Python bool there fails ("Can only concatenate tensors"). `collate`
stacks items into a batch of the same names. `CacheDataset` is map-style over one
domain's split; `CacheMixture` is an endless iterable over several domains drawn with fixed
weights (DDK's moving weights are `ddk-cache distill`'s job: they need periodic evaluation).

A student with another tokenizer (`student_tokenizer=`, the store must embed its teacher's tokenizer): items
are in the student's tokens, re-tokenized from the cached window's text and aligned by byte spans
(`cross_tokenizer_windows.py`, what `distill --cross-tokenizer` reads). `input_ids`/`labels` `[L]` are the
student's (L: `seq_len`, estimated from the first windows when not given), `loss_mask` `[L]` marks its real
positions (CE counts them), `teacher_ids` are the aligned teacher entries' *student* ids (-1 where no student
token has the entry's bytes: the entry still counts in `cross_tokenizer_kd`'s rest bucket and ULD term),
`teacher_valid` is false at unaligned positions (KD skips them), and `byte_count` is the number of text bytes
the window's labels stand for, so that losses of different tokenizers compare per byte.

Decoding is per chunk (zarr's unit of decompression): a dataset keeps the last few decoded
chunks, so reading windows in order, or a shuffled order that stays inside chunks, costs one
decode per chunk. Use `num_workers=0` in a DataLoader (or `multiprocessing_context="spawn"`):
zarr's I/O thread does not survive a fork (see window_loader.py); decoding releases the GIL, and a
batch of windows decodes far faster than a student consumes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ddk_cache.errors import StoreError
from ddk_cache.store.api import Store, open_store
from ddk_cache.store.fingerprints import tokenizer_fingerprint
from ddk_cache.store.format import TOKENS
from ddk_cache.store.reader import WindowBlock
from ddk_cache.training.cross_tokenizer_windows import CrossTokenizerView, StudentWindows
from ddk_cache.training.window_loader import domain_orders


class _ChunkCache:
    """The last `size` decoded chunks of a store, by (domain, split, chunk); seen through `view` when given."""

    def __init__(self, store: Store, size: int, view: CrossTokenizerView | None = None) -> None:
        self.store, self.size, self.view = store, size, view
        self._blocks: OrderedDict[tuple[str, str, int], WindowBlock | StudentWindows] = OrderedDict()

    def window(self, domain: str, split: str, index: int) -> tuple[WindowBlock | StudentWindows, int]:
        tokens = self.store.reader.array(domain, split, TOKENS)
        per_chunk, windows = tokens.chunks[0], tokens.shape[0]
        chunk = index // per_chunk
        key = (domain, split, chunk)
        if key not in self._blocks:
            start = chunk * per_chunk
            block = self.store.read(domain, split, start, min(start + per_chunk, windows))
            self._blocks[key] = self.view.windows(block) if self.view is not None else block
            while len(self._blocks) > self.size:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        return self._blocks[key], index - chunk * per_chunk


def window_item(block: WindowBlock, row: int, domain_index: int, sampled: bool) -> dict[str, Any]:
    """Row `row` of a decoded block as the tensors named in the module docstring."""
    tokens = torch.from_numpy(block.tokens[row].astype(np.int64))
    item = {
        "input_ids": tokens[:-1],
        "labels": tokens[1:],
        "teacher_ids": torch.from_numpy(block.ids[row].astype(np.int64)),
        "teacher_logprobs": torch.from_numpy(np.ascontiguousarray(block.logprobs[row], dtype=np.float32)),
        "domain": torch.tensor(domain_index, dtype=torch.long),
        "teacher_sampled": torch.tensor(sampled),
    }
    if block.valid is not None:
        item["teacher_valid"] = torch.from_numpy(np.ascontiguousarray(block.valid[row]))
    if block.rest_logprobs is not None:
        item["teacher_rest"] = torch.from_numpy(np.ascontiguousarray(block.rest_logprobs[row], dtype=np.float32))
    return item


def student_item(windows: StudentWindows, row: int, domain_index: int, sampled: bool) -> dict[str, Any]:
    """Row `row` of windows seen by a student of another tokenizer, as the tensors named in the module docstring."""
    tokens = torch.from_numpy(windows.tokens[row])
    return {
        "input_ids": tokens[:-1],
        "labels": tokens[1:],
        "loss_mask": torch.from_numpy(windows.mask[row]),
        "teacher_ids": torch.from_numpy(windows.ids[row]),
        "teacher_logprobs": torch.from_numpy(windows.logprobs[row]),
        "teacher_valid": torch.from_numpy(windows.valid[row]),
        "byte_count": torch.tensor(int(windows.units[row]), dtype=torch.long),
        "domain": torch.tensor(domain_index, dtype=torch.long),
        "teacher_sampled": torch.tensor(sampled),
    }


def _item(block: WindowBlock | StudentWindows, row: int, domain_index: int, sampled: bool) -> dict[str, Any]:
    return (student_item if isinstance(block, StudentWindows) else window_item)(block, row, domain_index, sampled)


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of items into one batch (tensors gain a leading batch dimension)."""
    if not items:
        raise ValueError("collate needs at least one item")
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}


def _as_store(store: Store | str, storage_options: dict | None) -> Store:
    return store if isinstance(store, Store) else open_store(store, storage_options=storage_options)


def _student_view(store: Store, student_tokenizer, seq_len: int | None, domains: list[str]) -> CrossTokenizerView | None:
    """The alignment for `student_tokenizer` (None: the teacher's own tokens); refused when it is the teacher's."""
    if student_tokenizer is None:
        return None
    if tokenizer_fingerprint(student_tokenizer) == store.header.tokenizer.fingerprint:
        raise StoreError("student_tokenizer is the cache's own tokenizer: leave it out to read the cached tokens as they are")
    return CrossTokenizerView.for_store(store.reader, student_tokenizer, seq_len, domains)


class CacheDataset(Dataset):
    """Map-style: item i is window i of one domain's `train` or `valid` split (in `student_tokenizer`'s tokens
    when given, `seq_len` of them per window)."""

    def __init__(self, store: Store | str, domain: str, split: str = "train", storage_options: dict | None = None,
                 cached_chunks: int = 2, student_tokenizer=None, seq_len: int | None = None) -> None:
        self.store = _as_store(store, storage_options)
        self.domain, self.split = domain, split
        self.windows = self.store.split(domain, split).windows  # also checks domain and split
        self._domain_index = self.store.domains.index(domain)
        self._sampled = self.store.capture.drawn
        self.view = _student_view(self.store, student_tokenizer, seq_len, [domain])
        self._chunks = _ChunkCache(self.store, max(1, cached_chunks), self.view)

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.windows <= index < self.windows:
            raise IndexError(f"window {index} out of range: {self.domain}/{self.split} has {self.windows}")
        block, row = self._chunks.window(self.domain, self.split, index % self.windows)
        return _item(block, row, self._domain_index, self._sampled)


class CacheMixture(IterableDataset):
    """Endless windows from several domains, each drawn with probability `weights[domain]`.

    Every domain is visited in a seeded order that shuffles whole chunks, then the windows inside
    each (the order `distill` uses), and starts over reshuffled when exhausted. `weights`
    defaults to uniform; `"manifest"` takes the manifest's weights. Under several DataLoader
    workers or data-parallel ranks, pass `rank` / `world_size` (workers are split further) so
    each process takes every n-th draw of one shared stream: no window twice in a round.
    `student_tokenizer` / `seq_len`: items in another tokenizer's tokens, as `CacheDataset`'s.
    """

    def __init__(self, store: Store | str, weights: Mapping[str, float] | str | None = None, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, storage_options: dict | None = None, cached_chunks: int = 2,
                 student_tokenizer=None, seq_len: int | None = None) -> None:
        self.store = _as_store(store, storage_options)
        self.split, self.seed, self.rank, self.world_size = split, seed, rank, world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        domains = self.store.domains
        if weights == "manifest":
            weights = self.store.header.manifest_weights()
        raw = {d: 1.0 for d in domains} if weights is None else dict(weights)
        unknown = set(raw) - set(domains)
        if unknown:
            raise StoreError(f"weights name domains the store lacks: {', '.join(sorted(unknown))} (it has {', '.join(domains)})")
        self.domains = [d for d in domains if raw.get(d, 0) > 0]
        if not self.domains or any(raw[d] < 0 for d in raw):
            raise ValueError("weights must be >= 0, with at least one domain above 0")
        total = sum(raw[d] for d in self.domains)
        self.weights = np.array([raw[d] / total for d in self.domains])
        self._orders = domain_orders(self.store.reader, self.domains, seed, split)  # the visiting order distill uses
        self._domain_index = [domains.index(d) for d in self.domains]
        self._sampled = self.store.capture.drawn
        self._cached_chunks = max(1, cached_chunks)
        self.view = _student_view(self.store, student_tokenizer, seq_len, self.domains)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        stride, offset = self.world_size * workers, self.rank * workers + worker_id
        chunks = _ChunkCache(self.store, self._cached_chunks * len(self.domains), self.view)
        rng = np.random.default_rng([self.seed, 0x31C7])
        cursors = [[0, 0] for _ in self.domains]  # (epoch, position) per domain
        draw = 0
        while True:
            picks = rng.choice(len(self.domains), size=256, p=self.weights)
            for pick in picks:
                epoch, position = cursors[pick]
                cursors[pick] = [epoch + 1, 0] if position + 1 == self._orders[pick].n_windows else [epoch, position + 1]
                mine, draw = draw % stride == offset, draw + 1
                if not mine:  # every process advances the same cursors; each yields its share
                    continue
                order = self._orders[pick]
                _, row = order.locate(epoch, position)
                block, in_chunk = chunks.window(order.domain, self.split, row)
                yield _item(block, in_chunk, self._domain_index[pick], self._sampled)
