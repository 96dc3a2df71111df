"""`ddk-cache pack`: manifest -> a store of packed windows with no teacher targets yet.

Packing and scoring are separate jobs so that (1) many inference nodes can score one store
without each of them reading and tokenizing the corpus, and (2) another team can score the
*same windows* with another teacher later: keep the packed store, copy it, score the copy.

A packed store is a ddk-cache store (same format version) whose header has the data, the
tokenizer and the windows' geometry (`seq_len`, `chunk_windows`, `shard_windows`), whose splits
hold only `tokens`, and whose `status` is "packed" ("packing" while it is written).
`teacher-dump` without `--manifest` scores it in place: it adds the teacher's arrays and the
shard markers to every split, and the header's teacher, engine, capture and identity.

Packing streams (`data/streamed_packing.py`): sources are read as a stream, documents go to valid or
train by a seeded hash of their text, windows are written shard by shard, memory does not grow
with the corpus, and a killed `pack` resumes from its last committed shard. That split rule
differs from the in-memory one that `teacher-dump --manifest` keeps for small corpora, so the
header records it (`packing.split_rule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from tqdm.auto import tqdm

from ddk_cache import __version__
from ddk_cache.data.manifest import Manifest, load_manifest
from ddk_cache.data.streamed_packing import SPLIT_RULE, StreamPacker
from ddk_cache.errors import DDKCacheError, StoreError, first_line
from ddk_cache.hub import require_loadable
from ddk_cache.ranges import AT_LEAST_ONE, Range, check_ranges
from ddk_cache.store.capture import Capture
from ddk_cache.store.embedded_tokenizer import file_hashes, tokenizer_files
from ddk_cache.store.fingerprints import require_same_tokenizer, tokenizer_description
from ddk_cache.store.format import FORMAT_VERSION, HEADER_ATTR, SPLITS, TOKENS, StoreLayout, zarr_store
from ddk_cache.store.header import DomainInfo, LayoutInfo, PackingInfo, StoreHeader, TokenizerInfo, now
from ddk_cache.store.header_versions import parse_header, read_domain_info
from ddk_cache.store.integrity import INTEGRITY
from ddk_cache.store.lease import WriterLease
from ddk_cache.store.metadata import HeaderError
from ddk_cache.store.provenance import package_versions
from ddk_cache.store.reader import unfinished
from ddk_cache.store.writer import CacheWriter

PACKED = "packed"


@dataclass
class PackConfig:
    manifest: Path
    out: str
    tokenizer: str
    chunk_windows: int | None = None
    shard_windows: int | None = None
    valid_fraction: float = 0.05  # share of documents hashed to validation (until it holds valid_sequences windows)
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None
    progress: bool = True


@dataclass
class PackSummary:
    url: str
    domains: list[DomainInfo]
    already_packed: bool = False


@dataclass
class StoredSplit:
    """A split of a packed store, as `teacher-dump` schedules it: its size and its `tokens` array."""

    n_windows: int
    windows: zarr.Array  # sliced shard by shard when a shard is scored


@dataclass
class StoredDomain:
    name: str
    train: StoredSplit
    valid: StoredSplit


def run_pack(config: PackConfig) -> PackSummary:
    check_ranges({"valid_fraction": config.valid_fraction, "chunk_windows": config.chunk_windows, "shard_windows": config.shard_windows},
                 {"valid_fraction": Range(0, 1, open_low=True, open_high=True), "chunk_windows": AT_LEAST_ONE, "shard_windows": AT_LEAST_ONE})
    manifest = load_manifest(config.manifest)
    tokenizer = load_tokenizer(config.tokenizer, None)
    try:  # chunks sized for the default capture (top-64), unless given: the scored arrays share them
        layout = StoreLayout.choose(manifest.seq_len, Capture(), None, config.chunk_windows, config.shard_windows)
    except ValueError as exc:
        raise DDKCacheError(f"{exc}: fix --chunk-windows / --shard-windows") from None
    names = [d.name for d in manifest.domains]
    files = tokenizer_files(tokenizer)
    header = packing_header(manifest, tokenizer, layout, names, PackingInfo(SPLIT_RULE, config.valid_fraction), files)
    with WriterLease(config.out, "node-0", "pack", config.storage_options):  # the same place a single-node dump takes
        return _pack(config, manifest, tokenizer, layout, names, header, files)


def _pack(config: PackConfig, manifest: Manifest, tokenizer, layout: StoreLayout, names: list[str], header: StoreHeader,
          files: dict[str, bytes]) -> PackSummary:
    writer = CacheWriter.open_for_packing(config.out, header, names, layout, config.overwrite, config.storage_options,
                                          tokenizer_files=files)
    if writer is None:  # the same data, tokenizer and layout are packed there already
        root = zarr.open_group(zarr_store(config.out, read_only=True, storage_options=config.storage_options), mode="r")
        return PackSummary(config.out, [read_domain_info(root[name], config.out) for name in names], already_packed=True)
    bar = tqdm(desc="pack", unit="window", disable=not config.progress)
    for domain in manifest.domains:
        progress = writer.pack_progress(domain.name)
        packer = StreamPacker(domain, tokenizer, manifest.seq_len, manifest.seed, layout.shard_windows, config.valid_fraction)
        for shard in packer.shards(progress):
            writer.write_windows(domain.name, shard.split, shard.first_window, shard.windows)
            if shard.commit is not None:
                writer.commit_pack_progress(domain.name, shard.commit.to_attrs())
            bar.update(len(shard.windows))
        writer.finish_packed_domain(domain.name)
    bar.close()
    writer.set_status(PACKED)
    return PackSummary(config.out, [writer.domain_info(name) for name in names])


def load_tokenizer(name_or_path: str, revision: str | None):
    from transformers import AutoTokenizer  # heavy: transformers loads only when a model or tokenizer does

    require_loadable(name_or_path, "tokenizer", revision)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"cannot load tokenizer {name_or_path!r}: {first_line(exc)}") from None


def packing_header(manifest: Manifest, tokenizer, layout: StoreLayout, domain_names: list[str], packing: PackingInfo,
                   files: dict[str, bytes]) -> StoreHeader:
    """What packing knows: the data, its tokenizer (and the `files` embedded of it) and the windows' geometry (no teacher yet)."""
    return StoreHeader(
        format_version=FORMAT_VERSION,
        status="packing",
        created_by=f"ddk-cache {__version__}",
        created_at=now(),
        tokenizer=TokenizerInfo.from_dict({**tokenizer_description(tokenizer), "files": file_hashes(files)}),
        layout=LayoutInfo(manifest.seq_len, layout.chunk_windows, layout.shard_windows),
        manifest=manifest.raw,
        manifest_sha256=manifest.sha256(),
        seed=manifest.seed,
        domains=tuple(domain_names),
        integrity=INTEGRITY,  # every data array's chunks carry checksums (readers and verify check them)
        versions=package_versions(),
        packing=packing,
    )


