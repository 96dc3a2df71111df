"""Pack a domain of any size in bounded memory: documents streamed, split by a hash, windows emitted shard by shard.

The split rule `document-hash-v1` (recorded in the store's header as `packing.split_rule`):

- documents are read in source order (sources in manifest order, rows in file order) as a stream;
- document d goes to `valid` when u(d) < valid_fraction, else to `train`, where u(d) is the first 8
  bytes of sha256("<seed>\\0<domain>\\0<text>") read as a fraction of 2^64. No global permutation is
  needed, the rule is the same on every machine, and identical documents always land in the same
  split: a duplicate of a validation document can never reach the training windows;
- `valid` takes its documents until it holds `valid_sequences` windows; documents hashed to
  `valid` after that are dropped, not trained on; `train` takes its documents until it holds
  token_budget // seq_len windows, or to the end of the sources;
- each split joins its documents with EOS and cuts windows of seq_len + 1 tokens that overlap by
  one, as the in-memory packer (`packing.py`) does.

Memory: one batch of documents plus, per split, the tokens not yet cut into a shard of windows.
Nothing grows with the corpus. Progress (documents read; per split: windows, documents, and the
uncut tokens) is a small value committed after a shard is written, so a killed `pack` resumes
from the last commit: it skips the documents already read and rewrites, identically, any shard
written after that commit.

The in-memory packer stays the small-corpus path of `teacher-dump --manifest` (rule
`document-permutation-v1`: a seeded permutation of all documents, validation documents first).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddk_cache.data.manifest import DomainSpec
from ddk_cache.data.sources import iter_domain_documents
from ddk_cache.errors import ManifestError

SPLIT_RULE = "document-hash-v1"
BATCH_DOCUMENTS = 64  # documents tokenized together (the fast tokenizer encodes a batch in parallel)


def valid_share(seed: int, domain: str, text: str) -> float:
    """u(d) in [0, 1): where the document falls for the split rule."""
    digest = hashlib.sha256(f"{seed}\0{domain}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class SplitProgress:
    windows: int = 0  # windows cut (64-bit: Python ints)
    documents: int = 0  # documents whose tokens entered the split
    carry: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # tokens not yet in a written shard
    full: bool = False

    def to_attrs(self) -> dict[str, Any]:
        return {"windows": self.windows, "documents": self.documents, "full": self.full,
                "carry": base64.b64encode(np.ascontiguousarray(self.carry, dtype="<i4").tobytes()).decode()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "SplitProgress":
        carry = np.frombuffer(base64.b64decode(attrs["carry"]), dtype="<i4").astype(np.int32)
        return cls(int(attrs["windows"]), int(attrs["documents"]), carry, bool(attrs["full"]))


@dataclass
class PackProgress:
    """Where a domain's packing stands: enough to resume it exactly."""

    documents_read: int = 0
    train: SplitProgress = field(default_factory=SplitProgress)
    valid: SplitProgress = field(default_factory=SplitProgress)
    done: bool = False

    def to_attrs(self) -> dict[str, Any]:
        return {"documents_read": self.documents_read, "train": self.train.to_attrs(), "valid": self.valid.to_attrs(), "done": self.done}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "PackProgress":
        return cls(int(attrs["documents_read"]), SplitProgress.from_attrs(attrs["train"]), SplitProgress.from_attrs(attrs["valid"]),
                   bool(attrs["done"]))

    def snapshot(self) -> "PackProgress":
        copy = lambda s: SplitProgress(s.windows, s.documents, s.carry.copy(), s.full)  # noqa: E731
        return PackProgress(self.documents_read, copy(self.train), copy(self.valid), self.done)


@dataclass
class PackedShard:
    """Windows `[first_window, first_window + len)` of one split; `commit` is the progress to record once written."""

    split: str
    first_window: int
    windows: np.ndarray
    commit: PackProgress | None


