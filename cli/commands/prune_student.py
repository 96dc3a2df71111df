"""`ddk-cache prune-student`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.choices import Criterion
from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import StorageOptions, parse_storage_options
from ddk_cache.cli.output import console


def prune_student(
    teacher: Annotated[str, typer.Option(help="Teacher folder (or hub id) to cut the student from.")],
    layers: Annotated[int, typer.Option(help="Decoder layers to keep (1 .. the teacher's layers - 1).")],
    out: Annotated[Path, typer.Option(help="New folder for the student (transformers format, plus ddk_prune.json).")],
    criterion: Annotated[Criterion, typer.Option(
        help="Which layers to keep: block-influence (ShortGPT: the layers that change their input most, measured on --store) "
             "or even (evenly spaced, first and last kept).")] = Criterion.block_influence,
    store: Annotated[Optional[str], typer.Option(help="block-influence: a store whose valid/ windows the layers are measured on.")] = None,
    windows: Annotated[int, typer.Option(help="block-influence: validation windows per domain.")] = 16,
    storage_options: StorageOptions = None,
) -> None:
    """Make a pretrained student by depth pruning: keep some of the teacher's decoder layers (Minitron, ShortGPT)."""
    from ddk_cache.stages.prune_student import PruneConfig, run_prune  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        summary = run_prune(PruneConfig(teacher=teacher, layers=layers, out=out, criterion=criterion.value, store=store, windows=windows,
                                        storage_options=parse_storage_options(storage_options)))
    console.print(f"student saved to {summary.out}: kept layers {summary.kept} of {summary.total_layers} ({criterion.value})", soft_wrap=True)
