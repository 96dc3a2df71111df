"""MiniLLM rounds from caches vs SFT and word-level KD, at equal student updates (RESULTS.md "MiniLLM rounds").

The real teacher (SmolLM2-135M-Instruct) and a student pruned from it and healed (`bench_quality.py --student
pruned --heal-only`); prompts and references from ../shared/corpora/math_gsm8k (question -> answer: train rows for
rollouts and the baselines, test rows held out). Three arms start from the same healed student, each with the
same number of optimizer steps of the same batch size, the same constant learning rate and a fresh AdamW:

- `sft`: CE on the reference answers of the prompts MiniLLM's rounds see (`rollout --responses references`,
  `distill --objective kd --gamma 0`);
- `word_kd`: MiniLLM's word-level KD baseline on the same teacher-scored references: (1 - 0.5) CE + 0.5 forward KL
  (`--mix 0.5`);
- `minillm`: `--rounds` rounds of rollout -> score -> update (`ddk-cache minillm`), `--epochs` passes per round;
- `minillm_low_lr`: the same at `--low-lr` (MiniLLM trains with small learning rates; at the shared `--lr` most
  importance ratios leave the clip range within a round, which `clipped_fraction` in the runs' metrics shows);
- `recipe`: MiniLLM with the paper's recipe, `--sft-steps` of SFT first (CE on the references, `minillm --sft-steps`),
  training responses sampled from 0.8 q + 0.2 p (`--teacher-mix 0.2`) and L_PT on `--pt-store`; the rounds fill
  the rest of the same update budget (SFT steps + round steps = every arm's steps);
- `teacher`: no training, the teacher measured like a student (its ROUGE-L is what imitating it aims at; its reverse
  KL against itself is 0 up to storage rounding); also the teacher's CE on the test prompts' reference answers;
- `recipe_no_sft`, `recipe_no_mix`, `recipe_no_pt`: the recipe with one part left out (without SFT, all the budget
  goes to rounds), so the table says which part matters.

`--teacher-sft-steps N` first fine-tunes the teacher itself on the reference answers (CE, `--teacher-sft-lr`), as the
paper's teachers are, and every arm then uses that teacher: MiniLLM pulls the student towards its teacher, so with
a teacher that answers worse than an SFT'd student (the instruct model here) no MiniLLM arm can beat SFT.

Every final student is measured the same way on the held-out prompts: ROUGE-L of its greedy answers, and the
reverse KL estimate from its own samples scored by the teacher (a rollout + teacher-dump of the student). The
MiniLLM arm also spends inference on its rollouts and their scoring; the seconds of each part are reported.

    python benchmarks/bench_quality.py --teacher /work/teacher-smollm2 --manifest data_manifests/shared_corpora.yaml \\
        --out-dir /tmp/q --budget 16384 --valid 8 --seq-len 256 --student pruned --heal-steps 64 --heal-lr 1e-3 \\
        --eval-windows 2 --heal-only                                   # the healed student: /tmp/q/student-healed10
    python benchmarks/bench_minillm.py --teacher /work/teacher-smollm2 --student /tmp/q/student-healed10 \\
        --corpus ../shared/corpora/math_gsm8k --out-dir /tmp/mini --seeds 0 1 --json benchmarks/results/minillm.json
    python benchmarks/bench_minillm.py ... --json benchmarks/results/minillm.json --report    # the tables in RESULTS.md
    python benchmarks/bench_minillm.py --teacher /work/teacher-smollm2 --student /tmp/q/student-healed10 \
        --corpus ../shared/corpora/math_gsm8k --out-dir /tmp/mini-ft --teacher-sft-steps 48 --arms teacher sft recipe \
        --json benchmarks/results/minillm_sft_teacher.json                # the paper's setting: a fine-tuned teacher
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from ddk_cache.devices import resolve_device
from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.minillm.prompts import load_prompt_manifest, load_prompts
from ddk_cache.minillm.response_quality import evaluate_responses, reverse_kl_estimate
from ddk_cache.minillm.response_quality import sample_entropy as library_sample_entropy
from ddk_cache.stages.distill import (
    BatchSettings,
    CheckpointSettings,
    DistillConfig,
    ObjectiveSettings,
    OptimizerSettings,
    ParallelSettings,
    ReportingSettings,
    SamplerSettings,
    run_distill,
)
from ddk_cache.stages.minillm_rounds import MiniLLMRoundsConfig, run_minillm_rounds
from ddk_cache.stages.rollout import RolloutConfig, run_rollout
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.losses import KDConfig
from ddk_cache.training.student import load_student

BASELINES = {"sft": KDConfig(gamma=0.0), "word_kd": KDConfig(form="mix", mix=0.5)}
RECIPES = {"recipe": dict(sft=True, mix=True, pt=True), "recipe_no_sft": dict(sft=False, mix=True, pt=True),
           "recipe_no_mix": dict(sft=True, mix=False, pt=True), "recipe_no_pt": dict(sft=True, mix=True, pt=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True, help="the starting student (pruned and healed)")
    parser.add_argument("--corpus", type=Path, required=True, help="a folder with train.jsonl / test.jsonl of {question, answer}")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--train-prompts", type=int, default=64, help="prompts per MiniLLM round (and the baselines' training set)")
    parser.add_argument("--test-prompts", type=int, default=48)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--low-lr", type=float, default=2e-5, help="the minillm_low_lr arm's learning rate")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sft-steps", type=int, default=16, help="the recipe arms' SFT start (taken from the shared update budget)")
    parser.add_argument("--pt-store", help="the recipe arms' L_PT: a cache of fixed text with the student's tokenizer")
    parser.add_argument("--teacher-sft-steps", type=int, default=0, help="fine-tune the teacher on the references first (0: as given)")
    parser.add_argument("--teacher-sft-lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=["start", "sft", "word_kd", "minillm"])
    parser.add_argument("--json", type=Path, help="results file (merged with what it already holds)")
    parser.add_argument("--report", action="store_true", help="print the RESULTS.md tables from --json and stop")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.json.read_text())))
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prompts = write_prompt_manifest(args)
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    if args.teacher_sft_steps:
        args.base_teacher, args.teacher = args.teacher, str(fine_tune_teacher(args))
    results.update(setup=settings(args), runs=results.get("runs", {}))
    engine = create_engine("hf", args.teacher, EngineOptions(device="cpu", batch_size=args.batch_size), max_k=args.k)
    steps = args.rounds * args.epochs * math.ceil(args.train_prompts / args.batch_size)  # MiniLLM's total updates, every arm's
    references = args.out_dir / "references.zarr"
    if not references.exists():  # the prompts MiniLLM's rounds see (round r takes slice r of one seeded order), with their answers
        every_round = write_prompt_manifest(args, "prompts-all-rounds.yaml", args.rounds * args.train_prompts)
        run_rollout(RolloutConfig(student=args.student, prompts=every_round, out=str(references), responses="references",
                                  batch_size=args.batch_size, device="cpu", progress=False))
        score(args, engine, references)
    for key, record in results["runs"].items():  # runs recorded before these fields existed
        folder = args.out_dir / key
        if key.startswith("minillm") and "clipped_fraction" not in record and folder.is_dir():
            record.update(clipped_fraction=clipped_fraction(folder), lr=args.lr if key.startswith("minillm-") else args.low_lr)
        if "student_entropy" not in record and folder.is_dir():
            stores = sorted(folder.glob("round-*/rollouts.zarr"), key=lambda p: int(p.parent.name.split("-")[1]))
            if stores:  # a MiniLLM arm: every round's student, the last one as the arm's
                for entry, store in zip(record["rounds"], stores):
                    entry["student_entropy"] = sample_entropy(store)
                record["student_entropy"] = record["rounds"][-1]["student_entropy"]
            elif (folder / "eval-rollouts.zarr").exists():
                record["student_entropy"] = sample_entropy(folder / "eval-rollouts.zarr")
    save(args, results)
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}-seed{seed}"
            if key in results["runs"] or (arm in ("start", "teacher") and seed != args.seeds[0]):
                continue
            started = time.perf_counter()
            folder = args.out_dir / key
            if arm == "start":
                record = measure(args, engine, prompts, args.student, folder)
            elif arm == "teacher":  # the target itself: its greedy answers' ROUGE-L bounds what imitating it can reach
                record = measure(args, engine, prompts, args.teacher, folder)
                record["reference_teacher_ce"] = CacheReader(str(references)).domain_info("gsm8k").teacher_valid_loss
            elif arm in ("minillm", "minillm_low_lr"):
                lr = args.lr if arm == "minillm" else args.low_lr
                rounds = run_minillm_rounds(MiniLLMRoundsConfig(student=args.student, teacher=args.teacher, prompts=prompts, out=folder,
                                                                rounds=args.rounds, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                                                                k=args.k, seed=seed, device="cpu", progress=False))
                entropies = [sample_entropy(folder / f"round-{r.round}" / "rollouts.zarr") for r in rounds]
                record = {"rounds": [{**r.to_dict(), "student_entropy": h} for r, h in zip(rounds, entropies)],
                          "reverse_kl": rounds[-1].reverse_kl, "rouge_l": rounds[-1].rouge_l, "student_entropy": entropies[-1],
                          "teacher_response_loss": rounds[-1].teacher_response_loss, "response_tokens": rounds[-1].response_tokens,
                          "round_seconds": round_seconds(folder), "lr": lr, "clipped_fraction": clipped_fraction(folder)}
            elif arm in RECIPES:
                record = run_recipe(args, prompts, folder, seed, steps, **RECIPES[arm])
            else:
                run_distill(DistillConfig(
                    store=str(references), student=args.student, out=folder / "student", steps=steps, seed=seed,
                    batch=BatchSettings(batch_size=args.batch_size), objective=ObjectiveSettings(kd=BASELINES[arm]),
                    optimizer=OptimizerSettings(lr=args.lr, warmup=0, min_lr_ratio=1.0, weight_decay=0.0),
                    sampler=SamplerSettings(name="uniform", update_every=steps), parallel=ParallelSettings(device="cpu"),
                    checkpoint=CheckpointSettings(resume="auto"), reporting=ReportingSettings(progress=False)))
                record = measure(args, engine, prompts, str(folder / "student"), folder)
            record.update(seconds=round(time.perf_counter() - started, 1), steps=0 if arm in ("start", "teacher") else steps)
            results["runs"][key] = record
            print(key, json.dumps({k: v for k, v in record.items() if k != "rounds"}), flush=True)
            save(args, results)


def run_recipe(args: argparse.Namespace, prompts: Path, folder: Path, seed: int, steps: int, sft: bool, mix: bool, pt: bool) -> dict:
    """A `minillm` run with the recipe's parts as given, its rounds filling what the SFT start leaves of `steps`."""
    per_round = args.epochs * math.ceil(args.train_prompts / args.batch_size)
    sft_steps = args.sft_steps if sft else 0
    if (steps - sft_steps) % per_round or steps <= sft_steps:
        raise SystemExit(f"--sft-steps {sft_steps} leaves {steps - sft_steps} of {steps} steps, not a whole number of {per_round}-step rounds")
    if pt and not args.pt_store:
        raise SystemExit("the recipe arms with L_PT need --pt-store")
    said: list[str] = []
    rounds = run_minillm_rounds(MiniLLMRoundsConfig(
        student=args.student, teacher=args.teacher, prompts=prompts, out=folder, rounds=(steps - sft_steps) // per_round, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, k=args.k, seed=seed, device="cpu", progress=False, sft_steps=sft_steps, sft_lr=args.lr,
        teacher_mix=0.2 if mix else 0.0, pt_store=args.pt_store if pt else None), log=lambda line: (said.append(line), print(line, flush=True)))
    return {"rounds": [{**r.to_dict(), "student_entropy": r.entropy} for r in rounds], "reverse_kl": rounds[-1].reverse_kl,
            "rouge_l": rounds[-1].rouge_l, "student_entropy": rounds[-1].entropy, "teacher_response_loss": rounds[-1].teacher_response_loss,
            "response_tokens": rounds[-1].response_tokens, "round_seconds": round_seconds(folder), "lr": args.lr,
            "clipped_fraction": clipped_fraction(folder), "sft_steps": sft_steps, "teacher_mix": 0.2 if mix else 0.0, "pt_store": pt,
            "warnings": [line for line in said if "warning" in line]}


