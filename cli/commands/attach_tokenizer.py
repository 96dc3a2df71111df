"""`ddk-cache attach-tokenizer`."""

from __future__ import annotations

from typing import Annotated

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import StorageOptions, StoreArgument, parse_storage_options
from ddk_cache.cli.output import console


def attach_tokenizer(
    store: StoreArgument,
    tokenizer: Annotated[str, typer.Argument(help="Folder (or hub id) of the tokenizer the store was made with.")],
    storage_options: StorageOptions = None,
) -> None:
    """Embed the tokenizer's files in a store written before stores carried them (refused unless its fingerprint matches)."""
    from ddk_cache.stages.attach_tokenizer import run_attach_tokenizer  # the stage loads when the command runs: `--help` stays fast

    with user_errors():
        summary = run_attach_tokenizer(store, tokenizer, parse_storage_options(storage_options))
    said = "now carries" if summary.attached else "already carried"
    console.print(f"{store}: {said} its tokenizer ({', '.join(summary.files)})", markup=False, soft_wrap=True)
