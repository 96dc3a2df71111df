"""`ddk-cache teacher-dump`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.choices import CaptureMode, DType, EngineName
from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import OutStore, Overwrite, Progress, StorageOptions, parse_storage_options
from ddk_cache.cli.output import console, say
from ddk_cache.tables import name_table


def teacher_dump(
    teacher: Annotated[str, typer.Option(help="Teacher model: a local folder or hub id that AutoModelForCausalLM loads.")],
    out: OutStore,
    manifest: Annotated[Optional[Path], typer.Option(
        help="Data manifest (YAML): pack its domains and score them in one command. Without it, --out must be a store "
             "that `ddk-cache pack` wrote: its windows are scored in place.")] = None,
    mode: Annotated[CaptureMode, typer.Option(help="What to keep per position: topk (k most likely), topp (fewest reaching --top-p, at most --k), sampled (--draws samples: distinct ids + counts, unbiased) or headtail (the --k most likely exactly, plus --draws samples of the rest: unbiased, the variance only in the tail). sampled and headtail train with forward KL, --tail rest and T = 1 only, on the hf engine; for such caches headtail --k 4 --draws 16 or sampled --draws 32 distilled better than topk at 3-4x fewer bytes (benchmarks/RESULTS.md). topk stays the default: vLLM writes it and every loss accepts it.", rich_help_panel="Capture")] = CaptureMode.topk,
    k: Annotated[int, typer.Option(help="Entries per position (topk), their maximum (topp), the exact head (headtail).", rich_help_panel="Capture")] = 64,
    top_p: Annotated[Optional[float], typer.Option(help="topp mode: probability mass to keep, e.g. 0.95.", rich_help_panel="Capture")] = None,
    draws: Annotated[Optional[int], typer.Option(help="sampled mode: samples per position (1-255), e.g. 32 or 64; headtail: samples of the tail, e.g. 16 or 24.", rich_help_panel="Capture")] = None,
    logprob_scale: Annotated[int, typer.Option(help="Log-prob quantization levels per nat (stored as round(lp * scale)); 0 keeps float16.", rich_help_panel="Capture")] = 32,
    seed: Annotated[int, typer.Option(help="sampled and headtail mode: seed of the draws.", rich_help_panel="Capture")] = 0,
    engine: Annotated[EngineName, typer.Option(help="Teacher engine: auto (vLLM with a GPU where it imports, else hf; README 'vLLM on a CPU'), hf or vllm.")] = EngineName.auto,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...", rich_help_panel="HF engine")] = "auto",
    dtype: Annotated[DType, typer.Option(help="auto: bf16 on GPU, float32 on CPU.")] = DType.auto,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel="HF engine")] = 8,
    tensor_parallel_size: Annotated[int, typer.Option(help="GPUs per engine (tensor parallel).", rich_help_panel="vLLM engine")] = 1,
    data_parallel: Annotated[int, typer.Option(help="Engine processes on disjoint shards, one per GPU group (CPU: splits the cores).")] = 1,
    quantization: Annotated[Optional[str], typer.Option(help="Weight quantization method (awq, gptq, fp8 ...).", rich_help_panel="vLLM engine")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Fraction of each GPU's memory vLLM may take (on a CPU: of the memory node; ddk-cache's CPU default is a 2 GiB KV cache, VLLM_CPU_KVCACHE_SPACE sets it).", rich_help_panel="vLLM engine")] = 0.9,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="Tokens per scheduler step (prefill chunk).", rich_help_panel="vLLM engine")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length to reserve KV cache for (> seq_len: room for the forced token).", rich_help_panel="vLLM engine")] = None,
    windows_per_call: Annotated[int, typer.Option(help="Windows submitted per generate call (keeps the engine full).", rich_help_panel="vLLM engine")] = 1024,
    enforce_eager: Annotated[bool, typer.Option(help="Disable CUDA graphs and torch.compile (less memory and a faster start, slower scoring).", rich_help_panel="vLLM engine")] = False,
    shard_windows: Annotated[Optional[int], typer.Option(help="Windows per shard (unit of writing and resume).", rich_help_panel="Store layout")] = None,
    chunk_windows: Annotated[Optional[int], typer.Option(help="Windows per inner chunk (unit of reading).", rich_help_panel="Store layout")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer, if not the teacher's folder.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of the teacher.")] = None,
    overwrite: Overwrite = False,
    storage_options: StorageOptions = None,
    num_nodes: Annotated[Optional[int], typer.Option(
        help="Nodes scoring this store together (default: WORLD_SIZE from torchrun or SLURM_NTASKS from srun; else 1).", rich_help_panel="Many nodes")] = None,
    node_rank: Annotated[Optional[int], typer.Option(help="This node's rank, 0 .. num-nodes - 1 (default: RANK or SLURM_PROCID).", rich_help_panel="Many nodes")] = None,
    create_timeout: Annotated[float, typer.Option(help="Seconds nodes other than 0 wait for node 0 to create the store.", rich_help_panel="Many nodes")] = 600.0,
    writer_threads: Annotated[Optional[int], typer.Option(
        help="Shards encoded and written at once while the teacher scores the next (1-64; default: half the cores, at most 8).")] = None,
    progress: Progress = True,
) -> None:
    """Score every window of the manifest's domains with the teacher and write its sparse distribution into a store.

    Options in the "HF engine" or "vLLM engine" panel belong to that engine; giving one to the other engine is an error.
    """
    from ddk_cache.stages.teacher_dump import (  # the stage (torch, zarr) loads when the command runs: `--help` stays fast
        Capture,
        EngineOptions,
        LayoutSettings,
        NodeSettings,
        ProcessSettings,
        TeacherDumpConfig,
        run_teacher_dump,
    )

    with user_errors():  # every setting is checked where it is built: a bad one is one line
        options = EngineOptions(
            dtype=dtype.value,
            revision=revision,
            device=device,
            batch_size=batch_size,
            tensor_parallel_size=tensor_parallel_size,
            quantization=quantization,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            windows_per_call=windows_per_call,
            enforce_eager=enforce_eager,
        )
        capture = Capture(mode=mode.value, k=k, top_p=top_p, draws=draws, logprob_scale=logprob_scale, seed=seed)
        options_for_store = parse_storage_options(storage_options)
        config = TeacherDumpConfig(
            teacher=teacher,
            manifest=manifest,
            out=out,
            capture=capture,
            engine=engine.value,
            engine_options=options,
            layout=LayoutSettings(chunk_windows=chunk_windows, shard_windows=shard_windows),
            nodes=NodeSettings(num_nodes=num_nodes, node_rank=node_rank, create_timeout=create_timeout),
            processes=ProcessSettings(data_parallel=data_parallel, writer_threads=writer_threads),
            tokenizer=tokenizer,
            overwrite=overwrite,
            storage_options=options_for_store,
            progress=progress,
        )
        say(progress, "teacher-dump: reading the data and loading the teacher ...")
        summary = run_teacher_dump(config)
    node = f"node {summary.node.rank} of {summary.node.count}: " if summary.node.count > 1 else ""
    if not summary.complete:
        console.print(
            f"{node}scored {summary.tokens_scored:,} tokens in {summary.seconds:.1f} s; shards written {summary.shards_written}, "
            f"already done {summary.shards_skipped}. Other nodes' shards are still pending: the last node to finish completes the store.",
            soft_wrap=True,
        )
        return
    table = name_table(f"teacher-dump: {summary.url}", ("domain", "train windows", "valid windows", "teacher valid loss", "teacher valid ppl"))
    for info in summary.domains:
        table.add_row(info.name, f"{info.train.windows:,}", f"{info.valid.windows:,}", f"{info.teacher_valid_loss:.4f}",
                      f"{info.teacher_valid_ppl:.3f}")
    console.print(table)
    console.print(
        f"{node}scored {summary.tokens_scored:,} tokens in {summary.seconds:.1f} s "
        f"({summary.tokens_per_second:,.0f} tokens/s, engine {summary.engine.name}); shards written {summary.shards_written}, "
        f"already done {summary.shards_skipped}",
        soft_wrap=True,
    )
