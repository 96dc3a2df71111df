"""Loss + backward of CE + KD on sparse targets: the fused path (`training/fused_loss.py`) against the dense one.

Each measurement is its own child process, so its peak resident memory (`ru_maxrss`, what the machine has to
have) is the loss path's alone, measured the same way for both; fused and dense alternate in one run, and the
result is their ratio. The student's body is left out: the inputs are random final hidden states `[tokens, d]`
and a random head `[V, d]` (d = 576, SmolLM2-135M's width), the targets a top-W cache. Run:

    python benchmarks/bench_fused_loss.py --vocab 49152 128256 --tokens 2048 --width 16 64 --repeats 2 \
        --json benchmarks/results/fused_loss_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(impl: str, vocab: int, tokens: int, width: int, dim: int) -> dict:
    """In this (child) process: one loss + backward; its time and the process's peak memory."""
    import torch

    from ddk_cache.lm_head import LMHead
    from ddk_cache.training.fused_loss import fused_distillation_loss
    from ddk_cache.training.losses import KDConfig, TeacherTargets, distillation_loss

    def loss_of(hidden, weight, labels, teacher):
        if impl == "fused":
            return fused_distillation_loss(hidden, LMHead(weight), labels, teacher, KDConfig()).total
        return distillation_loss(hidden @ weight.t(), labels, teacher, KDConfig()).total

    torch.manual_seed(0)
    small = torch.randn(8, dim, requires_grad=True), torch.randn(256, dim, requires_grad=True)  # warm-up: first-call set-up not counted
    loss_of(*small, torch.zeros(8, dtype=torch.long), TeacherTargets(torch.zeros(8, width, dtype=torch.long), torch.zeros(8, width))).backward()
    hidden = torch.empty(tokens, dim).normal_().requires_grad_()  # no temporaries: the peak before the loss is these tensors
    weight = torch.empty(vocab, dim).normal_(0, 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    ids = torch.randint(0, vocab, (tokens, width)).sort(-1).values
    teacher = TeacherTargets(ids, torch.log_softmax(torch.randn(tokens, width), -1) - 0.1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = loss_of(hidden, weight, labels, teacher)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl, "vocab": vocab, "tokens": tokens, "width": width, "seconds": seconds, "peak_mib": peak / 1024,
            "loss_path_mib": (peak - before) / 1024, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--width", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, vocab, tokens, width, dim = args.child
        print(json.dumps(measure(impl, int(vocab), int(tokens), int(width), int(dim))))
        return
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for width in args.width:
                runs: dict[str, list[dict]] = {"dense": [], "fused": []}
                for _ in range(args.repeats):
                    for impl in ("dense", "fused"):  # alternating: the machine's drift hits both
                        child = [sys.executable, __file__, "--child", impl, str(vocab), str(tokens), str(width), str(args.dim)]
                        runs[impl].append(json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout))
                dense, fused = ({key: statistics.median(r[key] for r in runs[impl]) for key in ("seconds", "loss_path_mib", "loss")}
                                for impl in ("dense", "fused"))
                row = {"vocab": vocab, "tokens": tokens, "width": width, "dense": dense, "fused": fused,
                       "memory_ratio": fused["loss_path_mib"] / dense["loss_path_mib"], "time_ratio": fused["seconds"] / dense["seconds"],
                       "loss_difference": abs(fused["loss"] - dense["loss"])}
                rows.append(row)
                print(f"V={vocab:>7} N={tokens:>5} W={width:>3}: loss-path memory dense {dense['loss_path_mib']:8.1f} MiB, fused "
                      f"{fused['loss_path_mib']:7.1f} MiB ({row['memory_ratio']:.3f}x); time dense {dense['seconds']:6.2f} s, fused "
                      f"{fused['seconds']:6.2f} s ({row['time_ratio']:.2f}x); |loss difference| {row['loss_difference']:.1e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
