"""`ddk-cache inspect`."""

from __future__ import annotations

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import JsonOut, StorageOptions, StoreArgument, parse_storage_options
from ddk_cache.cli.output import console, json_alone, write_json


def inspect(
    store: StoreArgument,
    json_out: JsonOut = None,
    storage_options: StorageOptions = None,
) -> None:
    """Show a store's domains, sizes, teacher validation perplexity and provenance."""
    from ddk_cache.stages.inspect_store import (  # the stage (torch, zarr) loads when the command runs: `--help` stays fast
        inspection_json,
        open_for_inspection,
        render_inspection,
    )

    with user_errors():
        reader = open_for_inspection(store, parse_storage_options(storage_options))
        if not json_alone(json_out):
            console.print(render_inspection(reader))
        if json_out is not None:
            write_json(json_out, inspection_json(reader))
