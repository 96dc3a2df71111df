"""Create or resume a store and write it one whole shard at a time.

Crash safety: every shard of every array is written whole (one object per shard, and
zarr's local store writes objects atomically), then the split's `shard_done[i]` marker
is set. A killed dump therefore leaves complete shards marked, and at worst an
unmarked shard that is recomputed on resume. The root `status` becomes "complete" only
after every marker is set, so readers never take a half-written store for a finished one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ddk_cache.capture import EncodedTargets
from ddk_cache.cache_format import (
    COUNTS,
    DOMAIN_ATTR,
    FORMAT_NAME,
    HEADER_ATTR,
    IDS,
    LOGPROBS,
    N_ENTRIES,
    REST_LOGPROBS,
    SHARD_DONE,
    SPLITS,
    TARGET_LOGPROBS,
    TOKENS,
    TARGET_LOGPROB_SCALE,
    StoreLayout,
    create_split_arrays,
    create_target_arrays,
    create_token_array,
    logprob_floor,
    zarr_store,
    teacher_loss,
)
from ddk_cache.errors import StoreError, first_line
from ddk_cache.integrity import CHECKSUM_GROUP, decoded_like_zarr, has_checksums, resize_checksums, write_checksums
from ddk_cache.packing import PackedDomain, PackedSplit

PACK_PROGRESS_ATTR = "packing_progress"  # a domain's committed packing progress (stream_packing.PackProgress)


def packed_identity(header: dict[str, Any]) -> tuple:
    """What makes two packed stores hold the same windows in the same places."""
    layout = header.get("layout", {})
    return (header.get("format_version"), header.get("manifest_sha256"), header.get("tokenizer", {}).get("fingerprint"),
            layout.get("seq_len"), layout.get("chunk_windows"), layout.get("shard_windows"), header.get("packing"))


class CacheWriter:
    """Writes shards of a store whose header, groups and arrays already exist."""

    def __init__(self, root: zarr.Group, url: str, layout: StoreLayout, tokens_stored: bool = False) -> None:
        self.root = root
        self.url = url
        self.layout = layout
        self.tokens_stored = tokens_stored  # a packed store already holds every shard's tokens: write only the targets
        self._checksummed: dict[tuple[str, str, str], bool] = {}  # (domain, split, array): stores before checksums have none

    @classmethod
    def create_or_resume(
        cls,
        url: str,
        header: dict[str, Any],
        domains: list[PackedDomain],
        layout: StoreLayout,
        overwrite: bool = False,
        storage_options: dict | None = None,
        clean_partial: bool = True,
    ) -> "CacheWriter":
        """Open `url` for writing: create it, or resume it if it was made with the same identity.

        `header["identity"]` holds everything that must match for shards from two runs to
        belong in one store; a mismatch is refused unless `overwrite` is set.
        """
        store, existing = _open_for_writing(url, storage_options)
        if existing is not None and (overwrite or existing.get("status") == "creating"):
            existing = None  # replaced below; a store killed while "creating" holds no scored data yet
        if existing is None:
            # "creating" until every group and array exists, so a kill during creation is detectable
            root = _new_root(store, url, {**header, "status": "creating"})
            for domain in domains:
                _create_domain(root, domain, layout)
            root.attrs[HEADER_ATTR] = {**header, "status": "writing"}
            return cls(root, url, layout)

        if existing.get("format_version") != header["format_version"]:
            raise StoreError(
                f"{url} is a cache format version {existing.get('format_version')} store and this ddk-cache writes version "
                f"{header['format_version']}: it can be read but not resumed; pass --overwrite to replace it, or choose another --out"
            )
        _check_identity(existing["identity"], header["identity"], url)
        if clean_partial:  # not while other nodes may be mid-write into the same store
            _remove_partial_files(url)
        root = zarr.open_group(store, mode="r+")
        for domain in domains:
            check_domain_data(root, domain, url)
        return cls(root, url, layout)

    @classmethod
    def open_for_packing(
        cls, url: str, header: dict[str, Any], domains: list[str], layout: StoreLayout, overwrite: bool = False,
        storage_options: dict | None = None,
    ) -> "CacheWriter | None":
        """A store to pack into: new (status "packing"), or one a killed `pack` left; None if packed already.

        Same data, tokenizer, rule and layout: resumed (or nothing to do once packed). Anything
        else is refused unless `overwrite`, also a half-packed store: it may hold hours of work.
        """
        store, existing = _open_for_writing(url, storage_options)
        if existing is not None and not overwrite:
            if packed_identity(existing) != packed_identity(header):
                raise StoreError(f"{url} already holds a store packed from other data, tokenizer, rule or layout: "
                                 "pass --overwrite to replace it, or choose another --out")
            if existing.get("status") != "packing":
                return None
            if all(name in zarr.open_group(store, mode="r") for name in domains):
                return cls(zarr.open_group(store, mode="r+"), url, layout)
        root = _new_root(store, url, {**header, "status": "packing"})  # new, or killed before its groups existed
        for name in domains:  # every group, with empty `tokens` arrays that grow shard by shard
            group = root.create_group(name)
            for split in SPLITS:
                create_token_array(group.create_group(split), 0, layout)
            group.attrs[DOMAIN_ATTR] = {"name": name, "teacher_valid_loss": None, "teacher_valid_ppl": None, "train": None, "valid": None}
        return cls(root, url, layout)

    def pack_progress(self, domain: str):
        """The last committed progress of a domain's packing (None: not started)."""
        from ddk_cache.stream_packing import PackProgress

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
            write_checksums(group, TOKENS, first, np.asarray(windows, dtype=array.dtype), self.layout.chunk_windows)

    def commit_pack_progress(self, domain: str, progress: dict[str, Any]) -> None:
        self.root[domain].attrs[PACK_PROGRESS_ATTR] = progress

    def finish_packed_domain(self, domain: str) -> None:
        """Sizes, documents and the tokens' sha256 (read back shard by shard) into the domain's info."""
        progress = self.pack_progress(domain)
        info = dict(self.root[domain].attrs[DOMAIN_ATTR])
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
            info[split] = {"windows": windows, "tokens": windows * self.layout.seq_len, "documents": getattr(progress, split).documents,
                           "tokens_sha256": digest.hexdigest()}
        self.root[domain].attrs[DOMAIN_ATTR] = info

    @classmethod
    def add_targets(
        cls, url: str, header: dict[str, Any], domains: list, layout: StoreLayout, overwrite: bool = False, storage_options: dict | None = None,
    ) -> "CacheWriter":
        """Open a packed store for scoring: add the teacher's arrays and markers, or resume a scoring run.

        The header becomes `header` with status "writing" only once every array exists, so a kill
        while adding them leaves the store "packed" (and the next run adds them again).
        `overwrite` drops an earlier teacher's arrays (the packed windows stay).
        """
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        root = zarr.open_group(store, mode="r+")
        existing = dict(root.attrs[HEADER_ATTR])
        if existing.get("status") != "packed" and not overwrite:
            _check_identity(existing["identity"], header["identity"], url)
            return cls(root, url, layout, tokens_stored=True)
        for domain in domains:
            for split in SPLITS:
                group = root[f"{domain.name}/{split}"]
                for name in [n for n in group.array_keys() if n != TOKENS]:  # half-added arrays, or an earlier teacher's
                    del group[name]
                if CHECKSUM_GROUP in group:
                    for name in [n for n in group[CHECKSUM_GROUP].array_keys() if n != TOKENS]:
                        del group[CHECKSUM_GROUP][name]
                create_target_arrays(group, getattr(domain, split).n_windows, layout)
            info = dict(root[domain.name].attrs[DOMAIN_ATTR])
            root[domain.name].attrs[DOMAIN_ATTR] = {**info, "teacher_valid_loss": None, "teacher_valid_ppl": None}
        root.attrs[HEADER_ATTR] = {**header, "status": "writing"}
        return cls(root, url, layout, tokens_stored=True)

    @classmethod
    def open_existing(cls, url: str, layout: StoreLayout, storage_options: dict | None = None) -> "CacheWriter":
        """Re-open a store that `create_or_resume` or `add_targets` prepared (and checked) in another process."""
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        root = zarr.open_group(store, mode="r+")
        return cls(root, url, layout, tokens_stored="packed_at" in root.attrs[HEADER_ATTR])

    def split_group(self, domain: str, split: str) -> zarr.Group:
        return self.root[f"{domain}/{split}"]

    def pending_shards(self, domain: str, split: str) -> list[int]:
        done = self.split_group(domain, split)[SHARD_DONE][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write_shard(self, domain: str, split: str, shard: int, windows: np.ndarray, targets: EncodedTargets) -> None:
        """Write shard `shard` of every array, then mark it done (the marker is the commit)."""
        group = self.split_group(domain, split)
        region = self.layout.shard_slice(shard, group[TOKENS].shape[0])
        if windows.shape[0] != region.stop - region.start:
            raise ValueError(f"shard {shard} expects {region.stop - region.start} windows, got {windows.shape[0]}")
        for name, values in self._arrays(windows, targets).items():
            if name == TOKENS and self.tokens_stored:
                continue
            array = group[name]
            stored = values.astype(array.dtype, copy=False)
            array[region] = stored
            if self._has_checksums(domain, split, name):  # after the data, before the marker: a marked shard has both
                write_checksums(group, name, region.start, decoded_like_zarr(stored, array.dtype, array.filters), self.layout.chunk_windows)
        group[SHARD_DONE][shard] = 1

    def _has_checksums(self, domain: str, split: str, name: str) -> bool:
        key = (domain, split, name)
        if key not in self._checksummed:
            self._checksummed[key] = has_checksums(self.split_group(domain, split), name)
        return self._checksummed[key]

    def set_status(self, status: str) -> None:
        header = dict(self.root.attrs[HEADER_ATTR])
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.root.attrs[HEADER_ATTR] = {**header, "status": status, **({"packed_at": stamp} if status == "packed" else {})}

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

    def finish_domain(self, domain: str) -> dict[str, Any]:
        """Record the teacher's validation loss, read back from the stored actual-token log-probs."""
        loss, ppl = teacher_loss(self.split_group(domain, "valid")[TARGET_LOGPROBS][:])
        group = self.root[domain]
        info = {**group.attrs[DOMAIN_ATTR], "teacher_valid_loss": loss, "teacher_valid_ppl": ppl}
        group.attrs[DOMAIN_ATTR] = info
        return info

    def finish(self) -> None:
        header = dict(self.root.attrs[HEADER_ATTR])
        header.update(status="complete", completed_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        self.root.attrs[HEADER_ATTR] = header


def _open_for_writing(url: str, storage_options: dict | None) -> tuple[Any, dict | None]:
    """The writable store at `url` and the header of the ddk-cache store already there (None if none)."""
    try:
        store = zarr_store(url, read_only=False, storage_options=storage_options)
        return store, _existing_header(store, url)
    except (OSError, ValueError) as exc:  # object stores: refused credentials, missing bucket, unreachable endpoint
        raise StoreError(f"cannot open {url} for writing: {first_line(exc)}: check the URL, credentials and --storage-options") from None


def _new_root(store, url: str, header: dict[str, Any]) -> zarr.Group:
    """An empty root group holding `header` (whatever was at `url` is replaced)."""
    try:
        return zarr.open_group(store, mode="w", attributes={HEADER_ATTR: header})
    except OSError as exc:  # object stores: missing bucket, no write permission
        raise StoreError(f"cannot write to {url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None


def _existing_header(store, url: str) -> dict | None:
    """The header of an existing ddk-cache store at `url`, None if nothing is there."""
    try:
        root = zarr.open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        local = Path(url)
        if "://" not in url and local.exists() and (not local.is_dir() or any(local.iterdir())):
            raise StoreError(f"{url} exists and is not a ddk-cache store: refusing to touch it; choose another --out") from None
        return None
    header = root.attrs.get(HEADER_ATTR)
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise StoreError(f"{url} is a Zarr store but not a ddk-cache store: refusing to touch it; choose another --out")
    return header


def differing_keys(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two identities (a key missing on one side differs), sorted."""
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


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
        info = root[domain.name].attrs[DOMAIN_ATTR]
    except KeyError:
        raise StoreError(f"{url} lacks domain {domain.name!r} (a writer died while creating it): pass --overwrite to start again") from None
    for split in SPLITS:
        packed: PackedSplit = getattr(domain, split)
        if info[split]["tokens_sha256"] != packed.sha256():
            raise StoreError(
                f"{url}: the text of domain {domain.name!r} ({split}) changed since this store was started: "
                "pass --overwrite to start again, or restore the original data"
            )


def _create_domain(root: zarr.Group, domain: PackedDomain, layout: StoreLayout) -> None:
    group = root.create_group(domain.name)
    info: dict[str, Any] = {"name": domain.name, "teacher_valid_loss": None, "teacher_valid_ppl": None}
    for split in SPLITS:
        packed: PackedSplit = getattr(domain, split)
        create_split_arrays(group.create_group(split), packed.n_windows, layout)
        info[split] = {
            "windows": packed.n_windows,
            "tokens": packed.n_tokens,
            "documents": packed.n_documents,
            "tokens_sha256": packed.sha256(),
        }
    group.attrs[DOMAIN_ATTR] = info


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
