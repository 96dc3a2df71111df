"""The options several commands share, declared once: one flag, one help text, one parser.

Each is an `Annotated` type (as the Hugging Face CLI declares its shared options), so a command names
`progress: Progress = True` and cannot drift from the others. Options whose meaning differs per command
(`--batch-size`, an HF engine's `--device`, the capture's `--seed`) stay in their command's module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.choices import LossImpl
from ddk_cache.errors import DDKCacheError

StorageOptions = Annotated[
    Optional[str],
    typer.Option(
        "--storage-options",
        help="For object-store URLs (s3://...): fsspec options as JSON, e.g. "
        "'{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'. Credentials usually come from the environment.",
    ),
]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N; under torchrun each rank takes cuda:LOCAL_RANK.",
                                     rich_help_panel="Devices and ranks")]
LossImplOption = Annotated[LossImpl, typer.Option(
    help="fused: the losses take the student's hidden states and head, a token chunk of logits at a time (never "
         "[tokens x vocabulary]); dense: the model's whole logits, the reference. Equal to float32 rounding.")]
Seed = Annotated[int, typer.Option(help="Seed of everything random in the run (data order, sampling, initialisation).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing store at --out (one made with other data or settings is otherwise refused).")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file ('-': stdout alone, no table).")]
OutStore = Annotated[str, typer.Option(help="Output store: a local path or an object-store URL (s3://...).")]
StoreArgument = Annotated[str, typer.Argument(help="Store path or URL.")]


def parse_storage_options(text: str | None) -> dict | None:
    """`--storage-options` JSON as a dict, with a one-line error for anything else."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DDKCacheError(f"--storage-options is not valid JSON ({exc.msg} at character {exc.pos}): pass a JSON object") from None
    if not isinstance(options, dict):
        raise DDKCacheError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options
