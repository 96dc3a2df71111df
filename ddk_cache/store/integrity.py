"""Content checksums of every inner chunk, bound to their place: what lets a reader refuse a damaged store.

Why zarr's own crc32c is not enough: it is stored *inside* each chunk, so it proves only that the
bytes of a chunk agree with themselves. A shard object copied over another shard (of the same
array, another domain, or valid -> train) still decodes cleanly; a deleted shard object reads back
as the fill value, zeros, with no error at all; an edited `scale` in an array's `zarr.json` changes
every decoded value and no codec notices. Each of these trained a student silently.

So the writer records, for every inner chunk of every data array, the CRC-32 of the chunk's
*decoded* values, in a small array beside the data (`<split>/crc32/<array>`, one uint32 per chunk,
one object per shard, so writers of different shards never share an object). The position is the
binding: a chunk's checksum lives at the chunk's own index, so moved, missing or differently
decoded data fails it. The reader checks every chunk it decodes before handing rows out; `verify`
checks all of them. Decoded values, not stored bytes, because the reader only ever sees decoded
values (zarr reads chunks from inside shards by byte range), and because re-compressing with other
codec settings (lossless) must not break the checksums.

Stores written before checksums existed carry no `crc32` groups and no `integrity` header key: they
are read as before, and `verify` says that only its structural checks apply.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import zarr

CHECKSUM_GROUP = "crc32"
INTEGRITY = {"checksums": "crc32 (zlib) of each inner chunk's decoded values, little-endian", "group": CHECKSUM_GROUP}


def decoded_like_zarr(values: np.ndarray, dtype: str, filters: tuple) -> np.ndarray:
    """What zarr will decode `values` to: cast to the array's dtype, then the lossy filters' round trip.

    Only numcodecs' FixedScaleOffset loses information among the codecs ddk-cache writes (Delta,
    blosc and crc32c are exact), and the numcodecs codec itself is what zarr runs, so this is exact.
    """
    import numcodecs  # heavy: numcodecs' codecs only when a chunk is checked

    decoded = np.asarray(values).astype(dtype, copy=False)
    for codec in filters:
        if codec.codec_name == "numcodecs.fixedscaleoffset":
            numcodec = numcodecs.get_codec(dict(codec.codec_config))
            decoded = numcodec.decode(numcodec.encode(decoded)).reshape(decoded.shape).astype(dtype, copy=False)
    return decoded


def chunk_checksums(decoded: np.ndarray, chunk_windows: int) -> np.ndarray:
    """One CRC-32 per `chunk_windows` rows (the last chunk may be shorter), uint32."""
    little = np.ascontiguousarray(decoded, dtype=decoded.dtype.newbyteorder("<"))
    return np.array([zlib.crc32(little[i : i + chunk_windows].data) for i in range(0, len(little), chunk_windows)], dtype=np.uint32)


def create_checksum_array(split_group: zarr.Group, name: str, n_windows: int, chunk_windows: int, shard_windows: int) -> None:
    """The checksums of data array `name`: one per inner chunk, one object per shard."""
    group = split_group.require_group(CHECKSUM_GROUP)
    group.create_array(name, shape=(-(-n_windows // chunk_windows),), chunks=(shard_windows // chunk_windows,), dtype="uint32",
                       compressors=None, fill_value=0, overwrite=True)


def has_checksums(split_group: zarr.Group, name: str) -> bool:
    return CHECKSUM_GROUP in split_group and name in split_group[CHECKSUM_GROUP]


def checksum_array(split_group: zarr.Group, name: str) -> zarr.Array:
    return split_group[f"{CHECKSUM_GROUP}/{name}"]


def resize_checksums(split_group: zarr.Group, name: str, n_windows: int, chunk_windows: int) -> None:
    """Follow a growing (packing) array: as many checksums as it has chunks."""
    array = checksum_array(split_group, name)
    n_chunks = -(-n_windows // chunk_windows)
    if array.shape[0] != n_chunks:
        array.resize((n_chunks,))


def write_checksums(checksums: zarr.Array, first_window: int, decoded: np.ndarray, chunk_windows: int) -> None:
    """Record the checksums of rows `[first_window, first_window + len(decoded))`, a chunk-aligned range, in
    `checksums` (`checksum_array`: the caller opens it, once per array if it writes many shards)."""
    if first_window % chunk_windows:
        raise ValueError(f"checksummed writes start on a chunk boundary, not window {first_window}")
    first_chunk = first_window // chunk_windows
    sums = chunk_checksums(decoded, chunk_windows)
    checksums[first_chunk : first_chunk + len(sums)] = sums


def mismatched_chunks(expected: np.ndarray, decoded: np.ndarray, first_chunk: int, chunk_windows: int) -> list[int]:
    """Indices of the chunks (from `first_chunk`) whose decoded rows do not match their recorded checksum."""
    actual = chunk_checksums(decoded, chunk_windows)
    return [first_chunk + int(i) for i in np.flatnonzero(actual != expected[: len(actual)])]


def aligned(start: int, stop: int, chunk_windows: int, n_windows: int) -> tuple[int, int]:
    """The smallest chunk-aligned row range holding `[start, stop)`."""
    return (start // chunk_windows) * chunk_windows, min(-(-stop // chunk_windows) * chunk_windows, n_windows)


def filters_signature(filters: Any) -> list[tuple[str, dict]]:
    """The array-to-array codecs as comparable (name, config) pairs: what decides the decoded values."""
    return [(codec.codec_name, {k: v for k, v in dict(codec.codec_config).items() if k != "id"}) for codec in filters]
