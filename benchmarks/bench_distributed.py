"""Stage two on several processes: scaling from 1 to 2 ranks, and peak memory per rank under DDP and FSDP2.

Both measured with the real `distill` command under real `torchrun` (gloo, CPU, one thread per process):

- scaling: the same run (same global batch, seed, student) on 1 process and on 2 ranks (DDP), alternated
  `--repeats` times so the machine's noise hits both; student tokens/s per step from metrics.jsonl
  (median over the steps after the first two), efficiency = rate(2) / (2 x rate(1));
- memory: a ~100M-parameter student for a few steps under 2-rank DDP and 2-rank FSDP2; each rank reports
  its peak resident memory (ru_maxrss) at exit.

    python benchmarks/bench_distributed.py --store /tmp/bench/dist.zarr --tokenizer /work/teacher-smollm2 \\
        --out-dir /tmp/bench_distributed --json benchmarks/results/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np


def rank_main(memory_file: str, argv: list[str]) -> None:
    """One rank: run `ddk-cache ARGV`, then append this process's peak RSS and model-state bytes to `memory_file`.

    Model state = this rank's own parameters (the local shard under FSDP) plus AdamW's moments, counted
    exactly from the tensors at the end of training; gradients take as much again as the parameters.
    """
    import atexit

    from ddk_cache.stages.distill import Trainer

    state: dict[str, float] = {}
    save_student = Trainer.save_student

    def counting_save_student(self) -> None:
        local = lambda t: getattr(t, "_local_tensor", t)  # noqa: E731 - a DTensor's own shard
        params = sum(local(p).numel() * local(p).element_size() for p in self.model.parameters())
        moments = sum(local(v).numel() * local(v).element_size() for s in self.optimizer.state.values() for v in s.values()
                      if hasattr(v, "numel") and v.dim() > 0)
        state.update(params_mib=params / 2**20, optimizer_mib=moments / 2**20)
        save_student(self)

    Trainer.save_student = counting_save_student

    def report() -> None:
        with open(memory_file, "a") as out:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "max_rss_mib": peak, **state}) + "\n")

    atexit.register(report)
    from ddk_cache.cli.main import main

    sys.argv = ["ddk-cache", *argv]
    main()


def write_student(tokenizer_dir: str, out: Path, hidden: int, layers: int) -> int:
    """A config-only Llama student folder (distill builds it with seeded weights); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 192), max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def run(ranks: int, out: Path, args: argparse.Namespace, student: Path, steps: int, parallel: str, extra: tuple[str, ...] = ()) -> dict:
    """One distill run; its step rates and each rank's peak memory."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    memory_file = out / "memory.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]
    distill = ["distill", "--store", args.store, "--student", str(student), "--out", str(out / "run"), "--steps", str(steps),
               "--device", "cpu", "--no-progress", "--sampler", "uniform", "--update-every", str(steps), "--eval-windows", "1",
               "--eval-batch-size", "1", "--parallel", parallel, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([*launcher, __file__, "rank", str(memory_file), "--", *distill], check=True, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][2:]
    memory = sorted((json.loads(line) for line in memory_file.read_text().splitlines()), key=lambda m: m["rank"])
    return {"tokens_per_s": float(np.median(rates)) if rates else None, "max_rss_mib": [round(m["max_rss_mib"]) for m in memory],
            "model_state_mib": [round(m.get("params_mib", 0) * 2 + m.get("optimizer_mib", 0)) for m in memory]}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "rank":
        rank_main(sys.argv[2], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--tokenizer", required=True, help="the teacher's tokenizer folder")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="steps per scaling run (the first two are not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="1-process / 2-rank pairs, alternated")
    parser.add_argument("--hidden", type=int, default=256, help="scaling student: hidden size (4 layers: the quickstart's student)")
    parser.add_argument("--memory-hidden", type=int, default=768, help="memory student: hidden size")
    parser.add_argument("--memory-layers", type=int, default=10, help="memory student: layers (768 x 10: about 100M parameters)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    small = args.out_dir / "student-small"
    small_params = write_student(args.tokenizer, small, args.hidden, 4)
    per_rank = args.global_batch_size // 2
    single, double = [], []
    for repeat in range(0 if args.skip_scaling else args.repeats):
        single.append(run(1, args.out_dir / f"scale-1-{repeat}", args, small, args.steps, "none",
                          ("--global-batch-size", str(args.global_batch_size), "--batch-size", str(per_rank))))
        double.append(run(2, args.out_dir / f"scale-2-{repeat}", args, small, args.steps, "ddp",
                          ("--global-batch-size", str(args.global_batch_size), "--batch-size", str(per_rank))))
        print(f"repeat {repeat}: 1 process {single[-1]['tokens_per_s']:.0f} tok/s, 2 ranks {double[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    efficiency = [d["tokens_per_s"] / (2 * s["tokens_per_s"]) for s, d in zip(single, double)]
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU, gloo, one thread per process",
        "store": args.store,
    }
    if not args.skip_scaling:
        results["scaling"] = {
            "student": f"Llama {args.hidden} x 4 layers, {small_params / 1e6:.1f}M parameters",
            "global_batch_windows": args.global_batch_size,
            "one_process": {"micro_batch": per_rank, "grad_accum": 2, "tokens_per_s": [round(s["tokens_per_s"], 1) for s in single],
                            "max_rss_mib": [s["max_rss_mib"] for s in single]},
            "two_ranks_ddp": {"micro_batch": per_rank, "grad_accum": 1, "tokens_per_s": [round(d["tokens_per_s"], 1) for d in double],
                              "max_rss_mib": [d["max_rss_mib"] for d in double]},
            "speedup": [round(2 * e, 3) for e in efficiency],
            "efficiency": [round(e, 3) for e in efficiency],
            "efficiency_median": round(float(np.median(efficiency)), 3),
        }
    if not args.skip_memory:
        big = args.out_dir / "student-100m"
        big_params = write_student(args.tokenizer, big, args.memory_hidden, args.memory_layers)
        memory = {mode: run(2, args.out_dir / f"memory-{mode}", args, big, args.memory_steps, mode, ("--global-batch-size", "2", "--batch-size", "1"))
                  for mode in ("ddp", "fsdp")}
        results["memory"] = {
            "student": f"Llama {args.memory_hidden} x {args.memory_layers} layers, {big_params / 1e6:.1f}M parameters, float32, AdamW",
            "ranks": 2,
            "ddp_max_rss_mib_per_rank": memory["ddp"]["max_rss_mib"],
            "fsdp_max_rss_mib_per_rank": memory["fsdp"]["max_rss_mib"],
            "fsdp_over_ddp": round(float(np.mean(memory["fsdp"]["max_rss_mib"]) / np.mean(memory["ddp"]["max_rss_mib"])), 3),
            "ddp_model_state_mib_per_rank": memory["ddp"]["model_state_mib"],
            "fsdp_model_state_mib_per_rank": memory["fsdp"]["model_state_mib"],
            "ddp_tokens_per_s": round(memory["ddp"]["tokens_per_s"] or 0, 1),
            "fsdp_tokens_per_s": round(memory["fsdp"]["tokens_per_s"] or 0, 1),
        }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
