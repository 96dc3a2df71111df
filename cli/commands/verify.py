"""`ddk-cache verify`."""

from __future__ import annotations

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import StorageOptions, StoreArgument, parse_storage_options
from ddk_cache.cli.output import console, error_console


def verify(store: StoreArgument, storage_options: StorageOptions = None) -> None:
    """Check that every shard of a store is present, matches its checksums and is well-formed; exit 1 on any problem."""
    from ddk_cache.stages.verify_store import verify_url  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        report = verify_url(store, parse_storage_options(storage_options))
    for problem in report.problems:
        error_console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        error_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        error_console.print(f"{store}: {len(report.problems)} problem(s) in {report.shards_checked} shards", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    checked = "present, decoded, matching their checksums and well-formed" if report.checksummed else "present, decoded and well-formed"
    console.print(f"{store}: ok ({report.shards_checked} shards {checked})", markup=False, soft_wrap=True)
