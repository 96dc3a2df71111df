"""`open_store`: the public, read-only face of a cache, for trainers that are not `ddk-cache distill`.

Why a separate object from `CacheReader`: the reader is the checked decoder the stages use, and
its methods follow their needs. Other teams need a small surface that stays put across releases:
what the store is (teacher, tokenizer, capture settings, window length), what it holds (domains,
splits, windows, tokens, bytes, the teacher's validation loss) and a way to read windows. Every
read still goes through the reader, so checksums and layout checks apply here too.

    store = ddk_cache.open_store("s3://bucket/run.zarr", storage_options={"anon": False})
    store.domains, store.seq_len, store.capture.mode, store.split("math", "train").windows
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddk_cache.errors import StoreError
from ddk_cache.store.capture import Capture
from ddk_cache.store.format import SPLITS
from ddk_cache.store.header import StoreHeader, TeacherInfo, TokenizerInfo
from ddk_cache.store.reader import CacheReader, WindowBlock


@dataclass(frozen=True)
class SplitSummary:
    """One domain's split: `windows` of `seq_len` scored positions, `tokens` = windows x seq_len."""

    domain: str
    split: str
    windows: int
    tokens: int
    documents: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "split": self.split, "windows": self.windows, "tokens": self.tokens, "documents": self.documents}


class Store:
    """A finished, scored ddk-cache store, opened read-only (format versions 1, 2 and 3)."""

    def __init__(self, reader: CacheReader) -> None:
        if reader.capture is None:
            raise StoreError(f"{reader.url} holds packed windows without teacher targets: score it with `ddk-cache teacher-dump --out {reader.url}`")
        self.reader = reader

    @property
    def url(self) -> str:
        return self.reader.url

    @property
    def format_version(self) -> int:
        return self.reader.format_version

    @property
    def header(self) -> StoreHeader:
        """The store's typed header (provenance included; `.to_dict()` gives the JSON as written); see docs/cache-format.md."""
        return self.reader.header

    @property
    def capture(self) -> Capture:
        """How the teacher's distribution was kept: mode (topk, topp, sampled), k, top_p, draws."""
        return self.reader.capture

    @property
    def seq_len(self) -> int:
        """Scored positions per window (a window holds seq_len + 1 tokens)."""
        return self.header.seq_len

    @property
    def vocab_size(self) -> int:
        """The teacher's vocabulary: every cached id is below it."""
        return self.teacher.vocab_size

    @property
    def teacher(self) -> TeacherInfo:
        """Which teacher scored the store: path or hub id, weight hash or revision, architecture, vocabulary."""
        return self.header.teacher

    @property
    def tokenizer(self) -> TokenizerInfo:
        """Name, class, size and fingerprint of the tokenizer the windows were made with."""
        return self.header.tokenizer

    def load_tokenizer(self):
        """That tokenizer itself (transformers), from the files the store carries: ids become text without the hub.

        Stores written before tokenizers were embedded raise one line naming `ddk-cache attach-tokenizer`."""
        return self.reader.load_tokenizer()

    @property
    def domains(self) -> list[str]:
        return self.reader.domains

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def split(self, domain: str, split: str) -> SplitSummary:
        self._check(domain, split)
        info = self.reader.domain_info(domain).split(split)
        return SplitSummary(domain, split, info.windows, info.tokens, info.documents)

    def teacher_valid_loss(self, domain: str) -> float:
        """The teacher's mean cross-entropy (nats) on the domain's `valid` windows, as recorded at dump time."""
        self._check(domain, "valid")
        return self.reader.domain_info(domain).teacher_valid_loss

    def bytes_stored(self, domain: str, split: str | None = None) -> int:
        self._check(domain, split or "train")
        return self.reader.bytes_stored(domain, split)

    def read(self, domain: str, split: str, start: int = 0, stop: int | None = None) -> WindowBlock:
        """Windows `[start, stop)` decoded and checked: tokens `[n, seq_len + 1]` and the sparse targets `[n, seq_len, W]`."""
        self._check(domain, split)
        return self.reader.read(domain, split, start, stop)

    def summary(self) -> dict[str, Any]:
        """Everything above as plain data, per domain and split (sizes, bytes, the teacher's validation loss)."""
        capture = self.capture
        return {
            "url": self.url, "format_version": self.format_version, "seq_len": self.seq_len, "vocab_size": self.vocab_size,
            "capture": {"mode": capture.mode, "k": capture.k, "top_p": capture.top_p, "draws": capture.draws},
            "teacher": self.teacher.to_dict(), "tokenizer": self.tokenizer.to_dict(),
            "domains": {d: {"teacher_valid_loss": self.teacher_valid_loss(d),
                            **{s: {**self.split(d, s).to_dict(), "bytes": self.bytes_stored(d, s)} for s in SPLITS}} for d in self.domains},
        }

    def _check(self, domain: str, split: str) -> None:
        if domain not in self.domains:
            raise StoreError(f"{self.url} has no domain {domain!r}: it has {', '.join(self.domains)}")
        if split not in SPLITS:
            raise StoreError(f"unknown split {split!r}: choose {' or '.join(SPLITS)}")


def open_store(url: str, storage_options: dict | None = None) -> Store:
    """Open a finished store at a local path or an fsspec URL (`s3://...`, with `storage_options` for credentials)."""
    return Store(CacheReader(url, storage_options=storage_options))
