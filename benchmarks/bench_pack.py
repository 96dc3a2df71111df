"""`ddk-cache pack` on corpora of growing size: throughput (tokens/s, per core) and peak memory.

Each corpus is one domain of local text files (one document per line, split over `--files` files: a
sharded local corpus) built from the paragraphs of ../shared/corpora, each line made unique by a
counter so that no two documents hash alike. `pack` runs as a child process (the real CLI, no token
budget: every document is read, routed, tokenized and written); its peak RSS is the child's
ru_maxrss. The memory claim is that peak RSS does not grow with the corpus.

    python benchmarks/bench_pack.py --tokenizer /work/teacher-smollm2 --out-dir /tmp/bench_pack \\
        --sizes-mb 100 300 1000 --json benchmarks/results/pack.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def paragraphs() -> list[str]:
    """Real text: the shared corpora's paragraphs, one line each."""
    texts = []
    for path in sorted(SHARED.rglob("*")):
        if path.is_file() and path.suffix in (".txt", ".jsonl") and not path.name.startswith("README"):
            raw = path.read_text(errors="ignore")
            if path.suffix == ".jsonl":
                raw = "\n\n".join(" ".join(str(v) for v in json.loads(line).values()) for line in raw.splitlines() if line.strip())
            texts += [" ".join(p.split()) for p in raw.split("\n\n") if len(p.split()) >= 8]
    if not texts:
        raise SystemExit(f"no text found under {SHARED}")
    return texts


def make_corpus(folder: Path, megabytes: int, files: int, texts: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{i:03d}.txt" for i in range(files)]
    if all(p.exists() for p in paths):
        return paths
    target, written, counter = megabytes * 2**20, 0, 0
    handles = [p.open("w") for p in paths]
    while written < target:
        line = f"[{counter}] {texts[counter % len(texts)]}\n"
        handles[counter % files].write(line)
        written += len(line.encode())
        counter += 1
    for handle in handles:
        handle.close()
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    texts = paragraphs()
    rows = []
    for size in args.sizes_mb:
        files = make_corpus(args.out_dir / f"corpus-{size}mb", size, args.files, texts)
        manifest = args.out_dir / f"manifest-{size}mb.yaml"
        manifest.write_text(yaml.safe_dump({"seq_len": args.seq_len, "seed": 0, "domains": [
            {"name": "web", "sources": [{"path": "text", "data_files": [str(f) for f in files]}], "valid_sequences": 16}]}))
        store = args.out_dir / f"packed-{size}mb.zarr"
        command = [sys.executable, "-m", "ddk_cache.cli", "pack", "--manifest", str(manifest), "--out", str(store), "--tokenizer", args.tokenizer,
                   "--valid-fraction", "0.01", "--overwrite", "--no-progress"]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=args.out_dir, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS and CPU time
        seconds = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"pack failed: {child.stderr.read().decode()[-2000:]}")
        info = yaml.safe_load((store / "web" / "zarr.json").read_text())["attributes"]["ddk_cache_domain"]
        tokens = info["train"]["tokens"] + info["valid"]["tokens"]
        disk = sum(f.stat().st_size for f in files)
        cpu = usage.ru_utime + usage.ru_stime
        rows.append({
            "corpus_mb_on_disk": round(disk / 2**20, 1),
            "documents": info["train"]["documents"] + info["valid"]["documents"],
            "tokens_packed": tokens,
            "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds),
            "cpu_seconds": round(cpu, 1),
            "tokens_per_cpu_second": round(tokens / cpu),
            "peak_rss_mib": round(usage.ru_maxrss / 1024),
        })
        print(json.dumps(rows[-1]), flush=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "tokenizer": args.tokenizer, "seq_len": args.seq_len, "runs": rows}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