def fine_tune_teacher(args: argparse.Namespace) -> Path:
    """The teacher after `--teacher-sft-steps` of CE on the references of every round's prompts (scored by itself)."""
    folder = args.out_dir / "teacher-sft"
    if (folder / "student" / "model.safetensors").exists():
        return folder / "student"
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "references.zarr"
    if not (store.exists() and CacheReader(str(store), allow_incomplete=True).complete):
        every_round = write_prompt_manifest(args, "prompts-all-rounds.yaml", args.rounds * args.train_prompts)
        run_rollout(RolloutConfig(student=args.teacher, prompts=every_round, out=str(store), responses="references",
                                  batch_size=args.batch_size, device="cpu", overwrite=True, progress=False))
        engine = create_engine("hf", args.teacher, EngineOptions(device="cpu", batch_size=args.batch_size), max_k=args.k)
        score(args, engine, store)
    run_distill(DistillConfig(
        store=str(store), student=args.teacher, out=folder / "student", steps=args.teacher_sft_steps, seed=0,
        batch=BatchSettings(batch_size=args.batch_size), objective=ObjectiveSettings(kd=KDConfig(gamma=0.0)),
        optimizer=OptimizerSettings(lr=args.teacher_sft_lr, warmup=0, min_lr_ratio=1.0, weight_decay=0.0),
        sampler=SamplerSettings(name="uniform", update_every=args.teacher_sft_steps), parallel=ParallelSettings(device="cpu"),
        checkpoint=CheckpointSettings(resume="auto"), reporting=ReportingSettings(progress=False)))
    return folder / "student"


