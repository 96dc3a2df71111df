"""Stage-one speed and size: `teacher-dump` tokens/s against the teacher's bare forward tokens/s
on the same windows and batches, and bytes/token of the resulting store.

Runs side by side in one process (bare forward, dump, bare forward again) because the machines
are shared and noisy: the ratio is the result, not the absolute rates.

    python benchmarks/bench_teacher_dump.py --teacher /path/to/teacher \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/bench --budget 8192 --valid 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ddk_cache.capture import Capture
from ddk_cache.cache_format import SPLITS
from ddk_cache.cache_reader import CacheReader
from ddk_cache.engines.hf import HFTeacherEngine
from ddk_cache.engines import EngineOptions
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump


def derived_manifest(manifest: Path, out_dir: Path, budget: int | None, valid: int | None) -> Path:
    """A copy of `manifest` with smaller budgets and absolute data paths, so a benchmark run stays short."""
    document = yaml.safe_load(manifest.read_text())
    for domain in document["domains"]:
        if budget:
            domain["token_budget"] = budget
        if valid:
            domain["valid_sequences"] = valid
        for source in domain["sources"]:
            files = source.get("data_files")
            if isinstance(files, str):
                files = [files]
            if files:
                source["data_files"] = [str((manifest.parent / f).resolve()) for f in files]
    path = out_dir / "bench_manifest.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@torch.inference_mode()
def bare_forward_rate(engine: HFTeacherEngine, windows: list[np.ndarray]) -> float:
    """Tokens/s of the teacher's forward pass alone (logits computed, nothing else), same batches as the dump."""
    tokens, start = 0, time.perf_counter()
    for shard in windows:
        for i in range(0, len(shard), engine.batch_size):
            batch = torch.as_tensor(shard[i : i + engine.batch_size, :-1], dtype=torch.long, device=engine.device)
            engine.model(input_ids=batch, use_cache=False).logits.sum().item()
            tokens += batch.numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--budget", type=int, default=8192, help="train tokens per domain (0 = manifest's)")
    parser.add_argument("--valid", type=int, default=4, help="validation windows per domain (0 = manifest's)")
    parser.add_argument("--repeats", type=int, default=3, help="dump passes, each between two bare passes")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = derived_manifest(args.manifest, args.out_dir, args.budget, args.valid)
    store = str(args.out_dir / "bench.zarr")
    config = TeacherDumpConfig(
        teacher=args.teacher, manifest=manifest, out=store, capture=Capture(k=args.k), engine_options=EngineOptions(batch_size=args.batch_size), overwrite=True, show_progress=False
    )

    # 1. a first dump fixes the windows (and warms caches); its store gives the exact windows to replay
    run_teacher_dump(config)
    reader = CacheReader(store)
    layout = reader.header["layout"]
    shards = []
    for domain in reader.domains:
        for split in SPLITS:
            tokens = reader.read(domain, split).tokens
            shards += [tokens[i : i + layout["shard_windows"]] for i in range(0, len(tokens), layout["shard_windows"])]
    engine = HFTeacherEngine(args.teacher, batch_size=args.batch_size)

    # 2. side by side, alternating: bare forward, full dump (score + top-k + compress + write), ...
    bare_rates, dump_rates = [bare_forward_rate(engine, shards)], []
    for _ in range(args.repeats):
        dump_rates.append(run_teacher_dump(config).tokens_per_second)
        bare_rates.append(bare_forward_rate(engine, shards))
    # each dump is compared with the mean of the bare passes just before and after it
    ratios = [d / ((bare_rates[i] + bare_rates[i + 1]) / 2) for i, d in enumerate(dump_rates)]

    sizes = {}
    for domain in reader.domains:
        info = reader.domain_info(domain)
        tokens = sum(info[s]["tokens"] for s in SPLITS)
        sizes[domain] = {"bytes_per_token": reader.bytes_stored(domain) / tokens, "tokens": tokens,
                         "teacher_valid_ppl": info["teacher_valid_ppl"]}
    total_tokens = sum(s["tokens"] for s in sizes.values())
    results = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, device {engine.device}",
        "teacher": args.teacher,
        "k": args.k,
        "seq_len": layout["seq_len"],
        "batch_size": args.batch_size,
        "tokens_per_pass": int(sum(s.shape[0] for s in shards) * layout["seq_len"]),
        "bare_forward_tokens_per_s": [round(r, 1) for r in bare_rates],
        "dump_tokens_per_s": [round(r, 1) for r in dump_rates],
        "dump_over_bare": [round(r, 3) for r in ratios],
        "dump_over_bare_median": round(float(np.median(ratios)), 3),
        "store_bytes_per_token": round(sum(s["bytes_per_token"] * s["tokens"] for s in sizes.values()) / total_tokens, 1),
        "naive_bytes_per_token": 6 * args.k,
        "domains": {d: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for d, s in sizes.items()},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
