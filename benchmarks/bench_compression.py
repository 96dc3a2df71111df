"""Cache size vs fidelity on the real teacher: bytes/token on disk and the decoded distribution's
KL from the exact one, for each capture mode and setting, per domain and overall; and the
reader's decode rate.

One teacher pass per domain (top-128 + 64 draws per position, float32) feeds every setting, so
all settings see the same distributions. Each setting is written through the real writer
(`CacheWriter.write_shard`, the store's own codecs) and read back through `CacheReader`.

Fidelity (top-k, top-p): per position, KL(exact || decoded) over the kept entries plus the rest
bucket, where "exact" is the engine's float32 log-probs with rest = 1 - sum(exp) in float64 and
"decoded" is what the losses see (stored entries and stored rest, renormalised together).
Sampled mode is an unbiased estimate, not an approximation of fixed entries: its row reports
the distinct entries per position instead.

    python benchmarks/bench_compression.py --teacher /work/teacher-smollm2 \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/bench_compression --windows 8
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_teacher_dump import derived_manifest  # noqa: E402

from ddk_cache.data.manifest import Manifest, load_manifest  # noqa: E402
from ddk_cache.data.packing import pack_domain  # noqa: E402
from ddk_cache.data.sources import load_domain_documents  # noqa: E402
from ddk_cache.engines.base import TopKResult  # noqa: E402
from ddk_cache.engines.hf import HFTeacherEngine  # noqa: E402
from ddk_cache.stages.teacher_dump import load_tokenizer  # noqa: E402
from ddk_cache.store.capture import Capture, EncodedTargets, encode_targets  # noqa: E402
from ddk_cache.store.format import HEADER_ATTR, StoreLayout, create_split_arrays, zarr_store  # noqa: E402
from ddk_cache.store.header import bare_header  # noqa: E402
from ddk_cache.store.reader import CacheReader  # noqa: E402
from ddk_cache.store.writer import CacheWriter  # noqa: E402

MAX_K, DRAWS = 128, 64


def settings() -> list[Capture]:
    grid = [Capture(mode="topk", k=k, logprob_scale=scale) for k in (16, 32, 64, 128) for scale in (0, 8, 16, 32, 64)]
    grid += [Capture(mode="topp", k=k, top_p=p, logprob_scale=32) for k, p in ((64, 0.9), (128, 0.95), (64, 0.95))]
    grid += [Capture(mode="sampled", draws=n) for n in (16, 32, 64)]
    return grid


def label(capture: Capture) -> str:
    if capture.mode == "sampled":
        return f"sampled n={capture.draws}"
    scale = f"1/{capture.logprob_scale} nat" if capture.logprob_scale else "float16"
    return f"topk k={capture.k} {scale}" if capture.mode == "topk" else f"topp p={capture.top_p} k<={capture.k} {scale}"


def kl_exact_vs_decoded(exact: EncodedTargets, block) -> np.ndarray:
    """Per-position KL(exact || decoded) over the entries the store keeps plus the rest bucket.

    `exact` is the encoder's output before storage (float32 log-probs), `block` what the reader decoded.
    """
    valid = np.arange(exact.ids.shape[-1]) < exact.n_entries[..., None]
    assert np.array_equal(np.where(valid, exact.ids, -1), np.where(valid, block.ids, -1)), "ids must round-trip exactly"
    p = np.where(valid, np.exp(exact.values.astype(np.float64)), 0.0)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, None)  # exact rest in float64 (the stored one is float16)
    q = np.where(valid, np.exp(block.logprobs.astype(np.float64)), 0.0)
    q_rest = np.exp(block.rest_logprobs.astype(np.float64))
    norm = q.sum(-1) + q_rest
    q, q_rest = q / norm[..., None], q_rest / norm
    with np.errstate(divide="ignore", invalid="ignore"):
        entries = np.where(p > 0, p * (np.log(p) - np.log(np.where(q > 0, q, 1e-300))), 0.0).sum(-1)
        rest = np.where(p_rest > 0, p_rest * (np.log(p_rest) - np.log(np.maximum(q_rest, 1e-300))), 0.0)
    return entries + rest


def write_and_read(out: Path, domain: str, windows: np.ndarray, targets: EncodedTargets, capture: Capture, vocab: int) -> tuple[dict, object, float]:
    """Write one domain's encoded windows as a store with `capture`; bytes stored per array, decoded block, decode tokens/s."""
    if out.exists():
        shutil.rmtree(out)
    layout = StoreLayout.choose(windows.shape[1] - 1, capture, vocab, chunk_windows=8, shard_windows=8)
    root = zarr.open_group(zarr_store(str(out), read_only=False), mode="w")
    root.attrs[HEADER_ATTR] = bare_header([domain], layout.seq_len, capture, vocab, layout.chunk_windows, layout.shard_windows).to_dict()
    create_split_arrays(root.create_group(domain).create_group("train"), len(windows), layout)
    writer = CacheWriter(root, str(out), layout)
    for shard in range(layout.n_shards(len(windows))):
        rows = layout.shard_slice(shard, len(windows))
        writer.write_shard(domain, "train", shard, windows[rows], targets.windows(rows))
    reader = CacheReader(str(out))
    stored = {name: reader.array(domain, "train", name).nbytes_stored() for name in reader.data_arrays}
    start = time.perf_counter()
    for _ in range(3):
        block = reader.read(domain, "train")
    seconds = (time.perf_counter() - start) / 3
    return stored, block, windows.shape[0] * (windows.shape[1] - 1) / seconds


