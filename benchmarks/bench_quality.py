"""Quality: does the cache distill as well as live dense KD, does DDK beat uniform KD, and how small can a cache be?

On the real teacher and the shared corpora, every arm trains one student from the same starting
weights for the same number of student tokens, and is evaluated on every `valid/` window of every
domain (`ddk-cache eval`). Two starting points (`--student`):

- `scratch`: a Llama 4 x 256 student from seeded random weights (the quickstart's shape);
- `pruned`: the DDK paper's regime, a pretrained student. `prune-student` keeps `--prune-layers`
  of the teacher's layers by block influence (measured on the store's valid windows), then a
  short uniform-KD run (`--heal-steps`) heals it; every arm starts from that healed checkpoint.

Arms (CE + 0.2 KD, forward KL with the rest bucket, unless named otherwise):

- `ce`: CE only; `kd_uniform`, `kd_static`: uniform and manifest-weighted domain sampling;
- `ddk`: the paper's rule; `ddk_ce_ratio`: `--ddk-score ce-ratio`; `ddk_temperature`: the paper's
  score divided by `--ddk-temperature` (see training/domain_samplers.py);
- `kd_sampled32`, `kd_sampled16`, `kd_topp95`, `kd_headtail8x24`, `kd_headtail4x16`, `kd_headtail2x8`: uniform KD
  from sampled caches (32 or 16 draws), a top-p 0.95 cache (at most 64 entries) and head+tail caches (8 exact + 24
  tail draws, 4 + 16, 2 + 8) of the same windows; `kd_uniform` is the default top-64 cache;
- `dense_online`: KD against the live teacher's full distribution (uniform sampling).

    # from scratch (the first table in RESULTS.md "Quality")
    python benchmarks/bench_quality.py --teacher /work/teacher-smollm2 \
        --manifest data_manifests/shared_corpora.yaml --out-dir /tmp/quality --seeds 0 \
        --arms ce kd_uniform kd_static ddk dense_online
    # pretrained (pruned, healed) student: see RESULTS.md "DDK on a pretrained student" for the command
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
import yaml
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
from ddk_cache.stages.inspect_store import domain_rows
from ddk_cache.stages.prune_student import PruneConfig, run_prune
from ddk_cache.stages.quickstart import write_student_config
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.losses import KDConfig

CACHES = {  # store name -> capture settings, all of the same windows
    "top64": lambda k: Capture(k=k),
    "sampled32": lambda k: Capture(mode="sampled", draws=32),
    "topp95": lambda k: Capture(mode="topp", top_p=0.95, k=k),
    "headtail8x24": lambda k: Capture(mode="headtail", k=8, draws=24),
    "headtail4x16": lambda k: Capture(mode="headtail", k=4, draws=16),
    "headtail2x8": lambda k: Capture(mode="headtail", k=2, draws=8),
    "sampled16": lambda k: Capture(mode="sampled", draws=16),
}
ARMS = {
    "ce": {"sampler": "uniform", "kd": KDConfig(gamma=0.0)},
    "kd_uniform": {"sampler": "uniform", "kd": KDConfig()},
    "kd_static": {"sampler": "static", "kd": KDConfig()},
    "ddk": {"sampler": "ddk", "kd": KDConfig()},
    "ddk_ce_ratio": {"sampler": "ddk", "kd": KDConfig(), "ddk_score": "ce-ratio"},
    "ddk_temperature": {"sampler": "ddk", "kd": KDConfig(), "tempered": True},
    "kd_sampled32": {"sampler": "uniform", "kd": KDConfig(), "cache": "sampled32"},
    "kd_topp95": {"sampler": "uniform", "kd": KDConfig(), "cache": "topp95"},
    "kd_headtail8x24": {"sampler": "uniform", "kd": KDConfig(), "cache": "headtail8x24"},
    "kd_headtail4x16": {"sampler": "uniform", "kd": KDConfig(), "cache": "headtail4x16"},
    "kd_headtail2x8": {"sampler": "uniform", "kd": KDConfig(), "cache": "headtail2x8"},
    "kd_sampled16": {"sampler": "uniform", "kd": KDConfig(), "cache": "sampled16"},
    "dense_online": {"sampler": "uniform", "kd": KDConfig(), "online": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True, help="stores, students and runs; existing stores are reused")
    parser.add_argument("--budget", type=int, default=32768, help="cached train tokens per domain")
    parser.add_argument("--valid", type=int, default=16, help="valid windows per domain")
    parser.add_argument("--seq-len", type=int, help="window length (default: the manifest's)")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--student", choices=("scratch", "pruned"), default="scratch")
    parser.add_argument("--prune-layers", type=int, default=10)
    parser.add_argument("--heal-steps", type=int, default=48)
    parser.add_argument("--heal-lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--update-every", type=int, help="K (default: steps // 10)")
    parser.add_argument("--evaluate-fixed-arms", action="store_true", default=True,
                        help="also evaluate every K steps in arms whose sampler ignores evaluations (for their curves)")
    parser.add_argument("--no-evaluate-fixed-arms", dest="evaluate_fixed_arms", action="store_false",
                        help="evaluate only at the start and end of such arms (kd_uniform still every K, for the plot): saves time")
    parser.add_argument("--heal-only", action="store_true", help="prune and heal the student, report its validation loss, stop")
    parser.add_argument("--eval-windows", type=int, help="valid windows per domain in each periodic evaluation (default: --valid)")
    parser.add_argument("--ddk-temperature", type=float, default=2.0, help="the ddk_temperature arm's temperature")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument("--plot", type=Path, help="where the DDK weight plot goes (default: beside --json)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the runs already in --out-dir")
    parser.add_argument("--report", action="store_true", help="print the markdown tables of RESULTS.md from --json and stop")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.plot or args.json.parent / ("quality_ddk.png" if args.student == "scratch" else "quality_pruned_ddk.png")
    if args.report:
        print(report(json.loads(args.json.read_text())))
        return
    if args.plot_only:
        plot(args.out_dir, args.seeds[0], plot_path, [a for a in args.arms if a.startswith("ddk")])
        return

    manifest = derived_manifest(args.manifest, args.out_dir, args.budget, args.valid)
    if args.seq_len:
        document = yaml.safe_load(manifest.read_text())
        document["seq_len"] = args.seq_len
        manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    needed = {"top64"} | {ARMS[a]["cache"] for a in args.arms if "cache" in ARMS[a]}
    stores = {name: dump(args, manifest, name) for name in sorted(needed)}
    store = stores["top64"]
    seq_len = CacheReader(str(store)).header.seq_len
    start, start_eval = starting_student(args, store)
    if args.heal_only:
        return
    k_steps = args.update_every or max(1, args.steps // 10)

    runs = {}
    for seed in args.seeds:
        for arm in args.arms:
            spec = ARMS[arm]
            out = args.out_dir / f"{arm}-seed{seed}"
            if out.exists():
                shutil.rmtree(out)
            started = time.perf_counter()
            arm_store = stores[spec.get("cache", "top64")]
            summary = run_distill(DistillConfig(
                store=str(arm_store), student=str(start), out=out, steps=args.steps, seed=seed,
                batch=BatchSettings(batch_size=args.batch_size), optimizer=OptimizerSettings(lr=args.lr),
                objective=ObjectiveSettings(kd=spec["kd"], online_teacher=args.teacher if spec.get("online") else None),
                sampler=SamplerSettings(
                    name=spec["sampler"], score=spec.get("ddk_score", "ppl-ratio"), temperature=args.ddk_temperature if spec.get("tempered") else 1.0,
                    update_every=k_steps if spec["sampler"] == "ddk" or arm == "kd_uniform" or args.evaluate_fixed_arms else args.steps,
                    eval_windows=args.eval_windows or args.valid),
                reporting=ReportingSettings(progress=False),
            ))
            evals = run_eval(str(out), str(store))  # every arm on the same (top-64 store's) valid windows
            runs[f"{arm}/{seed}"] = {
                "arm": arm, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
                "student_tokens": args.steps * args.batch_size * seq_len,
                "valid_loss": {e.domain: round(e.student_loss, 4) for e in evals},
                "teacher_loss": {e.domain: round(e.teacher_loss, 4) for e in evals},
                "average": round(statistics.mean(e.student_loss for e in evals), 4),
                "final_weights": {d: round(w, 4) for d, w in summary.final_weights.items()},
            }
            print(json.dumps(runs[f"{arm}/{seed}"]), flush=True)
            write_result(args, seq_len, start_eval, stores, runs)
    result = write_result(args, seq_len, start_eval, stores, runs)
    plot(args.out_dir, args.seeds[0], plot_path, [a for a in args.arms if a.startswith("ddk")])
    print(json.dumps(result["average_by_arm"], indent=2))


def write_result(args: argparse.Namespace, seq_len: int, start_eval: dict | None, stores: dict[str, Path], runs: dict) -> dict:
    """The JSON so far (rewritten after every run, so a stopped benchmark keeps what it measured)."""
    arms = [arm for arm in args.arms if any(run["arm"] == arm for run in runs.values())]
    averages = {arm: [run["average"] for run in runs.values() if run["arm"] == arm] for arm in arms}
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "teacher": args.teacher, "k": args.k, "seq_len": seq_len, "budget_per_domain": args.budget, "valid_windows": args.valid,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
        "update_every": args.update_every or max(1, args.steps // 10), "evaluate_fixed_arms": args.evaluate_fixed_arms,
        "eval_windows": args.eval_windows or args.valid, "ddk_temperature": args.ddk_temperature,
        "student": ("Llama 4 layers x 256 (quickstart shape), from the same seeded init per seed" if args.student == "scratch" else
                    f"teacher pruned to {args.prune_layers} layers (block influence), healed by {args.heal_steps} steps of uniform KD"),
        "start_eval": start_eval,
        "stores": {name: store_size(path) for name, path in stores.items()},
        "runs": runs,
        "average_by_arm": {arm: {"mean": round(statistics.mean(v), 4), "spread": round(max(v) - min(v), 4)} for arm, v in averages.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(result: dict) -> str:
    """Markdown tables: per arm mean (spread) over seeds, per domain; the lagging domain; store sizes; time."""
    runs = list(result["runs"].values())
    arms = list(dict.fromkeys(run["arm"] for run in runs))
    domains = list(runs[0]["valid_loss"])
    teacher = runs[0]["teacher_loss"]
    start = (result.get("start_eval") or {}).get("healed")
    lagging = max(domains, key=lambda d: start[d] - teacher[d]) if start else None  # largest CE gap = largest ppl ratio

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    lines = ["| arm | " + " | ".join(domains) + " | average: mean (spread) | vs uniform KD, same seed: mean (each) | per seed |", "|---" * (len(domains) + 4) + "|"]
    if start:
        lines.append("| teacher | " + " | ".join(f"{teacher[d]:.4f}" for d in domains) + f" | {mean(list(teacher.values())):.4f} | | |")
        lines.append("| start (pruned + healed) | " + " | ".join(f"{start[d]:.4f}" for d in domains) + f" | {mean(list(start.values())):.4f} | | |")
    by_seed = {r["seed"]: r["average"] for r in runs if r["arm"] == "kd_uniform"}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        averages = [r["average"] for r in mine]
        per_domain = " | ".join(f"{mean([r['valid_loss'][d] for r in mine]):.4f}" for d in domains)
        paired = [r["average"] - by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]  # same seed, same data order draws
        delta = f"{mean(paired):+.4f} ({', '.join(f'{d:+.3f}' for d in paired)})" if paired else ""
        lines.append(f"| {arm} | {per_domain} | {mean(averages):.4f} ({max(averages) - min(averages):.4f}) | {delta} | "
                     f"{', '.join(f'{v:.4f}' for v in averages)} |")
    out = ["\n".join(lines)]
    if lagging:
        rows = [f"Lagging domain at the start: **{lagging}** (healed {start[lagging]:.4f} vs teacher {teacher[lagging]:.4f}).", "",
                "| arm | its loss: mean | gain over the start | vs uniform KD | per seed |", "|---|---|---|---|---|"]
        base = mean([r["valid_loss"][lagging] for r in runs if r["arm"] == "kd_uniform"]) if by_seed else None
        for arm in arms:
            values = [r["valid_loss"][lagging] for r in runs if r["arm"] == arm]
            rows.append(f"| {arm} | {mean(values):.4f} | {start[lagging] - mean(values):+.4f} | "
                        f"{(mean(values) - base) if base is not None else float('nan'):+.4f} | {', '.join(f'{v:.4f}' for v in values)} |")
        out.append("\n".join(rows))
    sizes = ["| cache | train bytes/token | store folder (MB) |", "|---|---|---|"]
    for name, size in result["stores"].items():
        sizes.append(f"| {name} | {size['train_bytes_per_token']} | {size['folder_bytes'] / 1e6:.1f} |")
    out.append("\n".join(sizes))
    times = ["| arm | seconds per run (mean) |", "|---|---|"] + [
        f"| {arm} | {mean([r['seconds'] for r in runs if r['arm'] == arm]):.0f} |" for arm in arms]
    out.append("\n".join(times))
    return "\n\n".join(out)


def dump(args: argparse.Namespace, manifest: Path, name: str) -> Path:
    """One store per capture setting, of the same packed windows (same manifest, tokenizer and seed); reused if present."""
    store = args.out_dir / ("quality.zarr" if name == "top64" else f"{name}.zarr")
    if store.exists():
        print(f"reusing {store}", flush=True)
        return store
    started = time.perf_counter()
    run_teacher_dump(TeacherDumpConfig(teacher=args.teacher, manifest=manifest, out=str(store), capture=CACHES[name](args.k), engine="hf",
                                       engine_options=EngineOptions(batch_size=4), progress=False))
    print(f"{name} dump ready ({time.perf_counter() - started:.0f} s)", flush=True)
    return store


def starting_student(args: argparse.Namespace, store: Path) -> tuple[Path, dict | None]:
    """The weights every arm starts from, and (pruned) their validation loss per domain."""
    if args.student == "scratch":
        path = args.out_dir / "student-init"
        write_student_config(Path(args.teacher), path)
        return path, None
    pruned, healed = args.out_dir / f"student-pruned{args.prune_layers}", args.out_dir / f"student-healed{args.prune_layers}"
    if not pruned.exists():
        run_prune(PruneConfig(teacher=args.teacher, layers=args.prune_layers, out=pruned, store=str(store), windows=min(4, args.valid)))
    if not (healed / "config.json").exists():
        shutil.rmtree(healed, ignore_errors=True)
        started = time.perf_counter()
        run_distill(DistillConfig(store=str(store), student=str(pruned), out=healed, steps=args.heal_steps, seed=1000,
                                  batch=BatchSettings(batch_size=args.batch_size), optimizer=OptimizerSettings(lr=args.heal_lr),
                                  sampler=SamplerSettings(name="uniform", update_every=args.heal_steps, eval_windows=args.eval_windows or args.valid),
                                  reporting=ReportingSettings(progress=False)))
        print(f"healed ({time.perf_counter() - started:.0f} s)", flush=True)
    before = {e.domain: round(e.student_loss, 4) for e in run_eval(str(pruned), str(store))}
    after = run_eval(str(healed), str(store))
    start_eval = {"pruned": before, "healed": {e.domain: round(e.student_loss, 4) for e in after},
                  "teacher": {e.domain: round(e.teacher_loss, 4) for e in after}}
    print(json.dumps(start_eval), flush=True)
    return healed, start_eval


def store_size(path: Path) -> dict:
    """Bytes of every array of the train splits (what `inspect` reports) per train token, and the whole folder."""
    rows = [row for row in domain_rows(CacheReader(str(path))) if row["split"] == "train"]
    tokens = sum(row["tokens"] for row in rows)
    stored = sum(row["bytes_per_token"] * row["tokens"] for row in rows)
    folder = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"train_bytes_per_token": round(stored / tokens, 1), "train_tokens": tokens, "folder_bytes": folder}


def plot(out_dir: Path, seed: int, dest: Path, ddk_arms: list[str]) -> None:
    """Each DDK arm's domain weights over steps, and per-domain student/teacher perplexity for DDK vs uniform KD."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return

    def evaluations(arm: str) -> list[dict]:
        path = out_dir / f"{arm}-seed{seed}" / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in records if "eval" in r]

    ddk_arms = [arm for arm in ddk_arms if evaluations(arm)]
    fig, axes = plt.subplots(1, len(ddk_arms) + 1, figsize=(4.2 * (len(ddk_arms) + 1), 3.8), squeeze=False)
    for ax, arm in zip(axes[0], ddk_arms):
        updates = evaluations(arm)
        for i, domain in enumerate(updates[0]["eval"]):
            ax.plot([u["step"] for u in updates], [u["domain_weights"][domain] for u in updates], color=f"C{i}", marker=".", label=domain)
        ax.set(title=f"{arm}: domain weights (seed {seed})", xlabel="step", ylabel="sampling probability", ylim=(0, 1))
        ax.legend(fontsize=7)
    right = axes[0][-1]
    for arm, style in (("ddk", "-"), ("kd_uniform", ":")):
        updates = evaluations(arm)
        for i, domain in enumerate(updates[0]["eval"] if updates else []):
            right.plot([u["step"] for u in updates], [u["eval"][domain]["student_ppl"] / u["eval"][domain]["teacher_ppl"] for u in updates],
                       style, color=f"C{i}", label=f"{domain} ({arm})")
    right.set(title="student / teacher perplexity\n(solid: DDK, dotted: uniform KD)", xlabel="step", yscale="log")
    right.legend(fontsize=6)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    print(f"plot: {dest}")


if __name__ == "__main__":
    main()
