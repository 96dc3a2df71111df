"""Cross-tokenizer KD from the cache (issue 29): a student of another tokenizer, CE vs GOLD vs ULD, beside same-tokenizer KD.

The real teacher's cache (SmolLM2-135M-Instruct, `bench_quality.py`'s `quality.zarr`, which embeds its tokenizer) and
two students with the same body, the teacher pruned to 10 of its 30 layers (`bench_quality.py`'s `student-pruned10`),
and fresh embeddings:

- `other`: a byte-level BPE of `--vocab` tokens trained here with `tokenizers` on the text of the cache's *train*
  windows (decoded with the embedded tokenizer: no validation text leaks into the merges), its embeddings new;
- `same`: the teacher's own tokenizer, its embeddings re-initialised the same way (so the two differ in the
  tokenizer only, and the same-tokenizer gain of KD over CE is measured on an equal footing).

Arms, each `--steps` steps of `--batch-size` windows from the same seeded uniform stream, CE + `--gamma` x KD:

- `ce`, `gold`, `uld`: the `other` student, `distill --cross-tokenizer gold --gamma 0` (CE alone, on the same
  aligned windows), `--cross-tokenizer gold`, `--cross-tokenizer uld`;
- `same_ce`, `same_kd`: the `same` student, `distill --gamma 0` and the default top-64 KD.

Validation loss per domain **per byte** (nats per byte of text, so the two tokenizers compare): the cross arms'
evaluation reports it directly; the same-tokenizer arms' per-token loss is scaled by the teacher's tokens per byte of
the valid windows. Also the share of student positions aligned, of the teacher mass there that maps exactly, the
alignment's cost, and training throughput (text bytes per second).

    python benchmarks/bench_quality.py --teacher /work/teacher-smollm2 --manifest data_manifests/shared_corpora.yaml \\
        --out-dir /tmp/q --budget 16384 --valid 8 --seq-len 256 --student pruned --heal-steps 64 --heal-lr 1e-3 \\
        --eval-windows 2 --heal-only --arms kd_uniform              # quality.zarr and student-pruned10
    python benchmarks/bench_cross_tokenizer.py --store /tmp/q/quality.zarr --body /tmp/q/student-pruned10 \\
        --out-dir /tmp/xt --seeds 0 1 --json benchmarks/results/cross_tokenizer.json
    python benchmarks/bench_cross_tokenizer.py --json benchmarks/results/cross_tokenizer.json --report
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ddk_cache.choices import CrossTokenizer
from ddk_cache.stages.distill import (
    BatchSettings,
    DataSettings,
    DistillConfig,
    ObjectiveSettings,
    OptimizerSettings,
    ReportingSettings,
    SamplerSettings,
    run_distill,
)
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.cross_tokenizer_windows import CrossTokenizerView
from ddk_cache.training.losses import KDConfig
from ddk_cache.training.parallelize import ParallelSettings

ARMS = {
    "ce": {"student": "other", "cross": "gold", "gamma": 0.0},
    "gold": {"student": "other", "cross": "gold"},
    "uld": {"student": "other", "cross": "uld"},
    "same_ce": {"student": "same", "gamma": 0.0},
    "same_kd": {"student": "same"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/q/quality.zarr")
    parser.add_argument("--body", default="/tmp/q/student-pruned10", help="the students' body: a pruned teacher")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/xt"))
    parser.add_argument("--vocab", type=int, default=8192, help="the other tokenizer's vocabulary (BPE trained here)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=0.2, help="CE + gamma x KD in every KD arm (DDK's default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", action="store_true", help="print RESULTS.md's tables from --json and stop")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.json.read_text())))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    reader = CacheReader(args.store)
    students = {"other": other_student(args, reader), "same": same_student(args, reader)}
    view = CrossTokenizerView.for_store(reader, load_tokenizer(students["other"]), None, reader.domains, context=None)
    results["setup"] = settings(args, reader, view)
    results["alignment"] = alignment(reader, view)
    results["bytes_per_teacher_token"] = bytes_per_teacher_token(reader, view)
    save(args, results)
    runs = results.setdefault("runs", {})
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}-seed{seed}"
            if key in runs:
                print(f"{key}: recorded, skipped", flush=True)
                continue
            runs[key] = run_arm(args, arm, seed, students, view.seq_len, results["bytes_per_teacher_token"])
            print(f"{key}: {json.dumps(runs[key]['valid_per_byte'])} ({runs[key]['seconds']:.0f} s)", flush=True)
            save(args, results)
    print(report(results))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def train_windows_text(reader: CacheReader) -> list[str]:
    """The text of every train window, decoded with the store's own tokenizer (the BPE's training corpus)."""
    teacher = reader.load_tokenizer()
    texts = []
    for domain in reader.domains:
        tokens = reader.read_array(domain, "train", "tokens", 0, reader.domain_info(domain).split("train").windows)
        texts += teacher.batch_decode(tokens, skip_special_tokens=True)
    return texts


def other_student(args: argparse.Namespace, reader: CacheReader) -> Path:
    """The pruned body with a byte-level BPE of `--vocab` tokens trained on the train windows, embeddings fresh."""
    folder = args.out_dir / f"student-bpe{args.vocab}"
    if (folder / "model.safetensors").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(train_windows_text(reader), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    return fresh_embeddings(args.body, tokenizer, folder)


def same_student(args: argparse.Namespace, reader: CacheReader) -> Path:
    """The same body with the teacher's tokenizer and embeddings re-initialised as the other student's."""
    folder = args.out_dir / "student-same"
    if (folder / "model.safetensors").exists():
        return folder
    return fresh_embeddings(args.body, reader.load_tokenizer(), folder)


def fresh_embeddings(body: str, tokenizer, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(body)
    model.resize_token_embeddings(len(tokenizer))
    model.get_input_embeddings().weight.data.normal_(0.0, model.config.initializer_range)
    if not model.config.tie_word_embeddings:
        model.get_output_embeddings().weight.data.normal_(0.0, model.config.initializer_range)
    model.config.update({"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                         "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def alignment(reader: CacheReader, view: CrossTokenizerView) -> dict:
    """Coverage over every train window, per domain, and the alignment's cost per window."""
    out = {}
    for domain in reader.domains:
        windows = reader.domain_info(domain).split("train").windows
        started = time.perf_counter()
        coverage = view.coverage(reader, [domain], windows)
        seconds = time.perf_counter() - started
        out[domain] = {**coverage.to_dict(), "ms_per_window": 1000 * seconds / windows}
    out["exact_vocab_share"] = float((view.mapping.teacher_to_student >= 0).mean())
    return out


