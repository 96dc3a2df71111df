"""Scoring one packed store with 1 process vs 3 processes as 3 nodes, the teacher's thread count fixed per process.

The store is packed once; two copies are scored, one by a single `teacher-dump` (--num-nodes 1), one by three
concurrent ones (--num-nodes 3 --node-rank r), every process with OMP_NUM_THREADS = `--threads`. The ratio of
tokens/s (all tokens of the store over the wall time until the last process ends) is the scaling of the shard
partition; on a machine with fewer cores than processes x threads it is bounded by the cores.

    python benchmarks/bench_scoring_nodes.py --teacher /work/teacher-smollm2 --manifest /tmp/bench/dist_manifest.yaml \\
        --out-dir /tmp/bench_scoring --json benchmarks/results/scoring_nodes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(commands: list[list[str]], threads: int, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    processes = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd) for c in commands]
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(err.decode()[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--shard-windows", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    packed = args.out_dir / "packed.zarr"
    cli = [sys.executable, "-m", "ddk_cache.cli"]
    subprocess.run([*cli, "pack", "--manifest", str(args.manifest), "--out", str(packed), "--tokenizer", args.teacher,
                    "--shard-windows", str(args.shard_windows), "--chunk-windows", str(args.shard_windows), "--no-progress"],
                   check=True, capture_output=True, cwd=args.out_dir)
    seconds = {}
    for nodes in (1, args.nodes):
        store = args.out_dir / f"scored-{nodes}.zarr"
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(packed, store)
        commands = [[*cli, "teacher-dump", "--teacher", args.teacher, "--out", str(store), "--engine", "hf", "--device", "cpu",
                     "--batch-size", "4", "--no-progress", "--num-nodes", str(nodes), "--node-rank", str(rank)] for rank in range(nodes)]
        seconds[nodes] = run(commands, args.threads, args.out_dir)
    from ddk_cache.store.reader import CacheReader

    reader = CacheReader(str(args.out_dir / "scored-1.zarr"))
    tokens = sum(reader.domain_info(d).split(s).tokens for d in reader.domains for s in ("train", "valid"))
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU, {args.threads} thread(s) per process",
        "teacher": args.teacher,
        "tokens": tokens,
        "shards": sum(reader.shards_done(d, s)[1] for d in reader.domains for s in ("train", "valid")),
        "one_process_tokens_per_s": round(tokens / seconds[1], 1),
        f"{args.nodes}_processes_tokens_per_s": round(tokens / seconds[args.nodes], 1),
        "ratio": round(seconds[1] / seconds[args.nodes], 3),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
