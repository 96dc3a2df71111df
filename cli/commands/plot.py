"""`ddk-cache plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.output import console


def plot(
    run: Annotated[Path, typer.Argument(help="A distill run's --out folder (its metrics.jsonl), or a minillm --out folder (its rounds.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: the run folder).")] = None,
) -> None:
    """PNG figures of a distill run (loss / CE / KD, DDK domain weights, per-domain perplexity) or of MiniLLM rounds (reverse KL,
    ROUGE-L, entropy and teacher CE per round)."""
    from ddk_cache.stages.plot_rounds import ROUNDS_LOG, plot_rounds  # the stages load when the command runs: `--help` stays fast
    from ddk_cache.stages.plot_run import plot_run

    with user_errors():
        paths = plot_rounds(run, out) if (run / ROUNDS_LOG).is_file() else plot_run(run, out)
    for path in paths:
        console.print(str(path), markup=False, highlight=False, soft_wrap=True)