def bytes_per_teacher_token(reader: CacheReader, view: CrossTokenizerView) -> dict[str, float]:
    """Per domain, text bytes per predicted teacher token over the valid windows (to put per-token losses per byte)."""
    out = {}
    for domain in reader.domains:
        block = reader.read(domain, "valid", 0, reader.domain_info(domain).split("valid").windows)
        windows = view.windows(block)
        out[domain] = float(windows.teacher_units.sum()) / float(block.tokens[:, 1:].size)
    return out


def run_arm(args: argparse.Namespace, arm: str, seed: int, students: dict[str, Path], seq_len: int, per_token: dict) -> dict:
    spec = ARMS[arm]
    out = args.out_dir / f"{arm}-seed{seed}"
    cross = spec.get("cross", "off")
    started = time.perf_counter()
    summary = run_distill(DistillConfig(
        store=args.store, student=str(students[spec["student"]]), out=out, steps=args.steps, seed=seed,
        batch=BatchSettings(batch_size=args.batch_size), optimizer=OptimizerSettings(lr=args.lr),
        objective=ObjectiveSettings(kd=KDConfig(gamma=spec.get("gamma", args.gamma)), cross_tokenizer=CrossTokenizer(cross)),
        data=DataSettings(student_seq_len=seq_len if cross != "off" else None),
        sampler=SamplerSettings(name="uniform", update_every=args.steps), parallel=ParallelSettings(device="cpu"),
        reporting=ReportingSettings(progress=False)))
    seconds = time.perf_counter() - started
    final = {e.domain: e for e in summary.final_eval}
    per_byte = {d: (e.student_loss if e.per == "byte" else e.student_loss * (1.0 / per_token[d])) for d, e in final.items()}
    teacher = {d: (e.teacher_loss if e.per == "byte" else e.teacher_loss / per_token[d]) for d, e in final.items()}
    tokens_per_step = args.batch_size * (seq_len if cross != "off" else CacheReader(args.store).header.seq_len)
    step_seconds = tokens_per_step / summary.tokens_per_second if summary.tokens_per_second else float("nan")
    return {"valid_per_byte": {d: round(v, 5) for d, v in per_byte.items()}, "teacher_per_byte": {d: round(v, 5) for d, v in teacher.items()},
            "per": sorted({e.per for e in final.values()}), "step_seconds": step_seconds, "seconds": seconds}


