"""Create or resume a store and write it one whole shard at a time.

Crash safety: every shard of every array is written whole (one object per shard, and
zarr's local store writes objects atomically), then the split's `shard_done[i]` marker
is set. A killed dump therefore leaves complete shards marked, and at worst an
unmarked shard that is recomputed on resume. The root `status` becomes "complete" only
after every marker is set, so readers never take a half-written store for a finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ddk_cache.data.packing import PackedDomain, PackedSplit
from ddk_cache.data.streamed_packing import PackProgress
from ddk_cache.errors import StoreError, first_line
from ddk_cache.store.capture import EncodedTargets
from ddk_cache.store.embedded_tokenizer import file_hashes, write_tokenizer_files
from ddk_cache.store.encodings import array_encoding, decoded
from ddk_cache.store.format import (
    BEHAVIOUR_LOGPROBS,
    COUNTS,
    HEADER_ATTR,
    IDS,
    LOGPROBS,
    N_ENTRIES,
    RESPONSE_MASK,
    REST_LOGPROBS,
    SAMPLING_LOGPROBS,
    SHARD_DONE,
    SPLITS,
    TARGET_LOGPROB_SCALE,
    TARGET_LOGPROBS,
    TOKENS,
    StoreLayout,
    codec_profile,
    create_split_arrays,
    create_target_arrays,
    create_token_array,
    logprob_floor,
    teacher_loss,
    zarr_store,
)
from ddk_cache.store.header import DomainInfo, SplitInfo, StoreHeader, now
from ddk_cache.store.header_versions import parse_header, read_domain_info, read_header, write_domain_info
from ddk_cache.store.integrity import CHECKSUM_GROUP, checksum_array, decoded_like_zarr, has_checksums, resize_checksums, write_checksums
from ddk_cache.store.metadata import HeaderError

PACKED_ARRAYS = (TOKENS, RESPONSE_MASK, BEHAVIOUR_LOGPROBS, SAMPLING_LOGPROBS)  # what a store holds before a teacher scores it
PACK_PROGRESS_ATTR = "packing_progress"  # a domain's committed packing progress (streamed_packing.PackProgress)


def packed_identity(header: StoreHeader) -> tuple:
    """What makes two packed stores hold the same windows in the same places."""
    layout = header.layout
    return (header.format_version, header.manifest_sha256, header.tokenizer.fingerprint,
            layout.seq_len, layout.chunk_windows, layout.shard_windows, header.packing)


class CacheWriter:
    """Writes shards of a store whose header, groups and arrays already exist."""

    def __init__(self, root: zarr.Group, url: str, layout: StoreLayout, tokens_stored: bool = False) -> None:
        self.root = root
        self.url = url
        self.layout = layout
        self.tokens_stored = tokens_stored  # a packed store already holds every shard's tokens: write only the targets
        self._checksummed: dict[tuple[str, str, str], bool] = {}  # (domain, split, array): stores before checksums have none
        self._nodes: dict[str, zarr.Group | zarr.Array] = {}  # see `_node`

    @classmethod
    def create_or_resume(
        cls,
        url: str,
        header: StoreHeader,
        domains: list[PackedDomain],
        layout: StoreLayout,
        overwrite: bool = False,
        storage_options: dict | None = None,
        clean_partial: bool = True,
        tokenizer_files: dict[str, bytes] | None = None,
    ) -> "CacheWriter":
        """Open `url` for writing: create it, or resume it if it was made with the same identity.

        `header.identity` holds everything that must match for shards from two runs to
        belong in one store; a mismatch is refused unless `overwrite` is set. `tokenizer_files` (named by
        `header.tokenizer.files`) are embedded in a new store; a resumed one keeps what it has.
        """
        store, existing = _open_for_writing(url, storage_options, overwrite)
        if existing is not None and (overwrite or existing.status == "creating"):
            existing = None  # replaced below; a store killed while "creating" holds no scored data yet
        if existing is None:
            # "creating" until every group and array exists, so a kill during creation is detectable
            root = _new_root(store, url, header.with_status("creating"), tokenizer_files)
            _create_domains(store, domains, layout)
            write_header(root, _describing_codecs(header, root, domains[0].name).with_status("writing"))
            return cls(root, url, layout)

        if existing.format_version != header.format_version:
            raise StoreError(
                f"{url} is a cache format version {existing.format_version} store and this ddk-cache writes version "
                f"{header.format_version}: it can be read but not resumed; pass --overwrite to replace it, or choose another --out"
            )
        _check_identity(existing.identity or {}, header.identity or {}, url)
        if clean_partial:  # not while other nodes may be mid-write into the same store
            _remove_partial_files(url)
        root = zarr.open_group(store, mode="r+")
        for domain in domains:
            check_domain_data(root, domain, url)
        return cls(root, url, layout)

    @classmethod
    def open_for_packing(
        cls, url: str, header: StoreHeader, domains: list[str], layout: StoreLayout, overwrite: bool = False,
        storage_options: dict | None = None, tokenizer_files: dict[str, bytes] | None = None,
    ) -> "CacheWriter | None":
        """A store to pack into: new (status "packing"), or one a killed `pack` left; None if packed already.

        Same data, tokenizer, rule and layout: resumed (or nothing to do once packed). Anything
        else is refused unless `overwrite`, also a half-packed store: it may hold hours of work.
        """
        store, existing = _open_for_writing(url, storage_options, overwrite)
        if existing is not None and not overwrite:
            if packed_identity(existing) != packed_identity(header):
                raise StoreError(f"{url} already holds a store packed from other data, tokenizer, rule or layout: "
                                 "pass --overwrite to replace it, or choose another --out")
            if existing.status != "packing":
                return None
            if all(name in zarr.open_group(store, mode="r") for name in domains):
                return cls(zarr.open_group(store, mode="r+"), url, layout)
        root = _new_root(store, url, header.with_status("packing"), tokenizer_files)  # new, or killed before its groups existed
        for name in domains:  # every group, with empty `tokens` arrays that grow shard by shard
            group = root.create_group(name)
            for split in SPLITS:
                create_token_array(group.create_group(split), 0, layout)
            write_domain_info(group, DomainInfo(name))
        return cls(root, url, layout)

    def pack_progress(self, domain: str):
        """The last committed progress of a domain's packing (None: not started)."""
        attrs = self.root[domain].attrs.get(PACK_PROGRESS_ATTR)
        return PackProgress.from_attrs(attrs) if attrs else None

    def write_windows(self, domain: str, split: str, first: int, windows: np.ndarray) -> None:
        """Packing: windows from `first` on (a whole shard, or the last one), growing the array as needed."""
        if len(windows) == 0:
            return
        group = self.split_group(domain, split)
        array = group[TOKENS]
        end = first + len(windows)
        if array.shape[0] < end:
            array.resize((end, array.shape[1]))
        array[first:end] = windows
        if self._has_checksums(domain, split, TOKENS):
            resize_checksums(group, TOKENS, end, self.layout.chunk_windows)
            write_checksums(checksum_array(group, TOKENS), first, np.asarray(windows, dtype=array.dtype), self.layout.chunk_windows)

    def commit_pack_progress(self, domain: str, progress: dict[str, Any]) -> None:
        self.root[domain].attrs[PACK_PROGRESS_ATTR] = progress

    def finish_packed_domain(self, domain: str) -> None:
        """Sizes, documents and the tokens' sha256 (read back shard by shard) into the domain's info."""
        progress = self.pack_progress(domain)
        splits = {}
        for split in SPLITS:
            array = self.split_group(domain, split)[TOKENS]
            windows = getattr(progress, split).windows
            if array.shape[0] != windows:
                array.resize((windows, array.shape[1]))
            if self._has_checksums(domain, split, TOKENS):
                resize_checksums(self.split_group(domain, split), TOKENS, windows, self.layout.chunk_windows)
            digest = hashlib.sha256()
            for start in range(0, windows, self.layout.shard_windows):
                digest.update(np.ascontiguousarray(array[start : start + self.layout.shard_windows], dtype="<i4").tobytes())
            splits[split] = SplitInfo(windows, windows * self.layout.seq_len, getattr(progress, split).documents, digest.hexdigest())
        self.set_domain_info(dataclasses.replace(self.domain_info(domain), **splits))

    @classmethod
    def add_targets(
        cls, url: str, header: StoreHeader, domains: list, layout: StoreLayout, overwrite: bool = False, storage_options: dict | None = None,
    ) -> "CacheWriter":
        """Open a packed store for scoring: add the teacher's arrays and markers, or resume a scoring run.

        The header becomes `header` with status "writing" only once every array exists, so a kill
        while adding them leaves the store "packed" (and the next run adds them again).
        `overwrite` drops an earlier teacher's arrays (the packed windows stay).
        """
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        root = zarr.open_group(store, mode="r+")
        writer = cls(root, url, layout, tokens_stored=True)
        existing = writer.header()
        if existing.status != "packed" and not overwrite:
            _check_identity(existing.identity or {}, header.identity or {}, url)
            return writer
        for domain in domains:
            for split in SPLITS:
                group = root[f"{domain.name}/{split}"]
                for name in [n for n in group.array_keys() if n not in PACKED_ARRAYS]:  # half-added arrays, or an earlier teacher's
                    del group[name]
                if CHECKSUM_GROUP in group:
                    for name in [n for n in group[CHECKSUM_GROUP].array_keys() if n not in PACKED_ARRAYS]:
                        del group[CHECKSUM_GROUP][name]
                create_target_arrays(group, getattr(domain, split).n_windows, layout)
            writer.set_domain_info(dataclasses.replace(writer.domain_info(domain.name), teacher_valid_loss=None, teacher_valid_ppl=None))
        write_header(root, _describing_codecs(header, root, domains[0].name).with_status("writing"))
        return writer

    @classmethod
    def open_existing(cls, url: str, layout: StoreLayout, storage_options: dict | None = None) -> "CacheWriter":
        """Re-open a store that `create_or_resume` or `add_targets` prepared (and checked) in another process."""
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        root = zarr.open_group(store, mode="r+")
        writer = cls(root, url, layout)
        writer.tokens_stored = writer.header().packed_at is not None
        return writer

    def header(self) -> StoreHeader:
        """The store's header as it is now (another writer may have changed its status)."""
        return read_header(self.root, self.url)

    def domain_info(self, domain: str) -> DomainInfo:
        return read_domain_info(self.root[domain], self.url)

    def set_domain_info(self, info: DomainInfo) -> None:
        write_domain_info(self.root[info.name], info)

    def split_group(self, domain: str, split: str) -> zarr.Group:
        return self._node(f"{domain}/{split}")

    def _node(self, path: str) -> zarr.Group | zarr.Array:
        """A group or a fixed-shape array of the store, opened once.

        Why: every open reads its zarr.json, and on object storage each read is two requests (a HEAD for the size,
        then a GET). Opening a split's seven arrays and their checksums for every shard made a tiny dump to an
        S3-compatible server cost 4,000 requests, 40 % of them these reads. Arrays written by `write_shard` never
        change shape or attributes once created; packing resizes `tokens`, so it opens that array afresh.
        """
        if path not in self._nodes:
            self._nodes[path] = self.root[path]
        return self._nodes[path]

    def pending_shards(self, domain: str, split: str) -> list[int]:
        done = self.split_group(domain, split)[SHARD_DONE][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write_shard(self, domain: str, split: str, shard: int, windows: np.ndarray, targets: EncodedTargets) -> None:
        """Write shard `shard` of every array, then mark it done (the marker is the commit)."""
        base = f"{domain}/{split}"
        region = self.layout.shard_slice(shard, self._node(f"{base}/{TOKENS}").shape[0])
        if windows.shape[0] != region.stop - region.start:
            raise ValueError(f"shard {shard} expects {region.stop - region.start} windows, got {windows.shape[0]}")
        for name, values in self._arrays(windows, targets).items():
            if name == TOKENS and self.tokens_stored:
                continue
            array = self._node(f"{base}/{name}")
            encoding = array_encoding(array.attrs)  # format 3: the integers the array's own attribute says it stores
            stored = values.astype(array.dtype, copy=False) if encoding is None else encoding.encode(values, array.dtype)
            array[region] = stored
            if self._has_checksums(domain, split, name):  # after the data, before the marker: a marked shard has both
                write_checksums(self._node(f"{base}/{CHECKSUM_GROUP}/{name}"), region.start,
                                decoded_like_zarr(stored, array.dtype, array.filters), self.layout.chunk_windows)
        self._node(f"{base}/{SHARD_DONE}")[shard] = 1

    def _has_checksums(self, domain: str, split: str, name: str) -> bool:
        key = (domain, split, name)
        if key not in self._checksummed:
            self._checksummed[key] = has_checksums(self.split_group(domain, split), name)
        return self._checksummed[key]

    def set_status(self, status: str) -> None:
        stamps = {"packed_at": now()} if status == "packed" else {}
        write_header(self.root, self.header().with_status(status, **stamps))

    def _arrays(self, windows: np.ndarray, targets: EncodedTargets) -> dict[str, np.ndarray]:
        """Array name -> values, clamped to what the fixed-scale integers can hold."""
        target_floor = logprob_floor(TARGET_LOGPROB_SCALE, 32)
        arrays = {
            TOKENS: windows,
            IDS: targets.ids,
            N_ENTRIES: targets.n_entries,
            TARGET_LOGPROBS: np.maximum(targets.target_logprobs, target_floor),
        }
        capture = self.layout.capture
        if capture.mode == "sampled":
            arrays[COUNTS] = targets.values
        else:
            floor = logprob_floor(capture.logprob_scale) if capture.logprob_scale else -65504.0
            arrays[LOGPROBS] = np.maximum(targets.values, floor)
            arrays[REST_LOGPROBS] = targets.rest_logprobs
        return arrays

    def finish_domain(self, domain: str) -> DomainInfo:
        """Record the teacher's validation loss, read back from the stored actual-token log-probs.

        In a rollout store only response positions count: prompts and padding are not the student's text.
        """
        group = self.split_group(domain, "valid")
        target = decoded(group[TARGET_LOGPROBS])
        loss, ppl = teacher_loss(target[group[RESPONSE_MASK][:] > 0] if RESPONSE_MASK in group else target)
        info = dataclasses.replace(self.domain_info(domain), teacher_valid_loss=loss, teacher_valid_ppl=ppl)
        self.set_domain_info(info)
        return info

    def finish(self) -> None:
        write_header(self.root, self.header().with_status("complete", completed_at=now()))


def write_header(root: zarr.Group, header: StoreHeader) -> None:
    root.attrs[HEADER_ATTR] = header.to_dict()


def _open_for_writing(url: str, storage_options: dict | None, overwrite: bool) -> tuple[Any, StoreHeader | None]:
    """The writable store at `url` and the header of the ddk-cache store already there (None if none).

    A ddk-cache store whose header cannot be parsed is refused, unless `overwrite` replaces it.
    """
    try:
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        return store, _existing_header(store, url, overwrite)
    except (OSError, ValueError) as exc:  # object stores: refused credentials, missing bucket, unreachable endpoint
        raise StoreError(f"cannot open {url} for writing: {first_line(exc)}: check the URL, credentials and --storage-options") from None


def _new_root(store, url: str, header: StoreHeader, tokenizer_files: dict[str, bytes] | None = None) -> zarr.Group:
    """An empty root group holding `header` and the tokenizer's files (whatever was at `url` is replaced)."""
    if tokenizer_files is not None and file_hashes(tokenizer_files) != header.tokenizer.files:
        raise ValueError("the tokenizer files to embed are not the ones the header names")  # a caller's bug, not bad input
    try:
        root = zarr.open_group(store, mode="w", attributes={HEADER_ATTR: header.to_dict()})
        if tokenizer_files:
            write_tokenizer_files(root, tokenizer_files)
        return root
    except OSError as exc:  # object stores: missing bucket, no write permission
        raise StoreError(f"cannot write to {url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None


def _existing_header(store, url: str, overwrite: bool) -> StoreHeader | None:
    """The header of an existing ddk-cache store at `url`, None if nothing is there (or a damaged one to overwrite)."""
    try:
        root = zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        local = Path(url)
        if "://" not in url and local.exists() and (not local.is_dir() or any(local.iterdir())):
            raise StoreError(f"{url} exists and is not a ddk-cache store: refusing to touch it; choose another --out") from None
        return None
    try:
        return parse_header(root.attrs.get(HEADER_ATTR))
    except HeaderError as exc:
        if exc.not_ddk_cache:
            raise StoreError(f"{url} is a Zarr store but not a ddk-cache store: refusing to touch it; choose another --out") from None
        if overwrite:  # a version this ddk-cache cannot read, or a damaged header: replaced as asked
            return None
        fix = "pass --overwrite to replace the store, or choose another --out"
        raise StoreError(f"{url}: {exc} (its zarr.json was edited or damaged): {fix}" if exc.damaged else f"{url} {exc}; or {fix}") from None


def differing_keys(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two identities (a key missing on one side differs), sorted."""
    old, new = _comparable(old), _comparable(new)
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _describing_codecs(header: StoreHeader, root: zarr.Group, domain: str) -> StoreHeader:
    """The header with `layout.codec_profile` read from the arrays just created (every split has the same chains)."""
    return dataclasses.replace(header, layout=dataclasses.replace(header.layout, codec_profile=codec_profile(root[domain][SPLITS[0]])))


def _comparable(identity: dict) -> dict:
    """An identity without the codec chains' name that stores before 2026-12-02 kept in it: codecs change no value,
    and a resumed run writes into the arrays already created, with their codecs."""
    layout = identity.get("layout")
    if isinstance(layout, dict) and "codec_profile" in layout:
        return {**identity, "layout": {key: value for key, value in layout.items() if key != "codec_profile"}}
    return identity


def _check_identity(old: dict, new: dict, url: str) -> None:
    differing = differing_keys(old, new)
    if differing:
        key = differing[0]
        raise StoreError(
            f"{url} was made with a different {', '.join(differing)} "
            f"(store: {_short(old.get(key))}, now: {_short(new.get(key))}): "
            "pass --overwrite to replace it, or choose another --out"
        )


def check_domain_data(root: zarr.Group, domain: PackedDomain, url: str) -> None:
    try:
        info = read_domain_info(root[domain.name], url)
    except KeyError:
        raise StoreError(f"{url} lacks domain {domain.name!r} (a writer died while creating it): pass --overwrite to start again") from None
    for split in SPLITS:
        packed: PackedSplit = getattr(domain, split)
        recorded = info.split(split)
        if recorded is None or recorded.tokens_sha256 != packed.sha256():
            raise StoreError(
                f"{url}: the text of domain {domain.name!r} ({split}) changed since this store was started: "
                "pass --overwrite to start again, or restore the original data"
            )


def _create_domains(store, domains: list[PackedDomain], layout: StoreLayout) -> None:
    """Every domain's groups and arrays: drafted in memory, then written to `store` in one concurrent pass.

    Why not create them in the store one by one: zarr checks every parent of each new array first, and on object
    storage each check is a HEAD and a GET, made in sequence (about 1,500 requests for three tiny domains before
    this). `zarr.create_hierarchy` reads each node's place once and writes all of them together. The root already
    says "creating", so a kill in between leaves a store that reads as never finished (and is replaced on rerun).
    """
    draft = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for domain in domains:
        _create_domain(draft, domain, layout)
    nodes = {path: node.metadata for path, node in draft.members(max_depth=None)}
    for _ in zarr.create_hierarchy(store=store, nodes=nodes):
        pass


def _create_domain(root: zarr.Group, domain: PackedDomain, layout: StoreLayout) -> None:
    group = root.create_group(domain.name)
    splits = {}
    for split in SPLITS:
        packed: PackedSplit = getattr(domain, split)
        create_split_arrays(group.create_group(split), packed.n_windows, layout)
        splits[split] = SplitInfo(packed.n_windows, packed.n_tokens, packed.n_documents, packed.sha256())
    write_domain_info(group, DomainInfo(domain.name, **splits))


def _remove_partial_files(url: str) -> None:
    """Drop temp files that zarr's atomic writes leave behind when a process is killed mid-write."""
    if "://" in url:
        return
    for partial in Path(url).rglob("*.partial"):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
