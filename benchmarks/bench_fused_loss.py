"""The fused loss path (`training/fused_loss.py`, `lm_head.py`) against the dense one: memory and time, side by side.

Three measurements, each fused / dense (or chunked / whole) alternating in one run, each in its own child process;
memory is the growth of the peak resident memory (VmHWM, reset with `clear_refs` just before; what the machine has
to have) over the measured part, measured the same way for both:

- `loss`: CE + KD (DDK's: forward KL, rest tail, gamma 0.2) and its backward alone, from random final hidden
  states `[tokens, d]` (d = 576, SmolLM2-135M's width) and a random head `[V, d]`, targets a top-W cache.
  "Loss-path memory" is the growth of the peak over the loss and its backward.
- `step`: a whole training step (forward, loss, backward, AdamW) of a small body (2 layers, d = 256) with a
  V-token head, and the largest micro-batch (windows of 512 tokens, doubling) whose step fits an address-space
  limit (RLIMIT_AS) of `--budget-gib`, for each path.
- `teacher`: the HF engine's capture (top-64 of a random teacher with a V-token vocabulary, 2 layers, d = 576):
  the head applied a row block at a time (today) against the whole `[tokens x V]` logits first (before issue 26),
  and the bare forward with whole logits, for the dump / forward ratio.

    python benchmarks/bench_fused_loss.py loss --vocab 49152 128256 262144 --tokens 2048 --width 16 64 --repeats 2
    python benchmarks/bench_fused_loss.py loss --vocab 49152 128256 --tokens 8192 --width 16 --repeats 1
    python benchmarks/bench_fused_loss.py step --vocab 128256 --budget-gib 6
    python benchmarks/bench_fused_loss.py teacher --vocab 262144 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import resource  # RLIMIT_AS for the micro-batch search
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM = 576


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def _start_peak() -> float:
    """Reset the process's peak resident memory (Linux: `clear_refs` 5) and return the resident memory now, so that
    `_peak_mib() - _start_peak()` is the growth of what follows alone, whatever came before (a model's initialisation)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def measure_loss(impl: str, vocab: int, tokens: int, width: int) -> dict:
    """In this (child) process: one loss + backward; its time and the growth of the process's peak memory."""
    import torch

    from ddk_cache.lm_head import LMHead
    from ddk_cache.training.fused_loss import fused_distillation_loss
    from ddk_cache.training.losses import KDConfig, TeacherTargets, distillation_loss

    def loss_of(hidden, weight, labels, teacher):
        if impl == "fused":
            return fused_distillation_loss(hidden, LMHead(weight), labels, teacher, KDConfig()).total
        return distillation_loss(hidden @ weight.t(), labels, teacher, KDConfig()).total

    torch.manual_seed(0)
    small = torch.randn(8, DIM, requires_grad=True), torch.randn(256, DIM, requires_grad=True)  # warm-up: first-call set-up not counted
    loss_of(*small, torch.zeros(8, dtype=torch.long), TeacherTargets(torch.zeros(8, width, dtype=torch.long), torch.zeros(8, width))).backward()
    hidden = torch.empty(tokens, DIM).normal_().requires_grad_()  # no temporaries: the peak before the loss is these tensors
    weight = torch.empty(vocab, DIM).normal_(0, 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    ids = torch.randint(0, vocab, (tokens, width)).sort(-1).values
    teacher = TeacherTargets(ids, torch.log_softmax(torch.randn(tokens, width), -1) - 0.1)
    before = _start_peak()
    start = time.perf_counter()
    loss = loss_of(hidden, weight, labels, teacher)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "memory_mib": _peak_mib() - before, "loss": loss.item()}


STEP_SEQ = 512


def measure_step(impl: str, vocab: int, windows: int) -> dict:
    """One training step of a small body with a `vocab` head on `windows` x 512 tokens (after a 1-window warm-up step)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.training.losses import KDConfig, TeacherTargets
    from ddk_cache.training.objectives import KDObjective
    from ddk_cache.training.student_outputs import student_outputs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=STEP_SEQ, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = KDObjective(KDConfig(), teacher_vocab=vocab)

    def step(n: int) -> float:
        tokens = torch.randint(0, vocab, (n, STEP_SEQ + 1))
        teacher = TeacherTargets(torch.randint(0, vocab, (n, STEP_SEQ, 16)), torch.log_softmax(torch.randn(n, STEP_SEQ, 16), -1) - 0.1)
        outputs = student_outputs(model, tokens[:, :-1], impl)
        loss = objective.loss_on(outputs, tokens[:, 1:], teacher, None).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step(1)
    before = _start_peak()
    start = time.perf_counter()
    loss = step(windows)
    return {"seconds": time.perf_counter() - start, "memory_mib": _peak_mib() - before, "loss": loss}


class _WholeLogits:
    """Before issue 26: the forward's whole `[B, L, V]` logits, then captured a row block at a time (identity head)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def logits(self, rows):
        return rows


def measure_teacher(impl: str, vocab: int, tokens: int) -> dict:
    """The HF engine's top-64 capture of `tokens` positions (windows of 512), or the bare forward (`forward`)."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.engines import hf as hf_engine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=DIM, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=STEP_SEQ + 1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    windows = np.random.default_rng(0).integers(0, vocab, size=(tokens // STEP_SEQ, STEP_SEQ + 1))
    engine = hf_engine.HFTeacherEngine.__new__(hf_engine.HFTeacherEngine)  # the engine's scoring on a model built here
    engine.model, engine.device, engine.batch_size = model, torch.device("cpu"), len(windows)
    if impl == "whole":
        hf_engine.hidden_states = lambda m, inputs: (m(input_ids=inputs, use_cache=False).logits, _WholeLogits(vocab))
    with torch.inference_mode():
        engine.score(windows[:1, :9], 64) if impl != "forward" else model(input_ids=torch.as_tensor(windows[:1, :8]))
        before = _start_peak()
        start = time.perf_counter()
        if impl == "forward":
            model(input_ids=torch.as_tensor(windows[:, :-1]), use_cache=False)
        else:
            engine.score(windows, 64)
    return {"seconds": time.perf_counter() - start, "memory_mib": _peak_mib() - before}


def child(args: list[str], limit_bytes: int | None = None) -> dict | None:
    """One measurement in a fresh process; None if it ran out of `limit_bytes` of address space."""
    limited = None if limit_bytes is None else (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes)))
    result = subprocess.run([sys.executable, __file__, "child", *args], capture_output=True, text=True, preexec_fn=limited)
    if result.returncode != 0:
        if limit_bytes is not None and ("allocate memory" in result.stderr or "MemoryError" in result.stderr):
            return None
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.splitlines()[-1])


def median_pair(args: list[str], impls: tuple[str, ...], repeats: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:  # alternating: the machine's drift hits both
            runs[impl].append(child([args[0], impl, *args[1:]]))
    return {impl: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for impl, rs in runs.items()}


def fused_vs_dense(m: dict[str, dict]) -> tuple[dict, str]:
    """The two ratios of a fused / dense pair of medians, and the line that says them."""
    ratios = {"memory_ratio": m["fused"]["memory_mib"] / m["dense"]["memory_mib"], "time_ratio": m["fused"]["seconds"] / m["dense"]["seconds"]}
    return ratios, (f"memory dense {m['dense']['memory_mib']:8.1f} MiB, fused {m['fused']['memory_mib']:7.1f} MiB ({ratios['memory_ratio']:.3f}x); "
                    f"time dense {m['dense']['seconds']:6.2f} s, fused {m['fused']['seconds']:6.2f} s ({ratios['time_ratio']:.2f}x)")


def run_loss(args) -> list[dict]:
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for width in args.width:
                m = median_pair(["loss", str(vocab), str(tokens), str(width)], ("dense", "fused"), args.repeats)
                ratios, said = fused_vs_dense(m)
                row = {"vocab": vocab, "tokens": tokens, "width": width, **m, **ratios, "loss_difference": abs(m["fused"]["loss"] - m["dense"]["loss"])}
                rows.append(row)
                print(f"loss V={vocab:>7} N={tokens:>5} W={width:>3}: {said}; |loss difference| {row['loss_difference']:.1e}", flush=True)
    return rows


def run_step(args) -> list[dict]:
    rows = []
    for vocab in args.vocab:
        m = median_pair(["step", str(vocab), str(args.step_windows)], ("dense", "fused"), args.repeats)
        largest = {}
        for impl in ("dense", "fused"):  # the largest micro-batch whose step fits the budget, doubling
            largest[impl], windows = 0, 1
            while windows <= args.max_windows and child(["step", impl, str(vocab), str(windows)], int(args.budget_gib * 2**30)) is not None:
                largest[impl], windows = windows, windows * 2
        ratios, said = fused_vs_dense(m)
        rows.append({"vocab": vocab, "windows": args.step_windows, "seq": STEP_SEQ, **m, **ratios, "budget_gib": args.budget_gib,
                     "largest_windows": largest})
        print(f"step V={vocab:>7} {args.step_windows} x {STEP_SEQ} tokens: {said}; largest micro-batch in {args.budget_gib} GiB: dense "
              f"{largest['dense']} windows, fused {largest['fused']} (max tried {args.max_windows})", flush=True)
    return rows


def run_teacher(args) -> list[dict]:
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            m = median_pair(["teacher", str(vocab), str(tokens)], ("whole", "chunked", "forward"), args.repeats)
            row = {"vocab": vocab, "tokens": tokens, **m, "memory_ratio": m["chunked"]["memory_mib"] / m["whole"]["memory_mib"],
                   "dump_over_forward": {impl: m[impl]["seconds"] / m["forward"]["seconds"] for impl in ("whole", "chunked")}}
            rows.append(row)
            print(f"teacher V={vocab:>7} N={tokens:>5}: capture memory whole logits {m['whole']['memory_mib']:8.1f} MiB, chunked "
                  f"{m['chunked']['memory_mib']:7.1f} MiB ({row['memory_ratio']:.3f}x); time whole {m['whole']['seconds']:6.2f} s, chunked "
                  f"{m['chunked']['seconds']:6.2f} s, bare forward {m['forward']['seconds']:6.2f} s", flush=True)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["child"]:
        kind, impl, *numbers = sys.argv[2:]
        measure = {"loss": measure_loss, "step": measure_step, "teacher": measure_teacher}[kind]
        print(json.dumps(measure(impl, *(int(n) for n in numbers))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["loss", "step", "teacher"])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
    parser.add_argument("--width", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--step-windows", type=int, default=4, help="step: windows of 512 tokens in the timed step")
    parser.add_argument("--budget-gib", type=float, default=6.0, help="step: the address-space limit of the micro-batch search")
    parser.add_argument("--max-windows", type=int, default=32, help="step: the search stops here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = {"loss": run_loss, "step": run_step, "teacher": run_teacher}[args.kind](args)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
