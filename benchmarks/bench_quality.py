"""Quality: does the cache distill as well as live dense KD, and does DDK beat uniform KD?

On the real teacher and the shared corpora, with a fixed seed and the same student token
budget for every arm, trains one student per arm from the same initial weights:

- `ce`: CE only (uniform domain sampling);
- `kd_uniform`, `kd_static`, `ddk`: CE + 0.2 KD (forward KL, rest bucket) on the cached top-k,
  with uniform, manifest-weighted and DDK domain sampling;
- `dense_online`: CE + 0.2 KD against the live teacher's full distribution (uniform sampling),
  the reference the cache approximates.

Each final student is evaluated on every `valid/` window of every domain (`ddk-cache eval`).

    python benchmarks/bench_quality.py --teacher /work/teacher-smollm2 \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/quality --seeds 0
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
from ddk_cache.capture import Capture
from ddk_cache.cache_reader import CacheReader
from ddk_cache.engines import EngineOptions
from ddk_cache.losses import KDConfig
from ddk_cache.stages.distill import DistillConfig, run_distill
from ddk_cache.stages.evaluate import run_eval
from ddk_cache.stages.quickstart import write_student_config
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump

ARMS = {
    "ce": {"sampler": "uniform", "kd": KDConfig(gamma=0.0)},
    "kd_uniform": {"sampler": "uniform", "kd": KDConfig()},
    "kd_static": {"sampler": "static", "kd": KDConfig()},
    "ddk": {"sampler": "ddk", "kd": KDConfig()},
    "dense_online": {"sampler": "uniform", "kd": KDConfig(), "online": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=32768, help="cached train tokens per domain")
    parser.add_argument("--valid", type=int, default=16, help="valid windows per domain")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the runs already in --out-dir")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(args.out_dir, args.seeds[0], args.json.parent)
        return

    store = args.out_dir / "quality.zarr"
    manifest = derived_manifest(args.manifest, args.out_dir, args.budget, args.valid)
    started = time.perf_counter()
    run_teacher_dump(TeacherDumpConfig(teacher=args.teacher, manifest=manifest, out=str(store), capture=Capture(k=args.k), engine="hf",
                                       engine_options=EngineOptions(batch_size=4), show_progress=False))
    print(f"dump ready ({time.perf_counter() - started:.0f} s)", flush=True)
    student_init = args.out_dir / "student-init"
    write_student_config(Path(args.teacher), student_init)
    header = CacheReader(str(store)).header
    seq_len = header["capture"]["seq_len"]

    runs = {}
    for seed in args.seeds:
        for arm in args.arms:
            spec = ARMS[arm]
            out = args.out_dir / f"{arm}-seed{seed}"
            if out.exists():
                shutil.rmtree(out)
            started = time.perf_counter()
            summary = run_distill(DistillConfig(
                store=str(store), student=str(student_init), out=out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                kd=spec["kd"], sampler=spec["sampler"], update_every=max(1, args.steps // 10), eval_windows=args.valid,
                seed=seed, online_teacher=args.teacher if spec.get("online") else None, show_progress=False,
            ))
            evals = run_eval(str(out), str(store))
            runs[f"{arm}/{seed}"] = {
                "arm": arm, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
                "student_tokens": args.steps * args.batch_size * seq_len,
                "valid_loss": {e.domain: round(e.student_loss, 4) for e in evals},
                "teacher_loss": {e.domain: round(e.teacher_loss, 4) for e in evals},
                "average": round(statistics.mean(e.student_loss for e in evals), 4),
                "final_weights": {d: round(w, 4) for d, w in summary.final_weights.items()},
            }
            print(json.dumps(runs[f"{arm}/{seed}"]), flush=True)

    averages = {arm: [runs[f"{arm}/{s}"]["average"] for s in args.seeds] for arm in args.arms}
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher": args.teacher, "k": args.k, "seq_len": seq_len, "budget_per_domain": args.budget, "valid_windows": args.valid,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
        "student": "Llama 4 layers x 256 (quickstart shape), from the same seeded init per seed",
        "runs": runs,
        "average_by_arm": {arm: {"mean": round(statistics.mean(v), 4), "spread": round(max(v) - min(v), 4)} for arm, v in averages.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(args.out_dir, args.seeds[0], args.json.parent)
    print(json.dumps(result["average_by_arm"], indent=2))


def plot(out_dir: Path, seed: int, dest: Path) -> None:
    """DDK's domain weights over steps, and per-domain student perplexity for DDK vs uniform KD."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, style in (("ddk", "-"), ("kd_uniform", ":")):
        path = out_dir / f"{arm}-seed{seed}" / "metrics.jsonl"
        if not path.exists():
            continue
        updates = [json.loads(line) for line in path.read_text().splitlines()]
        updates = [u for u in updates if "eval" in u]
        for i, domain in enumerate(updates[0]["eval"]):
            steps, color = [u["step"] for u in updates], f"C{i}"
            if arm == "ddk":
                left.plot(steps, [u["domain_weights"][domain] for u in updates], color=color, label=domain)
            right.plot(steps, [u["eval"][domain]["student_ppl"] / u["eval"][domain]["teacher_ppl"] for u in updates], style,
                       color=color, label=f"{domain} ({arm})")
    left.set(title="DDK domain weights", xlabel="step", ylabel="sampling probability")
    right.set(title="student / teacher perplexity (solid: DDK, dotted: uniform KD)", xlabel="step", yscale="log")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest / "quality_ddk.png", dpi=110)


if __name__ == "__main__":
    main()
