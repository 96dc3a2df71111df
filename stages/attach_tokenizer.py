"""`ddk-cache attach-tokenizer STORE DIR`: give a store written before stores carried their tokenizer its files.

Why a command: such stores hold months of teacher time, and re-scoring them only to embed a few MB of
tokenizer files would be absurd; but the files have to be the right ones, or every id read through them
means another token. So the tokenizer in DIR is refused unless its fingerprint is the one the header
recorded when the windows were made, and the header names the files only after their bytes are written
(a kill in between leaves the store as it was, and a rerun writes them again).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import zarr

from ddk_cache.errors import DDKCacheError, StoreError
from ddk_cache.stages.pack import load_tokenizer
from ddk_cache.store.embedded_tokenizer import file_hashes, tokenizer_files, write_tokenizer_files
from ddk_cache.store.fingerprints import require_same_tokenizer
from ddk_cache.store.format import zarr_store
from ddk_cache.store.lease import WriterLease
from ddk_cache.store.reader import CacheReader
from ddk_cache.store.writer import write_header

FINISHED = ("complete", "packed")  # a store still being written may be rewritten by its writer: attach once it is done


@dataclass(frozen=True)
class AttachSummary:
    url: str
    files: dict[str, str]  # name -> sha256, as the header now records them
    attached: bool  # False: the store carried these files already


def run_attach_tokenizer(url: str, tokenizer_dir: str, storage_options: dict | None = None) -> AttachSummary:
    header = CacheReader(url, storage_options=storage_options, allow_incomplete=True).header
    if header.format_version < 2:
        raise StoreError(f"{url} is a cache format version 1 store, whose header cannot name tokenizer files: "
                         "re-create it with this ddk-cache to get a self-contained store")
    if header.status not in FINISHED:
        raise StoreError(f"{url} is still being written (status {header.status!r}): attach the tokenizer once its job has finished")
    tokenizer = load_tokenizer(tokenizer_dir, None)
    require_same_tokenizer(tokenizer, header.tokenizer, "given", f"the one {url} was made with", "pass the folder of that tokenizer")
    files = tokenizer_files(tokenizer)
    hashes = file_hashes(files)
    if header.tokenizer.files == hashes:
        return AttachSummary(url, hashes, attached=False)
    if header.tokenizer.files:
        raise DDKCacheError(f"{url} already carries its tokenizer's files ({', '.join(header.tokenizer.files)}): nothing to attach")
    with WriterLease(url, "node-0", "attach-tokenizer", storage_options):
        root = zarr.open_group(zarr_store(url, read_only=False, storage_options=storage_options), mode="r+")
        write_tokenizer_files(root, files)
        current = CacheReader(url, storage_options=storage_options, allow_incomplete=True).header  # as it is now, under the lease
        write_header(root, dataclasses.replace(current, tokenizer=dataclasses.replace(current.tokenizer, files=hashes)))
    return AttachSummary(url, hashes, attached=True)