def save(args: argparse.Namespace, results: dict) -> None:
    """Results are written after every run, so a long benchmark killed half-way keeps what it measured."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def write_prompt_manifest(args: argparse.Namespace, name: str = "prompts.yaml", train_prompts: int | None = None) -> Path:
    document = {"seed": 1234, "name": "gsm8k", "prompt_template": "Question: {question}\nAnswer:", "reference_field": "answer",
                "train": {"path": "json", "data_files": str((args.corpus / "train.jsonl").resolve())},
                "test": {"path": "json", "data_files": str((args.corpus / "test.jsonl").resolve())},
                "train_prompts": train_prompts or args.train_prompts, "test_prompts": args.test_prompts,
                "max_prompt_tokens": args.max_prompt_tokens, "max_new_tokens": args.max_new_tokens}
    path = args.out_dir / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def score(args: argparse.Namespace, engine, store: Path) -> None:
    run_teacher_dump(TeacherDumpConfig(teacher=args.teacher, manifest=None, out=str(store), capture=Capture(k=args.k), engine="hf",
                                       engine_options=EngineOptions(device="cpu", batch_size=args.batch_size), progress=False), engine=engine)


def measure(args: argparse.Namespace, engine, prompts: Path, student: str, folder: Path) -> dict:
    """The held-out measures of one student: its own samples scored by the teacher, and its greedy answers' ROUGE-L."""
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "eval-rollouts.zarr"
    if not (store.exists() and CacheReader(str(store), allow_incomplete=True).complete):
        run_rollout(RolloutConfig(student=student, prompts=prompts, out=str(store), round=0, batch_size=args.batch_size, device="cpu",
                                  overwrite=True, progress=False))
        score(args, engine, store)
    reader = CacheReader(str(store))
    manifest = load_prompt_manifest(prompts)
    model, tokenizer = load_student(student, None)
    model.to(resolve_device("cpu"))
    greedy = evaluate_responses(model, tokenizer, load_prompts(manifest, "test"), manifest.max_prompt_tokens, manifest.max_new_tokens,
                                args.batch_size)
    return {"reverse_kl": reverse_kl_estimate(reader), "teacher_response_loss": reader.domain_info(manifest.name).teacher_valid_loss,
            "student_entropy": sample_entropy(store), "rouge_l": greedy.rouge_l, "response_tokens": greedy.mean_response_tokens}


