"""Sampled targets vs top-k targets of similar size: validation loss and calibration of the student.

On the real teacher and the shared corpora, dumps the same windows twice (top-k with `--k` and
`--logprob-scale`; sampled with `--draws`), records both stores' bytes/token, then trains one
student per arm from the same seeded initial weights with the same token budget and uniform
domain sampling: `ce` (no KD), `topk` and `sampled` (CE + 0.2 forward KL on the cached targets).
Each final student is evaluated on every `valid/` window: loss and top-1 ECE. A second run with
another `--seed` in the same `--out-dir` reuses the stores (same draws) and trains new students.

    python benchmarks/bench_sampled_vs_topk.py --teacher /work/teacher-smollm2 \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/sampled_vs_topk
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from bench_teacher_dump import derived_manifest

from ddk_cache.engines import EngineOptions
from ddk_cache.stages.distill import (
    BatchSettings,
    DistillConfig,
    ObjectiveSettings,
    OptimizerSettings,
    ReportingSettings,
    SamplerSettings,
    run_distill,
)
from ddk_cache.stages.evaluate import run_eval
from ddk_cache.stages.quickstart import write_student_config
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.losses import KDConfig


def bytes_per_token(store: Path) -> float:
    reader = CacheReader(str(store))
    stored = sum(reader.bytes_stored(d) for d in reader.domains)
    tokens = sum(reader.domain_info(d).split(s).tokens for d in reader.domains for s in ("train", "valid"))
    return stored / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=16384, help="cached train tokens per domain")
    parser.add_argument("--valid", type=int, default=8, help="valid windows per domain")
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--logprob-scale", type=int, default=32)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "sampled_vs_topk.json")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = derived_manifest(args.manifest, args.out_dir, args.budget, args.valid)

    captures = {
        "topk": Capture(mode="topk", k=args.k, logprob_scale=args.logprob_scale),
        "sampled": Capture(mode="sampled", draws=args.draws, seed=0),  # the draws stay fixed across training seeds
    }
    stores = {}
    for name, capture in captures.items():
        stores[name] = args.out_dir / f"{name}.zarr"
        started = time.perf_counter()
        run_teacher_dump(TeacherDumpConfig(teacher=args.teacher, manifest=manifest, out=str(stores[name]), capture=capture, engine="hf",
                                           engine_options=EngineOptions(batch_size=4), progress=False))  # an existing complete store is reused
        print(f"{name} dump: {bytes_per_token(stores[name]):.1f} bytes/token ({time.perf_counter() - started:.0f} s)", flush=True)

    student_init = args.out_dir / "student-init"
    write_student_config(Path(args.teacher), student_init)
    arms = {"ce": ("topk", KDConfig(gamma=0.0)), "topk": ("topk", KDConfig()), "sampled": ("sampled", KDConfig())}
    runs = {}
    for arm, (store_name, kd) in arms.items():
        out = args.out_dir / arm
        if out.exists():
            shutil.rmtree(out)
        started = time.perf_counter()
        run_distill(DistillConfig(store=str(stores[store_name]), student=str(student_init), out=out, steps=args.steps, seed=args.seed,
                                  batch=BatchSettings(batch_size=args.batch_size), optimizer=OptimizerSettings(lr=args.lr),
                                  objective=ObjectiveSettings(kd=kd),
                                  sampler=SamplerSettings(name="uniform", update_every=max(1, args.steps // 5), eval_windows=args.valid),
                                  reporting=ReportingSettings(progress=False)))
        evals = run_eval(str(out), str(stores["topk"]))  # the same valid windows for every arm
        runs[arm] = {
            "store": store_name, "seconds": round(time.perf_counter() - started, 1),
            "valid_loss": {e.domain: round(e.student_loss, 4) for e in evals},
            "ece": {e.domain: round(e.student_ece, 4) for e in evals},
            "average_loss": round(statistics.mean(e.student_loss for e in evals), 4),
            "average_ece": round(statistics.mean(e.student_ece for e in evals), 4),
        }
        print(arm, json.dumps(runs[arm]), flush=True)

    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher": args.teacher, "budget_per_domain": args.budget, "valid_windows": args.valid, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "captures": {name: c.to_attrs() for name, c in captures.items()},
        "bytes_per_token": {name: round(bytes_per_token(path), 2) for name, path in stores.items()},
        "student": "Llama 4 layers x 256 (quickstart shape), same seeded init for every arm",
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
