"""`ddk-cache plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.output import console


def plot(
    run: Annotated[Path, typer.Argument(help="A distill run's --out folder (its metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: the run folder).")] = None,
) -> None:
    """PNG figures of a distill run: loss / CE / KD, DDK domain weights, per-domain student vs teacher perplexity."""
    from ddk_cache.stages.plot_run import plot_run  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        paths = plot_run(run, out)
    for path in paths:
        console.print(str(path), markup=False, highlight=False, soft_wrap=True)