def settings(args: argparse.Namespace, reader: CacheReader, view: CrossTokenizerView) -> dict:
    return {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, cpu",
            "store": args.store, "body": args.body, "vocab": args.vocab, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "gamma": args.gamma, "teacher_seq_len": reader.header.seq_len, "student_seq_len": view.seq_len,
            "teacher_vocab": reader.header.tokenizer.size}


def save(args: argparse.Namespace, results: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def report(results: dict) -> str:
    runs = results.get("runs", {})
    arms = [a for a in ARMS if any(k.startswith(f"{a}-seed") for k in runs)]
    seeds = sorted({int(k.rsplit("-seed", 1)[1]) for k in runs})
    domains = list(next(iter(runs.values()))["valid_per_byte"]) if runs else []
    mean = statistics.fmean
    rows = ["| arm | seeds | " + " | ".join(domains) + " | mean | s/step |", "|---|---|" + "---|" * (len(domains) + 2)]
    for arm in arms:
        mine = [runs[f"{arm}-seed{s}"] for s in seeds if f"{arm}-seed{s}" in runs]
        cells = [f"{mean([r['valid_per_byte'][d] for r in mine]):.4f}" for d in domains]
        rows.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) +
                    f" | {mean([mean(list(r['valid_per_byte'].values())) for r in mine]):.4f} | {mean([r['step_seconds'] for r in mine]):.2f} |")
    out = ["Validation loss, nats per byte (lower is better), mean over seeds:", "\n".join(rows)]
    gains = ["| seed | domain | CE - gold | CE - uld | same: CE - KD | gold's share of the same-tokenizer gain |", "|---|---|---|---|---|---|"]
    for s in seeds:
        try:
            ce, gold, uld, same_ce, same_kd = (runs[f"{a}-seed{s}"]["valid_per_byte"] for a in ("ce", "gold", "uld", "same_ce", "same_kd"))
        except KeyError:
            continue
        for d in domains:
            same_gain = same_ce[d] - same_kd[d]
            share = (ce[d] - gold[d]) / same_gain if same_gain > 0 else float("nan")
            gains.append(f"| {s} | {d} | {ce[d] - gold[d]:+.4f} | {ce[d] - uld[d]:+.4f} | {same_gain:+.4f} | {share:.2f} |")
    out += ["Gains per seed and domain (nats/byte; positive: KD helps):", "\n".join(gains)]
    align = results.get("alignment", {})
    rows = ["| domain | aligned positions | teacher mass mapping exactly | cut tokens | alignment ms/window |", "|---|---|---|---|---|"]
    for d in domains:
        a = align.get(d, {})
        if a:
            rows.append(f"| {d} | {a['aligned_share']:.1%} | {a['exact_mass_share']:.1%} | {a['cut_share']:.1%} | {a['ms_per_window']:.1f} |")
    out += [f"Alignment over every train window (teacher ids with an exact student twin: {align.get('exact_vocab_share', float('nan')):.1%}):",
            "\n".join(rows)]
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
