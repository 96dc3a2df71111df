"""`ddk-cache quickstart`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import Progress, Seed
from ddk_cache.cli.output import console
from ddk_cache.tables import name_table


def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the teacher, corpus, cache and student.")] = Path("ddk-quickstart"),
    teacher: Annotated[Optional[Path], typer.Option(help="Use this teacher folder as is, instead of fetching the demo teacher into OUT/teacher.")] = None,
    steps: Annotated[int, typer.Option(help="Student optimizer steps.")] = 150,
    train_tokens: Annotated[int, typer.Option(help="Training tokens cached per domain.")] = 8192,
    seed: Seed = 0,
    progress: Progress = True,
) -> None:
    """Both stages end to end on a real teacher: fetch it, build a corpus, dump, distill with DDK, eval."""
    from ddk_cache.stages.quickstart import (  # the stage (torch, zarr) loads when the command runs: `--help` stays fast
        QuickstartConfig,
        run_quickstart,
    )

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
