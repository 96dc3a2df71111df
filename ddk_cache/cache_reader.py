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
    COUNTS,
    DOMAIN_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_ATTR,
    IDS,
    LOGPROBS,
    N_ENTRIES,
    READABLE_VERSIONS,
    REST_LOGPROBS,
    SHARD_DONE,
    TARGET_LOGPROBS,
    TOKENS,
    V1_DATA_ARRAYS,
    V1_TOPK_IDS,
    V1_TOPK_LOGPROBS,
    StoreLayout,
    open_store,
)
from ddk_cache.capture import Capture, capture_from_attrs, sampled_logprobs
from ddk_cache.errors import StoreError, first_line


@dataclass(frozen=True)
class WindowBlock:
    """Decoded rows `[start, stop)` of one split: the teacher's sparse targets, ready for the losses.

    `ids` / `logprobs` `[n, L, W]`: entries (log-probs as float32; in sampled mode log(count / draws)).
    `valid` `[n, L, W]` marks real entries (None when every slot is one: fixed top-k).
    `rest_logprobs` `[n, L]`: log of the teacher mass outside the entries (None: derive it as
    1 - sum(exp(logprobs)), version 1 stores; or no mass outside, sampled stores).
    """

    tokens: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    valid: np.ndarray | None
    rest_logprobs: np.ndarray | None
    target_logprobs: np.ndarray


class CacheReader:
    def __init__(self, url: str, storage_options: dict | None = None, allow_incomplete: bool = False) -> None:
        self.url = url
        try:
            self.root = zarr.open_group(open_store(url, read_only=True, storage_options=storage_options), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no ddk-cache store at {url}: check the path (run teacher-dump to create one)") from None
        except (OSError, ValueError) as exc:  # object stores: refused credentials, unreachable endpoint, bad URL
            raise StoreError(f"cannot open {url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None
        header = self.root.attrs.get(HEADER_ATTR)
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise StoreError(f"{url} is not a ddk-cache store (no '{HEADER_ATTR}' header)")
        version = header.get("format_version")
        if not isinstance(version, int) or version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise StoreError(
                f"{url} has cache format version {version}; this ddk-cache reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: " + ("upgrade ddk-cache" if newer else "re-create the store with teacher-dump")
            )
        if header.get("status") != "complete" and not allow_incomplete:
            raise StoreError(f"{url} is incomplete (a dump is running or was killed): run teacher-dump again to finish it")
        self.header: dict[str, Any] = header
        self.format_version: int = version
        # capture settings, and the names of the arrays that hold data (what `bytes_stored` counts), for this version and mode
        if "capture" not in header:  # packed by `ddk-cache pack`, not scored yet: windows only
            self.capture = None
            self.data_arrays = (TOKENS,)
        elif version == 1:  # rank-ordered top-k, float16 log-probs, always k entries
            self.capture = Capture(mode="topk", k=int(header["capture"]["k"]), logprob_scale=0)
            self.data_arrays: tuple[str, ...] = V1_DATA_ARRAYS
        else:
            self.capture: Capture | None = capture_from_attrs(header["capture"])
            layout = header["layout"]
            self.data_arrays = tuple(StoreLayout(int(layout["seq_len"]), self.capture, int(layout["vocab_size"]), 1, 1).array_specs())

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
        if self.capture is None:
            return 0, 0
        done = self.array(domain, split, SHARD_DONE)[:]
        return int(done.sum()), int(done.size)

    def read(self, domain: str, split: str, start: int = 0, stop: int | None = None) -> WindowBlock:
        """Rows `[start, stop)` of every data array, decoded; use chunk-aligned ranges for speed."""
        read = lambda name: self.array(domain, split, name)[start:stop]  # noqa: E731
        tokens, target = read(TOKENS), read(TARGET_LOGPROBS).astype(np.float32)
        if self.format_version == 1:
            return WindowBlock(tokens, read(V1_TOPK_IDS), read(V1_TOPK_LOGPROBS).astype(np.float32), None, None, target)
        ids, n_entries = read(IDS).astype(np.int32), read(N_ENTRIES)
        width = ids.shape[-1]
        valid = None if self.capture.mode == "topk" else np.arange(width, dtype=n_entries.dtype) < n_entries[..., None]
        if self.capture.mode == "sampled":
            logprobs = sampled_logprobs(read(COUNTS), int(self.capture.draws))
            logprobs[~valid] = 0.0
            return WindowBlock(tokens, ids, logprobs, valid, None, target)
        return WindowBlock(tokens, ids, read(LOGPROBS).astype(np.float32), valid, read(REST_LOGPROBS).astype(np.float32), target)

    def mean_entries(self, domain: str, split: str) -> float:
        """Mean number of entries per position (variable in topp and sampled stores)."""
        if self.capture is None:
            return 0.0
        if self.format_version == 1 or self.capture.mode == "topk":
            return float(self.capture.width)
        n_entries = self.array(domain, split, N_ENTRIES)[:]
        return float(n_entries.mean()) if n_entries.size else 0.0

    def bytes_stored(self, domain: str, split: str | None = None) -> int:
        """Bytes on disk (or in the bucket) of a domain's arrays, optionally one split only."""
        splits = [split] if split else ["train", "valid"]
        return sum(self.array(domain, s, name).nbytes_stored() for s in splits for name in self.data_arrays)
