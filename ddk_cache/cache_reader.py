"""Open a ddk-cache store for reading, from a local path or an object-store URL.

The reader trusts only what the store says: the header's format version, the arrays'
own codecs and dtypes (zarr decodes them), and the status flag that tells a finished
store from one still being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ddk_cache.cache_format import (
    DATA_ARRAYS,
    DOMAIN_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_ATTR,
    SHARD_DONE,
    open_store,
)
from ddk_cache.errors import StoreError


@dataclass(frozen=True)
class WindowBlock:
    """Decoded rows `[start, stop)` of one split, log-probs as float32."""

    tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray


class CacheReader:
    def __init__(self, url: str, storage_options: dict | None = None, allow_incomplete: bool = False) -> None:
        self.url = url
        try:
            self.root = zarr.open_group(open_store(url, read_only=True, storage_options=storage_options), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no ddk-cache store at {url}: check the path (run teacher-dump to create one)") from None
        header = self.root.attrs.get(HEADER_ATTR)
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise StoreError(f"{url} is not a ddk-cache store (no '{HEADER_ATTR}' header)")
        version = header.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{url} has cache format version {version}, newer than this ddk-cache reads ({FORMAT_VERSION}): upgrade ddk-cache"
            )
        if header.get("status") != "complete" and not allow_incomplete:
            raise StoreError(f"{url} is incomplete (a dump is running or was killed): run teacher-dump again to finish it")
        self.header: dict[str, Any] = header

    @property
    def complete(self) -> bool:
        return self.header.get("status") == "complete"

    @property
    def domains(self) -> list[str]:
        return list(self.header["domains"])

    def has_domain(self, domain: str) -> bool:
        return domain in self.root

    def domain_info(self, domain: str) -> dict[str, Any]:
        return dict(self.root[domain].attrs[DOMAIN_ATTR])

    def array(self, domain: str, split: str, name: str) -> zarr.Array:
        return self.root[f"{domain}/{split}/{name}"]

    def shards_done(self, domain: str, split: str) -> tuple[int, int]:
        done = self.array(domain, split, SHARD_DONE)[:]
        return int(done.sum()), int(done.size)

    def read(self, domain: str, split: str, start: int = 0, stop: int | None = None) -> WindowBlock:
        """Rows `[start, stop)` of every data array; use chunk-aligned ranges for speed."""
        arrays = {name: self.array(domain, split, name)[start:stop] for name in DATA_ARRAYS}
        return WindowBlock(
            tokens=arrays["tokens"],
            topk_ids=arrays["topk_ids"],
            topk_logprobs=arrays["topk_logprobs"].astype(np.float32),
            target_logprobs=arrays["target_logprobs"].astype(np.float32),
        )

    def bytes_stored(self, domain: str, split: str | None = None) -> int:
        """Bytes on disk (or in the bucket) of a domain's arrays, optionally one split only."""
        splits = [split] if split else ["train", "valid"]
        return sum(self.array(domain, s, name).nbytes_stored() for s in splits for name in DATA_ARRAYS)