def sample_entropy(store: Path) -> float:
    """The student's per-token entropy estimate on its sampled test responses (`response_quality.sample_entropy`)."""
    return library_sample_entropy(CacheReader(str(store)))


def round_seconds(folder: Path) -> list[dict]:
    """Rollout, scoring, evaluation and update seconds of each round, from rounds.jsonl."""
    rows = {}
    for line in (folder / "rounds.jsonl").read_text().splitlines():
        entry = json.loads(line)
        rows.setdefault(entry["round"], {}).update(entry.get("seconds", {}), **entry.get("update_seconds", {}))
    return [{"round": r, **{k: round(v, 1) for k, v in parts.items()}} for r, parts in sorted(rows.items())]


def clipped_fraction(folder: Path) -> list[float]:
    """Per round, the mean share of response tokens whose importance ratio the clip held, over the update's steps."""
    shares = []
    for run in sorted(folder.glob("round-*/student"), key=lambda p: int(p.parent.name.split("-")[1])):
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        values = [s["clipped_fraction"] for s in steps if "clipped_fraction" in s]
        shares.append(round(statistics.mean(values), 3) if values else float("nan"))
    return shares


def settings(args: argparse.Namespace) -> dict:
    return {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, cpu",
            "teacher": args.teacher, "student": args.student, "corpus": str(args.corpus), "train_prompts": args.train_prompts,
            "test_prompts": args.test_prompts, "max_prompt_tokens": args.max_prompt_tokens, "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "k": args.k,
            "sft_steps": args.sft_steps, "teacher_sft_steps": args.teacher_sft_steps, "teacher_sft_lr": args.teacher_sft_lr,
            "base_teacher": getattr(args, "base_teacher", args.teacher)}


