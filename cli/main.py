"""`ddk-cache` commands. Thin: argument parsing, error-to-exit-code mapping, printing."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from ddk_cache.errors import USER_ERROR_EXIT_CODE, DDKCacheError

app = typer.Typer(
    name="ddk-cache",
    help="Offline teacher logit caches (Zarr v3) for domain-guided distillation of LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `DDKCacheError` into one line on stderr and exit code 2, without a traceback."""
    try:
        yield
    except DDKCacheError as exc:
        error_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None


@app.command("teacher-dump")
def teacher_dump(
    teacher: Annotated[str, typer.Option(help="Teacher model: a local folder or hub id that AutoModelForCausalLM loads.")],
    manifest: Annotated[Path, typer.Option(help="Data manifest (YAML) describing the domains.")],
    out: Annotated[str, typer.Option(help="Output store: a local path or an object-store URL (s3://...).")],
    k: Annotated[int, typer.Option(help="Top-k entries kept per position.")] = 64,
    engine: Annotated[str, typer.Option(help="Teacher engine: auto or hf.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    shard_windows: Annotated[Optional[int], typer.Option(help="Windows per shard (unit of writing and resume).")] = None,
    chunk_windows: Annotated[Optional[int], typer.Option(help="Windows per inner chunk (unit of reading).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer, if not the teacher's folder.")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of the teacher.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store made with other settings.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score every window of the manifest's domains with the teacher and write its top-k into a store."""
    from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump

    config = TeacherDumpConfig(
        teacher=teacher,
        manifest=manifest,
        out=out,
        k=k,
        engine=engine,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        shard_windows=shard_windows,
        chunk_windows=chunk_windows,
        tokenizer=tokenizer,
        revision=revision,
        overwrite=overwrite,
        show_progress=progress,
    )
    with user_errors():
        summary = run_teacher_dump(config)
    table = Table(title=f"teacher-dump: {summary.url}")
    for column in ("domain", "train windows", "valid windows", "teacher valid loss", "teacher valid ppl"):
        table.add_column(column, justify="left" if column == "domain" else "right")
    for info in summary.domains:
        table.add_row(
            info["name"],
            f"{info['train']['windows']:,}",
            f"{info['valid']['windows']:,}",
            f"{info['teacher_valid_loss']:.4f}",
            f"{info['teacher_valid_ppl']:.3f}",
        )
    console.print(table)
    console.print(
        f"scored {summary.tokens_scored:,} tokens in {summary.seconds:.1f} s "
        f"({summary.tokens_per_second:,.0f} tokens/s); shards written {summary.shards_written}, "
        f"already done {summary.shards_skipped}",
        soft_wrap=True,
    )


@app.command("inspect")
def inspect(store: Annotated[str, typer.Argument(help="Store path or URL.")]) -> None:
    """Show a store's domains, sizes, teacher validation perplexity and provenance."""
    from ddk_cache.cache_reader import CacheReader
    from ddk_cache.stages.inspect_store import render_inspection

    with user_errors():
        console.print(render_inspection(CacheReader(store, allow_incomplete=True)))


def main() -> None:
    app(prog_name="ddk-cache")


if __name__ == "__main__":
    sys.exit(main())
