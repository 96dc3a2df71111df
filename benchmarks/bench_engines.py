"""Stage one's two engines side by side: the HF engine against vLLM (its CPU build on CPU machines), on the same
packed windows of the real teacher, and the vLLM dump against vLLM's own bare pass.

Both engines are loaded once in this process, then passes alternate (HF dump, vLLM dump, vLLM bare pass, and
again), each dump into a fresh copy of one packed store, because the machines are shared and noisy: ratios
measured in the same minutes are the result. The bare pass sends exactly the dump's requests
(`prompt_logprobs=k`, the forced last token) and throws the outputs away: the most a vLLM dump can reach.
Start-up (loading each engine) is timed too, and from it and the two rates the number of tokens from which
vLLM's start-up pays for itself (null when vLLM is not faster per token); then one whole `teacher-dump` process
per engine. `registry.CPU_VLLM_OVER_HF` and `--engine auto`'s rule on CPUs come from this.

    ddk-cache fetch-demo-teacher /tmp/teacher
    python benchmarks/bench_engines.py --teacher /tmp/teacher --manifest data_manifests/shared_corpora.yaml \
        --out-dir /tmp/bench-engines --budget 4096 --valid 2 --rounds 3 --k 64
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.format import SPLITS, TOKENS

sys.path.insert(0, str(Path(__file__).parent))
from bench_teacher_dump import derived_manifest  # noqa: E402


def pack(teacher: str, manifest: Path, out: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "ddk_cache.cli", "pack", "--tokenizer", teacher, "--manifest", str(manifest),
                             "--out", str(out), "--overwrite", "--no-progress"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return out


def packed_windows(packed: Path) -> np.ndarray:
    import zarr

    root = zarr.open_group(str(packed), mode="r")
    header = root.attrs["ddk_cache"]
    return np.concatenate([root[f"{d}/{s}/{TOKENS}"][:] for d in header["domains"] for s in SPLITS])


def dump_pass(engine, name: str, teacher: str, packed: Path, work: Path, k: int, options: EngineOptions) -> float:
    """Tokens/s of `run_teacher_dump` scoring a fresh copy of the packed store with the loaded `engine`."""
    out = work / f"{name}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(packed, out)
    config = TeacherDumpConfig(teacher=teacher, manifest=None, out=str(out), capture=Capture(k=k), engine=name,
                               engine_options=options, progress=False)
    summary = run_teacher_dump(config, engine=engine)
    return summary.tokens_per_second


def bare_vllm_pass(engine, windows: np.ndarray, k: int) -> float:
    """Tokens/s of vLLM answering the dump's requests, outputs discarded: the engine's own limit."""
    from vllm.inputs import TokensPrompt

    from ddk_cache.engines.vllm_engine import build_sampling_params

    start = time.perf_counter()
    for first in range(0, len(windows), engine.options.windows_per_call):
        block = windows[first : first + engine.options.windows_per_call]
        engine.llm.generate([TokensPrompt(prompt_token_ids=w[:-1].tolist()) for w in block],
                            [build_sampling_params(k, w[-1], engine.flat) for w in block], use_tqdm=False)
    return windows.shape[0] * (windows.shape[1] - 1) / (time.perf_counter() - start)


def whole_process(engine: str, teacher: str, packed: Path, work: Path, k: int, extra: list[str]) -> float:
    """Seconds of a whole `ddk-cache teacher-dump` process (imports, engine start-up, scoring, writing)."""
    out = work / f"cli-{engine}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(packed, out)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ddk_cache.cli", "teacher-dump", "--teacher", teacher, "--out", str(out),
                             "--k", str(k), "--engine", engine, "--no-progress", *extra], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--manifest", type=Path, default=Path("data_manifests/shared_corpora.yaml"))
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=4096, help="training tokens per domain")
    parser.add_argument("--valid", type=int, default=2, help="validation windows per domain")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="HF engine windows per forward pass")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (faster start, slower passes)")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the whole-process runs")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "engines.json")
    args = parser.parse_args()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = derived_manifest(args.manifest, args.out_dir, args.budget, args.valid)
    packed = pack(args.teacher, manifest, args.out_dir / "packed.zarr")
    windows = packed_windows(packed)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    hf_options = EngineOptions(device="cpu", dtype="float32", batch_size=args.batch_size)
    vllm_options = EngineOptions(dtype="auto", enforce_eager=args.enforce_eager)

    start = time.perf_counter()
    hf = create_engine("hf", args.teacher, hf_options, max_k=args.k)
    hf_start = time.perf_counter() - start
    start = time.perf_counter()
    vllm = create_engine("vllm", args.teacher, vllm_options, max_k=args.k)
    vllm_start = time.perf_counter() - start
    bare_vllm_pass(vllm, windows[:8], args.k)  # vLLM's first requests warm its kernels: not throughput

    rates: dict[str, list[float]] = {"hf_dump": [], "vllm_dump": [], "vllm_bare": []}
    for round_ in range(args.rounds):
        rates["hf_dump"].append(dump_pass(hf, "hf", args.teacher, packed, args.out_dir, args.k, hf_options))
        rates["vllm_dump"].append(dump_pass(vllm, "vllm", args.teacher, packed, args.out_dir, args.k, vllm_options))
        rates["vllm_bare"].append(bare_vllm_pass(vllm, windows, args.k))
        print(f"round {round_}: " + ", ".join(f"{key} {values[-1]:,.0f} tok/s" for key, values in rates.items()), flush=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    saved_per_token = 1 / median["hf_dump"] - 1 / median["vllm_dump"]
    break_even = (vllm_start - hf_start) / saved_per_token if saved_per_token > 0 else None
    result = {
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": __import__("os").cpu_count()},
        "teacher": args.teacher, "k": args.k, "tokens_per_pass": tokens, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1] - 1),
        "vllm": vllm.describe(), "hf": hf.describe(),
        "rates_tokens_per_s": rates, "median_tokens_per_s": median,
        "vllm_over_hf": median["vllm_dump"] / median["hf_dump"],
        "vllm_dump_over_bare": median["vllm_dump"] / median["vllm_bare"],
        "startup_s": {"hf": hf_start, "vllm": vllm_start},
        "break_even_tokens": break_even,
    }
    del hf, vllm
    if not args.skip_cli:  # one whole process each, alternating order would need more rounds than 2 cores allow
        eager = ["--enforce-eager"] if args.enforce_eager else []
        result["whole_process_s"] = {
            "hf": whole_process("hf", args.teacher, packed, args.out_dir, args.k, ["--device", "cpu", "--dtype", "float32",
                                                                                  "--batch-size", str(args.batch_size)]),
            "vllm": whole_process("vllm", args.teacher, packed, args.out_dir, args.k, eager),
        }
    print(json.dumps({key: result[key] for key in ("median_tokens_per_s", "vllm_over_hf", "vllm_dump_over_bare", "startup_s",
                                                     "break_even_tokens") + (("whole_process_s",) if "whole_process_s" in result else ())},
                     indent=1))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