def teacher_pass(
    teacher: str, manifest: Manifest, windows: int, k: int, batch_size: int, draws: int | None = None
) -> tuple[int, dict[str, tuple[np.ndarray, TopKResult]]]:
    """The teacher's vocabulary size, and per domain its first `windows` training windows with the
    engine's float32 top-k (and `draws` samples): the exact distributions every setting is measured against."""
    tokenizer = load_tokenizer(teacher, None)
    engine = HFTeacherEngine(teacher, batch_size=batch_size)
    out = {}
    for spec in manifest.domains:
        packed = pack_domain(spec.name, load_domain_documents(spec), tokenizer, manifest.seq_len, 1, windows * manifest.seq_len, manifest.seed)
        domain_windows = packed.train.windows[:windows]
        start = time.perf_counter()
        out[spec.name] = (domain_windows, engine.score(domain_windows, k, draws=draws, seed=0))
        print(f"teacher {spec.name}: {domain_windows.shape[0]} windows in {time.perf_counter() - start:.0f} s", flush=True)
    return int(engine.config.vocab_size), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=8, help="training windows per domain")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(derived_manifest(args.manifest, args.out_dir, None, None))
    vocab, teacher_out = teacher_pass(args.teacher, manifest, args.windows, MAX_K, args.batch_size, draws=DRAWS)

    rows = []
    for capture in settings():
        per_domain = {}
        for domain, (windows, result) in teacher_out.items():
            if capture.mode == "sampled":
                result = type(result)(result.topk_ids, result.topk_logprobs, result.target_logprobs, result.samples[..., : capture.draws])
            targets = encode_targets(result, capture)
            stored, block, decode_rate = write_and_read(args.out_dir / "store.zarr", domain, windows, targets, capture, vocab)
            tokens = windows.shape[0] * (windows.shape[1] - 1)
            entries = float(block.valid.sum(-1).mean()) if block.valid is not None else float(capture.k)
            kl = None if capture.mode == "sampled" else kl_exact_vs_decoded(targets, block)
            kept_mass = None
            if capture.mode != "sampled":
                kept_mass = float(1.0 - np.exp(block.rest_logprobs.astype(np.float64)).mean())
            per_domain[domain] = {
                "bytes_per_token": sum(stored.values()) / tokens,
                "bytes_per_token_by_array": {name: size / tokens for name, size in stored.items()},
                "entries_per_position": entries,
                "kl_mean": None if kl is None else float(kl.mean()),
                "kl_p99": None if kl is None else float(np.quantile(kl, 0.99)),
                "kl_max": None if kl is None else float(kl.max()),
                "kept_mass": kept_mass,
                "decode_tokens_per_s": decode_rate,
            }
        overall = {key: (None if per_domain[next(iter(per_domain))][key] is None else float(np.mean([d[key] for d in per_domain.values()])))
                   for key in ("bytes_per_token", "entries_per_position", "kl_mean", "kl_p99", "kept_mass", "decode_tokens_per_s")}
        overall["kl_max"] = None if capture.mode == "sampled" else max(d["kl_max"] for d in per_domain.values())
        overall["bytes_per_token_by_array"] = {
            name: float(np.mean([d["bytes_per_token_by_array"][name] for d in per_domain.values()]))
            for name in next(iter(per_domain.values()))["bytes_per_token_by_array"]
        }
        rows.append({"setting": label(capture), "capture": capture.to_attrs(), "overall": overall, "domains": per_domain})
        kl_text = "" if overall["kl_mean"] is None else f"KL mean {overall['kl_mean']:.2e} p99 {overall['kl_p99']:.2e} max {overall['kl_max']:.2e}"
        per = " ".join(f"{d[:4]} {v['bytes_per_token']:.1f}" for d, v in per_domain.items())
        arrays = " ".join(f"{name} {size:.1f}" for name, size in overall["bytes_per_token_by_array"].items())
        print(f"{label(capture):28s} {overall['bytes_per_token']:6.1f} B/tok ({per}) [{arrays}] entries {overall['entries_per_position']:5.1f} {kl_text}"
              f" decode {overall['decode_tokens_per_s']:,.0f} tok/s", flush=True)

    results = {
        "command": " ".join(sys.argv),
        "teacher": args.teacher,
        "windows_per_domain": args.windows,
        "seq_len": manifest.seq_len,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
