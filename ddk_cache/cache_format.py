"""The on-disk contract of a ddk-cache store (Zarr v3); `docs/cache-format.md` is its prose twin.

Layout::

    <store>/                        root group, attrs["ddk_cache"] = header (provenance, status)
      <domain>/                     one group per manifest domain, attrs["ddk_cache_domain"]
        train/ and valid/           one group per split, each holding:
          tokens           int32   [N, seq_len + 1]     packed window; targets are tokens[:, 1:]
          topk_ids         int32   [N, seq_len, k]      teacher top-k next-token ids, descending
          topk_logprobs    float16 [N, seq_len, k]      their raw log-probs (temperature 1)
          target_logprobs  float32 [N, seq_len]         log-prob of the actual next token
          shard_done       uint8   [n_shards]           1 once every array's shard i is written

Arrays are sharded along windows: a shard (`shard_windows` windows) is the unit of writing
and of resume; inner chunks (`chunk_windows`) are the unit of reading.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

FORMAT_NAME = "ddk-cache"
FORMAT_VERSION = 1
HEADER_ATTR = "ddk_cache"
DOMAIN_ATTR = "ddk_cache_domain"
SPLITS = ("valid", "train")  # valid first: the teacher's validation loss is known early

TOKENS = "tokens"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TARGET_LOGPROBS = "target_logprobs"
SHARD_DONE = "shard_done"
DATA_ARRAYS = (TOKENS, TOPK_IDS, TOPK_LOGPROBS, TARGET_LOGPROBS)

CODEC_PROFILE = "blosc-zstd5-bitshuffle+crc32c"
TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB of top-k ids per inner chunk: one efficient streaming read
CHUNKS_PER_SHARD = 8


def compressors() -> tuple:
    """Per-chunk codecs: bit-shuffled zstd (ids and log-probs are low-entropy bit planes), then a checksum."""
    return (BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle), Crc32cCodec())


@dataclass(frozen=True)
class StoreLayout:
    """Array geometry shared by every split of a store."""

    seq_len: int
    k: int
    chunk_windows: int
    shard_windows: int
    codec_profile: str = CODEC_PROFILE

    @classmethod
    def choose(cls, seq_len: int, k: int, chunk_windows: int | None = None, shard_windows: int | None = None) -> "StoreLayout":
        """Defaults: ~1 MiB inner chunks of ids, 8 chunks per shard. Shards must be whole chunks."""
        if chunk_windows is None:
            chunk_windows = max(1, TARGET_CHUNK_BYTES // (seq_len * k * 4))
            if shard_windows is not None:
                chunk_windows = math.gcd(chunk_windows, shard_windows)
        if shard_windows is None:
            shard_windows = chunk_windows * CHUNKS_PER_SHARD
        if chunk_windows <= 0 or shard_windows <= 0 or shard_windows % chunk_windows:
            raise ValueError(f"shard_windows ({shard_windows}) must be a positive multiple of chunk_windows ({chunk_windows})")
        return cls(seq_len=seq_len, k=k, chunk_windows=chunk_windows, shard_windows=shard_windows)

    def to_attrs(self) -> dict:
        return asdict(self)

    def n_shards(self, n_windows: int) -> int:
        return -(-n_windows // self.shard_windows)

    def shard_slice(self, shard: int, n_windows: int) -> slice:
        start = shard * self.shard_windows
        return slice(start, min(start + self.shard_windows, n_windows))

    def shard_size(self, shard: int, n_windows: int) -> int:
        region = self.shard_slice(shard, n_windows)
        return region.stop - region.start

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-window trailing shape and dtype of each data array."""
        return {
            TOKENS: ((self.seq_len + 1,), "int32"),
            TOPK_IDS: ((self.seq_len, self.k), "int32"),
            TOPK_LOGPROBS: ((self.seq_len, self.k), "float16"),
            TARGET_LOGPROBS: ((self.seq_len,), "float32"),
        }


def open_store(url: str, read_only: bool, storage_options: dict | None = None):
    """A zarr store for a local path or an fsspec URL such as `s3://bucket/cache.zarr`."""
    if "://" in url and not url.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)


def create_split_arrays(group: zarr.Group, n_windows: int, layout: StoreLayout) -> None:
    """Create the data arrays and shard markers of one split with their final shapes.

    Shapes are fixed up front (never appended), so writers of different shards never touch
    shared metadata: that is what makes resume and multi-process writing safe.
    """
    for name, (trailing, dtype) in layout.array_specs().items():
        group.create_array(
            name,
            shape=(n_windows, *trailing),
            chunks=(layout.chunk_windows, *trailing),
            shards=(layout.shard_windows, *trailing),
            dtype=dtype,
            compressors=compressors(),
            fill_value=0,
            config={"write_empty_chunks": True},
        )
    group.create_array(SHARD_DONE, shape=(layout.n_shards(n_windows),), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)


def teacher_loss(target_logprobs: np.ndarray) -> tuple[float, float]:
    """Mean next-token cross-entropy (nats) and perplexity from actual-token log-probs."""
    loss = float(-np.mean(target_logprobs, dtype=np.float64))
    return loss, float(math.exp(loss))
