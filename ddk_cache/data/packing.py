"""Tokenize a domain's documents, split them into train/valid by document, and pack windows.

Why this shape:
- The split is by *document*, before packing, so no validation text leaks into training
  windows. Documents are visited in a seeded permutation (seed + domain name), so the
  split and the windows are the same on every run: resuming a dump relies on it.
- Documents are joined with EOS into one token stream per split and cut into windows of
  `seq_len + 1` tokens that overlap by one: inputs are `window[:-1]`, next-token targets
  `window[1:]`. So every position, the last one included, has a known target.
- Tokenizing stops as soon as the train token budget is filled, so a small budget over a
  large source does not tokenize the whole source.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ddk_cache.errors import ManifestError

TOKENIZE_BATCH_DOCUMENTS = 256


@dataclass(frozen=True)
class PackedSplit:
    """Windows of one split: int32 `[n_windows, seq_len + 1]`, and how many documents fed them."""

    windows: np.ndarray
    n_documents: int

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def n_tokens(self) -> int:
        """Scored positions: `seq_len` per window."""
        return int(self.windows.shape[0] * (self.windows.shape[1] - 1))

    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.windows, dtype="<i4").tobytes()).hexdigest()


@dataclass(frozen=True)
class PackedDomain:
    name: str
    train: PackedSplit
    valid: PackedSplit


def document_order(n_documents: int, seed: int, domain_name: str) -> np.ndarray:
    """The seeded visiting order of a domain's documents (stable across runs and machines)."""
    rng = np.random.default_rng([seed, zlib.crc32(domain_name.encode())])
    return rng.permutation(n_documents)


def pack_domain(
    name: str,
    documents: Sequence[str],
    tokenizer,
    seq_len: int,
    valid_sequences: int,
    token_budget: int | None,
    seed: int,
) -> PackedDomain:
    """Split `documents` into validation and training windows for one domain."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ManifestError("the tokenizer has no EOS token: documents cannot be separated; use a tokenizer with eos_token")
    order = document_order(len(documents), seed, name)
    token_docs = _tokenized_in_order(documents, order, tokenizer, eos)

    valid_needed = valid_sequences * seq_len + 1
    valid_stream, valid_docs, seen_tokens = _take_tokens(token_docs, valid_needed)
    if len(valid_stream) < valid_needed:
        raise ManifestError(
            f"domain {name!r} has only {seen_tokens} tokens, fewer than the {valid_needed} that "
            f"valid_sequences={valid_sequences} windows of seq_len={seq_len} need, and training needs more: "
            "lower valid_sequences or add text"
        )
    train_windows_cap = token_budget // seq_len if token_budget is not None else None
    train_needed = train_windows_cap * seq_len + 1 if train_windows_cap is not None else None
    train_stream, train_docs, _ = _take_tokens(token_docs, train_needed)
    if len(train_stream) < seq_len + 1:
        raise ManifestError(
            f"domain {name!r} has no text left for training after {valid_sequences} validation windows: "
            "lower valid_sequences or add text"
        )
    valid = PackedSplit(_cut_windows(valid_stream, seq_len, valid_sequences), valid_docs)
    train = PackedSplit(_cut_windows(train_stream, seq_len, train_windows_cap), train_docs)
    return PackedDomain(name=name, train=train, valid=valid)


def _tokenized_in_order(documents: Sequence[str], order: np.ndarray, tokenizer, eos: int):
    """Yield each document's token ids followed by EOS, in `order`, tokenizing in batches."""
    for start in range(0, len(order), TOKENIZE_BATCH_DOCUMENTS):
        batch = [documents[i] for i in order[start : start + TOKENIZE_BATCH_DOCUMENTS]]
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            yield np.asarray([*ids, eos], dtype=np.int32)


def _take_tokens(token_docs, needed: int | None) -> tuple[np.ndarray, int, int]:
    """Concatenate whole documents until `needed` tokens (or the end); returns stream, docs used, tokens."""
    parts: list[np.ndarray] = []
    total = 0
    for ids in token_docs:
        parts.append(ids)
        total += len(ids)
        if needed is not None and total >= needed:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream, len(parts), total


def _cut_windows(stream: np.ndarray, seq_len: int, max_windows: int | None) -> np.ndarray:
    n_windows = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    starts = np.arange(n_windows) * seq_len
    return stream[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
