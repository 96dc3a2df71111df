"""Format 3 against format 2 on the same stored values: bytes/token of each array.

Format 3 (Zarr v3 core codecs, per-position delta ids, integer log-probs with the rule in each array's attribute)
replaced format 2 (numcodecs `delta` along the flattened chunk and `fixedscaleoffset` inside zarr). For each given
store (written by this ddk-cache, so format 3), this writes a format-2 copy of the same values, as format 2's
writer laid them out, checks that both read back to identical entries, and prints bytes/token per array. Run:

    ddk-cache teacher-dump --teacher TEACHER --manifest M --out topk.zarr
    ddk-cache teacher-dump --teacher TEACHER --manifest M --out sampled.zarr --mode sampled --draws 32
    python benchmarks/bench_format3.py topk.zarr sampled.zarr --json benchmarks/results/format3_sizes.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import zarr

from ddk_cache.store import format as store_format
from ddk_cache.store.integrity import checksum_array, decoded_like_zarr, write_checksums
from ddk_cache.store.reader import CacheReader


def format_2_copy(src: str, dst: str) -> None:
    """The same values with format 2's arrays (numcodecs chains) and header version."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    reader, root = CacheReader(src), zarr.open_group(dst, mode="r+")
    layout = reader._layout()
    old = store_format.StoreLayout(layout.seq_len, layout.capture, layout.vocab_size, layout.chunk_windows, layout.shard_windows, 2)
    specs = old.array_specs()
    for domain in reader.domains:
        for split in store_format.SPLITS:
            group = root[f"{domain}/{split}"]
            for name in ("ids", "logprobs", "target_logprobs"):
                if name not in group:
                    continue
                values = reader.read_array(domain, split, name)
                del group[name]
                store_format._create(group, name, specs[name], len(values), old)
                stored = values.astype(specs[name].dtype)
                group[name][:] = stored
                write_checksums(checksum_array(group, name), 0, decoded_like_zarr(stored, group[name].dtype, group[name].filters), old.chunk_windows)
    header = dict(root.attrs["ddk_cache"])
    header.update(format_version=2, identity={**header["identity"], "format_version": 2})
    root.attrs["ddk_cache"] = header


def bytes_per_token(url: str) -> dict[str, float]:
    reader = CacheReader(url)
    tokens = sum(reader.domain_info(d).split(s).tokens for d in reader.domains for s in store_format.SPLITS)
    return {name: sum(reader.array(d, s, name).nbytes_stored() for d in reader.domains for s in store_format.SPLITS) / tokens
            for name in reader.data_arrays}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for store in args.stores:
        old = store.rstrip("/") + ".format2"
        format_2_copy(store, old)
        v2, v3 = CacheReader(old), CacheReader(store)
        for domain in v3.domains:
            for split in store_format.SPLITS:
                a, b = v2.read(domain, split), v3.read(domain, split)
                assert np.array_equal(a.ids, b.ids) and np.array_equal(a.target_logprobs, b.target_logprobs)
                assert a.logprobs is None or np.array_equal(a.logprobs, b.logprobs)
        sizes = {"format 2": bytes_per_token(old), "format 3": bytes_per_token(store)}
        totals = {label: sum(per.values()) for label, per in sizes.items()}
        rows.append({"store": store, "capture": v3.capture.to_attrs(), "bytes_per_token": sizes, "total": totals,
                     "change": totals["format 3"] / totals["format 2"] - 1})
        print(f"{store} ({v3.capture.mode}): format 2 {totals['format 2']:.2f} B/token, format 3 {totals['format 3']:.2f} "
              f"({rows[-1]['change']:+.1%}); " + ", ".join(f"{n} {sizes['format 2'][n]:.2f} -> {sizes['format 3'][n]:.2f}" for n in sizes["format 3"]))
        shutil.rmtree(old)
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/bench_format3.py " + " ".join(args.stores), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