def open_packed(url: str, storage_options: dict | None) -> tuple[StoreHeader, list[StoredDomain]]:
    """The header and splits of a packed (or packed-then-scored) store, to score it."""
    try:
        root = zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreError(f"no store at {url}: run `ddk-cache pack` first, or give --manifest to pack and score in one command") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot open {url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None
    try:
        header = parse_header(root.attrs.get(HEADER_ATTR))
    except HeaderError as exc:
        raise (StoreError(f"{url} is not a ddk-cache store: run `ddk-cache pack` to make one") if exc.not_ddk_cache
               else exc.at(url)) from None
    if header.status in ("packing", "creating"):
        raise StoreError(unfinished(url, header))  # the reader's rule: which job left it so, and what finishes it
    if header.format_version != FORMAT_VERSION:
        raise StoreError(f"{url} is a format version {header.format_version} store; this ddk-cache scores version {FORMAT_VERSION} stores: "
                         "pack the manifest again (the windows are the same)")
    domains = []
    for name in header.domains:
        splits = {split: StoredSplit(root[f"{name}/{split}/{TOKENS}"].shape[0], root[f"{name}/{split}/{TOKENS}"]) for split in SPLITS}
        domains.append(StoredDomain(name, splits["train"], splits["valid"]))
    return header, domains


def check_same_tokenizer(tokenizer, header: StoreHeader, url: str) -> None:
    """A teacher may score packed windows only if its tokenizer gives every id the same token."""
    require_same_tokenizer(tokenizer, header.tokenizer, "teacher's", f"the one {url} was packed with",
                           "pack the manifest again with this teacher's tokenizer")
