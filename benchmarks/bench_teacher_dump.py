"""Stage-one speed and size: `teacher-dump` tokens/s against the teacher's bare forward tokens/s
on the same windows and batches, and bytes/token of the resulting store.

Runs side by side in one process with one loaded teacher (bare forward, dump, bare forward
again, ...) because the machines are shared and noisy: the ratio is the result, not the absolute
rates. The windows come from a manifest (packed in memory by the first dump) or from a store that
`ddk-cache pack` wrote (`--packed`, scored on a fresh copy each pass).

    python benchmarks/bench_teacher_dump.py --teacher /path/to/teacher \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/bench --budget 8192 --valid 4
    python benchmarks/bench_teacher_dump.py --teacher DIR --packed packed.zarr --out-dir /tmp/bench \
        --device cuda --dtype bfloat16 --batch-size 16 --writer-threads 1 8
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ddk_cache.engines import EngineOptions
from ddk_cache.engines.hf import HFTeacherEngine
from ddk_cache.stages.teacher_dump import ProcessSettings, TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.format import SPLITS
from ddk_cache.store.reader import CacheReader


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
    total = torch.zeros((), device=engine.device)
    for shard in windows:
        for i in range(0, len(shard), engine.batch_size):
            batch = torch.as_tensor(shard[i : i + engine.batch_size, :-1], dtype=torch.long).to(engine.device)
            total += engine.model(input_ids=batch, use_cache=False).logits[:, -1, 0].float().sum()  # keeps the pass alive
            tokens += batch.numel()
    total.item()  # one synchronisation at the end: a GPU runs the batches back to back
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", type=Path, help="pack this manifest's domains in memory (budgets from --budget/--valid)")
    data.add_argument("--packed", type=Path, help="a local store `ddk-cache pack` wrote: each pass scores a fresh copy")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--writer-threads", type=int, nargs="+", default=[1], help="one dump per value in every pass")
    parser.add_argument("--budget", type=int, default=8192, help="train tokens per domain (0 = manifest's)")
    parser.add_argument("--valid", type=int, default=4, help="validation windows per domain (0 = manifest's)")
    parser.add_argument("--repeats", type=int, default=3, help="passes, each: the dumps, then a bare pass")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    store = args.out_dir / "bench.zarr"
    options = EngineOptions(batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    engine = HFTeacherEngine(args.teacher, device=args.device, dtype=args.dtype, batch_size=args.batch_size)

    def dump(threads: int) -> float:
        if args.packed is not None:
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(args.packed, store)
        manifest = derived_manifest(args.manifest, args.out_dir, args.budget, args.valid) if args.manifest else None
        config = TeacherDumpConfig(teacher=args.teacher, manifest=manifest, out=str(store), capture=Capture(k=args.k), engine="hf",
                                   engine_options=options, overwrite=args.manifest is not None, progress=False,
                                   processes=ProcessSettings(writer_threads=threads))
        return run_teacher_dump(config, engine=engine).tokens_per_second

    # 1. a first dump fixes the windows and warms the engine; its store gives the exact windows to replay
    dump(args.writer_threads[0])
    reader = CacheReader(str(store))
    shard_windows = reader.header.layout.shard_windows
    shards = []
    for domain in reader.domains:
        for split in SPLITS:
            tokens = reader.read(domain, split).tokens
            shards += [tokens[i : i + shard_windows] for i in range(0, len(tokens), shard_windows)]

    # 2. side by side, alternating: bare forward, then a full dump (score + top-k + encode + compress + write)
    #    per writer-thread setting, ..., bare forward
    bare_rates = [bare_forward_rate(engine, shards)]
    dump_rates: dict[int, list[float]] = {threads: [] for threads in args.writer_threads}
    for _ in range(args.repeats):
        for threads in args.writer_threads:
            dump_rates[threads].append(dump(threads))
        bare_rates.append(bare_forward_rate(engine, shards))
    # each dump is compared with the mean of the bare passes just before and after its pass
    ratios = {t: [d / ((bare_rates[i] + bare_rates[i + 1]) / 2) for i, d in enumerate(rates)] for t, rates in dump_rates.items()}

    sizes = {}
    for domain in reader.domains:
        info = reader.domain_info(domain)
        tokens = sum(info.split(s).tokens for s in SPLITS)
        sizes[domain] = {"bytes_per_token": reader.bytes_stored(domain) / tokens, "tokens": tokens,
                         "teacher_valid_ppl": info.teacher_valid_ppl}
    total_tokens = sum(s["tokens"] for s in sizes.values())
    gpu = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None
    results = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, device {engine.device}"
                   + (f" ({gpu})" if gpu else ""),
        "teacher": args.teacher,
        "teacher_parameters": sum(p.numel() for p in engine.model.parameters()),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "k": args.k,
        "seq_len": reader.header.seq_len,
        "batch_size": args.batch_size,
        "tokens_per_pass": int(sum(s.shape[0] for s in shards) * reader.header.seq_len),
        "bare_forward_tokens_per_s": [round(r, 1) for r in bare_rates],
        "dump_tokens_per_s": {str(t): [round(r, 1) for r in rates] for t, rates in dump_rates.items()},
        "dump_over_bare": {str(t): [round(r, 3) for r in rs] for t, rs in ratios.items()},
        "dump_over_bare_median": {str(t): round(float(np.median(rs)), 3) for t, rs in ratios.items()},
        "store_bytes_per_token": round(sum(s["bytes_per_token"] * s["tokens"] for s in sizes.values()) / total_tokens, 1),
        "naive_bytes_per_token": 6 * args.k,
        "domains": {d: {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()} for d, s in sizes.items()},
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