def report(results: dict) -> str:
    setup, runs = results["setup"], results["runs"]
    arms = [a for a in ("teacher", "start", "sft", "word_kd", "minillm", "minillm_low_lr", *RECIPES) if any(k.startswith(f"{a}-") for k in runs)]
    lines = ["| arm | seeds | reverse KL (nats/token) | ROUGE-L | teacher CE on its samples | its own NLL (entropy) | greedy tokens |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [v for k, v in sorted(runs.items()) if k.startswith(f"{arm}-")]
        mean = lambda key: statistics.mean(r[key] for r in mine)  # noqa: E731
        per_seed = lambda key: ", ".join(f"{r[key]:.3f}" for r in mine)  # noqa: E731
        lines.append(f"| {arm} | {len(mine)} | {mean('reverse_kl'):.4f} ({per_seed('reverse_kl')}) | {mean('rouge_l'):.2f} "
                     f"({per_seed('rouge_l')}) | {mean('teacher_response_loss'):.4f} | {mean('student_entropy'):.4f} | "
                     f"{mean('response_tokens'):.1f} |")
    for arm in ("minillm", "minillm_low_lr", *RECIPES):
        minillm = {k: v for k, v in sorted(runs.items()) if k.startswith(f"{arm}-")}
        if not minillm:
            continue
        lines += ["", f"| {arm} (lr {next(iter(minillm.values())).get('lr')}) | " + " | ".join(minillm) + " |",
                  "|---|" + "---|" * len(minillm)]
        for r in range(len(next(iter(minillm.values()))["rounds"])):
            cells = [f"rev KL {m['rounds'][r]['reverse_kl']:.4f}, ROUGE-L {m['rounds'][r]['rouge_l']:.2f}, "
                     f"teacher CE {m['rounds'][r]['teacher_response_loss']:.3f}, entropy {m['rounds'][r].get('student_entropy', float('nan')):.3f}"
                     + (f", clipped {m['clipped_fraction'][r]:.2f}" if r < len(m.get("clipped_fraction", [])) else "") for m in minillm.values()]
            lines.append(f"| after {r} updates | " + " | ".join(cells) + " |")
        seconds = next(iter(minillm.values()))["round_seconds"]
        lines += ["", f"{arm}: seconds per round ({next(iter(minillm))}): " + "; ".join(
            f"round {s['round']}: " + ", ".join(f"{k} {v}" for k, v in s.items() if k != "round") for s in seconds)]
    lines += ["", f"Setup: {json.dumps(setup)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
