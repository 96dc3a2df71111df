"""What a static chain of Zarr v3 core codecs can do for the id sets, against their entropy (issue 27).

The ids are format 3's stored integers exactly as a store holds them (sorted per position, delta-coded within the
position, `uint16`; docs/cache-format.md), read from existing stores, and re-written chunk for chunk (the stores'
own chunk shape) through other chains of core codecs only (`transpose`, `bytes`, `blosc`, `zstd`), so that any
Zarr v3 reader could still open them. Printed per chain: stored bytes per scored position and the decode speed.
The reference for top-64 is RESULTS.md's in-sample static entropy of the id *set* (55.3 bytes/position on the
same teacher and corpora, `bench_codec_alternatives.py`): what an ideal coder that knows each id's frequency needs.

    python benchmarks/bench_id_codecs.py /tmp/q/quality.zarr /tmp/q/sampled16.zarr /tmp/q/headtail4x16.zarr \
        --json benchmarks/results/id_codecs.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, BytesCodec, TransposeCodec, ZstdCodec

from ddk_cache.store.format import IDS
from ddk_cache.store.reader import CacheReader


def chains() -> dict[str, tuple[list, list]]:
    """name -> (array-to-array codecs, bytes-to-bytes codecs). The first is what format 3 writes."""
    def blosc(level: int, shuffle: BloscShuffle) -> BloscCodec:
        return BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=2)

    rank_major = [TransposeCodec(order=(0, 2, 1))]  # a window's ids rank by rank: the j-th deltas of every position together
    return {
        "store: blosc zstd clevel 6, byte shuffle": ([], [blosc(6, BloscShuffle.shuffle)]),
        "blosc zstd clevel 9, byte shuffle": ([], [blosc(9, BloscShuffle.shuffle)]),
        "blosc zstd clevel 6, bit shuffle": ([], [blosc(6, BloscShuffle.bitshuffle)]),
        "blosc zstd clevel 6, no shuffle": ([], [blosc(6, BloscShuffle.noshuffle)]),
        "zstd 3": ([], [ZstdCodec(level=3)]),
        "zstd 19": ([], [ZstdCodec(level=19)]),
        "zstd 22": ([], [ZstdCodec(level=22)]),
        "transpose rank-major, blosc zstd 6 byte shuffle": (rank_major, [blosc(6, BloscShuffle.shuffle)]),
        "transpose rank-major, blosc zstd 6 bit shuffle": (rank_major, [blosc(6, BloscShuffle.bitshuffle)]),
        "transpose rank-major, zstd 19": (rank_major, [ZstdCodec(level=19)]),
    }


def measure(stored: np.ndarray, chunks: tuple[int, ...], filters: list, compressors: list) -> tuple[int, float]:
    """Stored bytes of `stored` through one chain, and its decode speed (MB/s of decoded ids)."""
    objects: dict = {}  # the store's own key -> bytes: the chunks' sizes exactly, without the array's zarr.json
    array = zarr.create_array(zarr.storage.MemoryStore(objects), shape=stored.shape, chunks=chunks, dtype=stored.dtype,
                              filters=filters, serializer=BytesCodec(), compressors=compressors, fill_value=0)
    array[:] = stored
    started = time.perf_counter()
    back = array[:]
    seconds = time.perf_counter() - started
    assert np.array_equal(back, stored), "every chain here is lossless"
    return sum(len(value) for key, value in objects.items() if key != "zarr.json"), stored.nbytes / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {}
    for path in args.stores:
        reader = CacheReader(str(path))
        capture = reader.capture
        rows, blocks = {}, []
        for domain in reader.domains:
            array = reader.array(domain, "train", IDS)  # zarr decodes the codecs; what is left is the stored integers
            blocks.append((array[:], array.chunks))
        positions = sum(stored.shape[0] * stored.shape[1] for stored, _ in blocks)
        for name, (filters, compressors) in chains().items():
            total, speeds = 0, []
            for stored, chunks in blocks:
                size, speed = measure(stored, chunks, filters, compressors)
                total, speeds = total + size, speeds + [speed]
            rows[name] = {"bytes_per_position": round(total / positions, 2), "decode_mb_s": round(float(np.median(speeds)))}
            print(f"{path.name} ({capture.describe()}): {name}: {rows[name]['bytes_per_position']} B/position, "
                  f"{rows[name]['decode_mb_s']} MB/s", flush=True)
        result[path.name] = {"capture": capture.describe(), "positions": positions, "chains": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