class StreamPacker:
    """One domain's shards, in order, from its sources; resumable from a `PackProgress`."""

    def __init__(self, domain: DomainSpec, tokenizer, seq_len: int, seed: int, shard_windows: int, valid_fraction: float) -> None:
        if tokenizer.eos_token_id is None:
            raise ManifestError("the tokenizer has no EOS token: documents cannot be separated; use a tokenizer with eos_token")
        self.domain, self.tokenizer, self.seq_len, self.seed = domain, tokenizer, seq_len, seed
        self.shard_windows, self.valid_fraction, self.eos = shard_windows, valid_fraction, tokenizer.eos_token_id
        self.caps = {"train": domain.token_budget // seq_len if domain.token_budget is not None else None, "valid": domain.valid_sequences}

    def shards(self, progress: PackProgress | None = None) -> Iterator[PackedShard]:
        state = progress.snapshot() if progress is not None else PackProgress()
        if state.done:
            return
        documents = itertools.islice(iter_domain_documents(self.domain), state.documents_read, None)
        while not (state.train.full and state.valid.full):
            batch = list(itertools.islice(documents, BATCH_DOCUMENTS))
            if not batch:
                break
            self._add(batch, state)
            yield from self._cut(state, final=False)
        yield from self._cut(state, final=True)
        self._check_enough(state)
        state.done = True
        yield PackedShard("valid", state.valid.windows, np.zeros((0, self.seq_len + 1), dtype=np.int32), state.snapshot())

    def _add(self, batch: list[str], state: PackProgress) -> None:
        """Route a batch of documents to their splits and append their tokens (+ EOS)."""
        state.documents_read += len(batch)
        routed: dict[str, list[str]] = {"train": [], "valid": []}
        for text in batch:
            routed["valid" if valid_share(self.seed, self.domain.name, text) < self.valid_fraction else "train"].append(text)
        for name, texts in routed.items():
            split = getattr(state, name)
            if split.full or not texts:
                continue  # a full split takes nothing more: valid's later documents are dropped, not trained on
            encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            split.carry = np.concatenate([split.carry, *(np.asarray([*ids, self.eos], dtype=np.int32) for ids in encoded)])
            split.documents += len(texts)

    def _cut(self, state: PackProgress, final: bool) -> Iterator[PackedShard]:
        """Whole shards of windows from each split's tokens (at the end: the last, shorter one too)."""
        pieces = []
        for name in ("train", "valid"):
            split, cap, length = getattr(state, name), self.caps[name], self.seq_len
            while True:
                available = (len(split.carry) - 1) // length if len(split.carry) > 0 else 0
                room = self.shard_windows if cap is None else min(self.shard_windows, cap - split.windows)
                n = min(available, room)
                if n <= 0 or (n < self.shard_windows and n < room and not final):
                    break  # wait for more text, unless the split is capped here or the sources are over
                starts = np.arange(n) * length
                pieces.append((name, split.windows, split.carry[starts[:, None] + np.arange(length + 1)[None, :]]))
                split.carry = split.carry[n * length :]
                split.windows += n
                if cap is not None and split.windows >= cap:
                    split.full, split.carry = True, split.carry[:0]
                if final and n < self.shard_windows:
                    break
        for index, (name, first, windows) in enumerate(pieces):
            # commit only after the last shard of this step: its carry is then at most one shard of tokens
            yield PackedShard(name, first, windows, state.snapshot() if index == len(pieces) - 1 else None)

    def _check_enough(self, state: PackProgress) -> None:
        name, cap = self.domain.name, self.caps["valid"]
        if state.documents_read == 0:
            raise ManifestError(f"domain {name!r} has no text: its sources yielded no non-blank documents")
        if state.valid.windows < cap:
            raise ManifestError(
                f"domain {name!r}: its sources ran out with {state.valid.windows} of valid_sequences={cap} validation windows "
                f"(about {self.valid_fraction:.0%} of the documents go to validation): lower valid_sequences, raise --valid-fraction or add text"
            )
        if state.train.windows == 0:
            raise ManifestError(f"domain {name!r} has no text left for training: lower --valid-fraction or add text")
