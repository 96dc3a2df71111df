"""Why top-64 does not fit in 64 bytes/token: lower bounds and the codec alternatives not adopted.

On the real teacher's top-64 (same windows as bench_compression.py), per scored position:

- the in-sample static entropy of the id *set* (sum over the vocabulary of the binary entropy of
  each id's frequency of being in the top 64): what an ideal coder that knows those frequencies
  needs for the ids alone, before any value;
- ids: rank order vs sorted + delta, through blosc-zstd (what the store uses), zstd-22 and LZMA,
  with decode speed;
- log-probs at 1/16 and 1/32 nat: in rank order (delta-coded) vs in id order (what the store
  keeps, since its ids are sorted), and a square-root-probability quantizer at equal KL.

    python benchmarks/bench_codec_alternatives.py --teacher /work/teacher-smollm2 \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/bench_alt --windows 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from numcodecs import LZMA, Blosc, Zstd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression import teacher_pass  # noqa: E402
from bench_teacher_dump import derived_manifest  # noqa: E402

from ddk_cache.data.manifest import load_manifest  # noqa: E402

K = 64
CODECS = {
    "blosc-zstd9-shuffle": Blosc("zstd", 9, Blosc.SHUFFLE),
    "blosc-zstd9-bitshuffle": Blosc("zstd", 9, Blosc.BITSHUFFLE),
    "zstd22": Zstd(22),
    "lzma9": LZMA(preset=9),
}


def compressed(array: np.ndarray, positions: int) -> dict[str, dict[str, float]]:
    """Bytes per position and decode MB/s of `array` under each codec (one chunk per domain, as 8 store chunks)."""
    out = {}
    for name, codec in CODECS.items():
        encoded = codec.encode(np.ascontiguousarray(array))
        start = time.perf_counter()
        codec.decode(encoded)
        out[name] = {"bytes_per_position": len(encoded) / positions, "decode_mb_per_s": array.nbytes / (time.perf_counter() - start) / 1e6}
    return out


def kl_of_rounding(logprobs: np.ndarray, decoded: np.ndarray) -> float:
    """Mean KL(exact || decoded) over entries + rest, decoded renormalised with the exact rest."""
    p = np.exp(logprobs.astype(np.float64))
    rest = np.clip(1 - p.sum(-1, keepdims=True), 0, None)
    exact = np.concatenate([p, rest], -1)
    approx = np.concatenate([np.exp(decoded), rest], -1)
    approx /= approx.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(exact > 0, exact * np.log(exact / approx), 0).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(derived_manifest(args.manifest, args.out_dir, None, None))
    vocab, teacher_out = teacher_pass(args.teacher, manifest, args.windows, K, batch_size=4)
    ids_by_domain = [result.topk_ids for _, result in teacher_out.values()]
    lps_by_domain = [result.topk_logprobs for _, result in teacher_out.values()]

    all_ids = np.concatenate([ids.reshape(-1, K) for ids in ids_by_domain])
    frequency = np.bincount(all_ids.ravel(), minlength=vocab) / len(all_ids)
    f = frequency[(frequency > 0) & (frequency < 1)]
    set_entropy_bytes = float(-(f * np.log2(f) + (1 - f) * np.log2(1 - f)).sum() / 8)
    results: dict = {"command": " ".join(sys.argv), "k": K, "set_entropy_bytes_per_position": set_entropy_bytes, "arrays": {}}
    print(f"static entropy of the top-{K} id set: {set_entropy_bytes:.1f} bytes/position", flush=True)

    def record(name: str, per_domain: list[np.ndarray], extra: dict | None = None) -> None:
        rows = [compressed(a, a.shape[0] * a.shape[1]) for a in per_domain]
        summary = {codec: {key: float(np.mean([r[codec][key] for r in rows])) for key in rows[0][codec]} for codec in CODECS}
        results["arrays"][name] = {"codecs": summary, **(extra or {})}
        best = min(summary, key=lambda c: summary[c]["bytes_per_position"])
        text = " ".join(f"{c} {v['bytes_per_position']:.1f}" for c, v in summary.items())
        print(f"{name:40s} {text}  (best {best}, decode {summary[best]['decode_mb_per_s']:.0f} MB/s){'' if not extra else ' ' + json.dumps(extra)}", flush=True)

    orders = [np.argsort(ids, -1) for ids in ids_by_domain]
    sorted_ids = [np.take_along_axis(ids, o, -1) for ids, o in zip(ids_by_domain, orders)]
    record("ids, rank order, uint16", [ids.astype(np.uint16) for ids in ids_by_domain])
    record("ids, sorted, per-position delta, uint16", [np.diff(s, axis=-1, prepend=0).astype(np.uint16) for s in sorted_ids])
    for scale in (16, 32):
        rank_q = [np.round(-lp * scale).astype(np.int64) for lp in lps_by_domain]
        kl = float(np.mean([kl_of_rounding(lp, -q / scale) for lp, q in zip(lps_by_domain, rank_q)]))
        record(f"log-probs 1/{scale} nat, rank order, delta", [np.diff(q, axis=-1, prepend=0).astype(np.uint16) for q in rank_q], {"kl_mean": kl})
        record(f"log-probs 1/{scale} nat, id order", [np.take_along_axis(q, o, -1).astype(np.uint16) for q, o in zip(rank_q, orders)], {"kl_mean": kl})
    for step in (0.0015, 0.002):
        levels = [np.maximum(np.round(np.exp(np.take_along_axis(lp, o, -1) / 2) / step), 1) for lp, o in zip(lps_by_domain, orders)]
        kl = float(np.mean([kl_of_rounding(np.take_along_axis(lp, o, -1), 2 * np.log(q * step)) for lp, o, q in zip(lps_by_domain, orders, levels)]))
        record(f"sqrt(p) step {step}, id order", [q.astype(np.uint16) for q in levels], {"kl_mean": kl})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
