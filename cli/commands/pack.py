"""`ddk-cache pack`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import OutStore, Overwrite, Progress, StorageOptions, parse_storage_options
from ddk_cache.cli.output import console, say
from ddk_cache.tables import name_table


def pack(
    manifest: Annotated[Path, typer.Option(help="Data manifest (YAML) describing the domains.")],
    out: OutStore,
    tokenizer: Annotated[str, typer.Option(help="Tokenizer (folder or hub id): the teachers that score the store must share it.")],
    shard_windows: Annotated[Optional[int], typer.Option(help="Windows per shard (unit of writing, scoring and resume).")] = None,
    chunk_windows: Annotated[Optional[int], typer.Option(help="Windows per inner chunk (unit of reading).")] = None,
    valid_fraction: Annotated[float, typer.Option(
        help="Share of documents (by a seeded hash of their text) that go to validation until it holds valid_sequences windows; "
             "later ones are dropped, never trained on.")] = 0.05,
    overwrite: Overwrite = False,
    storage_options: StorageOptions = None,
    progress: Progress = True,
) -> None:
    """Tokenize and pack the manifest's domains into a store of windows, without teacher targets (score it with teacher-dump)."""
    from ddk_cache.stages.pack import PackConfig, run_pack  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

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
