"""Open a ddk-cache store for reading, from a local path or an object-store URL.

The reader trusts only what the store says: the header's format version, the arrays'
own codecs and dtypes (zarr decodes them), and the status flag that tells a finished
store from one still being written. And it checks what it reads: each split's arrays must
have the dtypes, shapes and value-changing codecs the header's layout implies, and every
decoded chunk must match the checksum recorded at its place (`integrity.py`), so a damaged
store is refused in one line instead of being trained on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.core.sync import sync

from ddk_cache.errors import StoreError, first_line
from ddk_cache.store.capture import Capture, estimated_logprobs, sampled_logprobs
from ddk_cache.store.embedded_tokenizer import load_tokenizer_files, read_tokenizer_files
from ddk_cache.store.encodings import ENCODING_ATTR, Encoding, array_encoding
from ddk_cache.store.format import (
    BEHAVIOUR_LOGPROBS,
    COUNTS,
    DOMAIN_ATTR,
    IDS,
    LOGPROBS,
    N_ENTRIES,
    RESPONSE_MASK,
    REST_LOGPROBS,
    SAMPLING_LOGPROBS,
    SHARD_DONE,
    SPLITS,
    TARGET_LOGPROBS,
    TOKENS,
    V1_DATA_ARRAYS,
    V1_TOPK_IDS,
    V1_TOPK_LOGPROBS,
    StoreLayout,
    rollout_specs,
    token_spec,
    zarr_store,
)
from ddk_cache.store.header import DomainInfo, StoreHeader
from ddk_cache.store.header_versions import read_domain_info, read_header
from ddk_cache.store.integrity import CHECKSUM_GROUP, aligned, filters_signature, has_checksums, mismatched_chunks
from ddk_cache.store.metadata import HeaderError


@dataclass(frozen=True)
class WindowBlock:
    """Decoded rows `[start, stop)` of one split: the teacher's sparse targets, ready for the losses.

    `ids` / `logprobs` `[n, L, W]`: entries (log-probs as float32; in sampled mode log(count / draws); in
    headtail mode the head's log-probs, then each tail id's estimated log-prob, `capture.estimated_logprobs`).
    `valid` `[n, L, W]` marks real entries (None when every slot is one: fixed top-k).
    `rest_logprobs` `[n, L]`: log of the teacher mass outside the entries (None: derive it as
    1 - sum(exp(logprobs)), version 1 stores; or no mass outside, sampled and headtail stores, whose
    entries estimate the whole distribution).
    """

    tokens: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    valid: np.ndarray | None
    rest_logprobs: np.ndarray | None
    target_logprobs: np.ndarray
    response_mask: np.ndarray | None = None  # rollout stores `[n, L]`: 1 where the next token is a sampled response token
    behaviour_logprobs: np.ndarray | None = None  # rollout stores `[n, L]`: the sampling student's log-prob of it
    sampling_logprobs: np.ndarray | None = None  # teacher-mixed rollout stores `[n, L]`: the sampling mixture's log-prob of it


def unfinished(url: str, header: StoreHeader) -> str:
    """Why a store that is not complete cannot be read yet, by its status: which job left it so, and what finishes it."""
    if header.status == "packed":
        return f"{url} is packed but not scored yet: score it with `ddk-cache teacher-dump --teacher T --out {url}`"
    if header.status == "packing":
        again = "rollout --overwrite" if header.rollout is not None else "pack"
        return f"{url} is incomplete (`ddk-cache {again}` is running or was killed): run it again to finish the store"
    return f"{url} is incomplete (a dump is running or was killed): run teacher-dump again to finish it"


class CacheReader:
    def __init__(self, url: str, storage_options: dict | None = None, allow_incomplete: bool = False, accept_packed: bool = False) -> None:
        """`allow_incomplete`: any status (inspect, verify); `accept_packed`: a store `pack` finished and no teacher
        scored yet, for readers of its windows alone (MiniLLM's pretraining term); otherwise complete stores only."""
        self.url = url
        try:
            self.root = zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            raise StoreError(f"no ddk-cache store at {url}: check the path (run teacher-dump to create one)") from None
        except (OSError, ValueError) as exc:  # object stores: refused credentials, unreachable endpoint, bad URL
            raise StoreError(f"cannot open {url}: {first_line(exc)}: check the URL, credentials and --storage-options") from None
        header = read_header(self.root, url)
        if not (header.complete or allow_incomplete or (accept_packed and header.status == "packed")):
            raise StoreError(unfinished(url, header))
        self.header: StoreHeader = header
        self.format_version: int = header.format_version
        self._checked: set[tuple[str, str]] = set()  # splits whose array metadata matched the layout
        self._arrays: dict = {}  # opened arrays by path (and their checksum arrays)
        # capture settings, and the names of the arrays that hold data (what `bytes_stored` counts), for this version and mode
        self.capture: Capture | None = header.capture.capture if header.scored else None
        if self.capture is None:  # packed by `ddk-cache pack`, not scored yet: windows only
            self.data_arrays: tuple[str, ...] = (TOKENS,)
        elif self.format_version == 1:  # rank-ordered top-k, float16 log-probs, always k entries
            self.data_arrays = V1_DATA_ARRAYS
        else:
            self.data_arrays = tuple(self._layout().array_specs())
        if header.rollout is not None:  # a rollout store (MiniLLM rounds): the sampled responses' mask and behaviour log-probs
            self.data_arrays += tuple(rollout_specs(header.seq_len, self.format_version, header.rollout.teacher_mix > 0))

    @property
    def complete(self) -> bool:
        return self.header.complete

    @property
    def domains(self) -> list[str]:
        return list(self.header.domains)

    def has_domain(self, domain: str) -> bool:
        return domain in self.root

    def domain_info(self, domain: str) -> DomainInfo:
        group = self.node(domain)  # its zarr.json readable, or one line
        try:
            return read_domain_info(group, self.url)
        except KeyError:
            raise StoreError(f"{self.url}: domain {domain!r} (its group or its '{DOMAIN_ATTR}' attribute) is missing: the store is "
                             f"damaged; run `ddk-cache verify {self.url}`") from None

    def node(self, path: str) -> zarr.Array | zarr.Group:
        """A group or array of the store by path: the one place its metadata is opened, so a deleted or damaged
        `zarr.json` (a KeyError, a JSONDecodeError, zarr's own metadata errors) is one line naming the path."""
        try:
            return self.root[path]
        except KeyError:
            raise StoreError(f"{self.url}: {path} is missing (its zarr.json was deleted?): "
                             f"the store is damaged; run `ddk-cache verify {self.url}`") from None
        except (ValueError, zarr.errors.BaseZarrError) as exc:  # JSONDecodeError is a ValueError
            raise StoreError(f"{self.url}: {path}'s zarr.json is unreadable ({first_line(exc)}): "
                             f"the store is damaged; run `ddk-cache verify {self.url}`") from None

    def array(self, domain: str, split: str, name: str) -> zarr.Array:
        """A data array (its metadata read once: an object store would be asked on every chunk otherwise)."""
        path = f"{domain}/{split}/{name}"
        if path not in self._arrays:
            self._arrays[path] = self.node(path)
        return self._arrays[path]

    def checksums(self, domain: str, split: str, name: str) -> zarr.Array | None:
        """The chunk checksums of a data array; None for stores written before checksums existed."""
        key = ("checksums", domain, split, name)
        if key not in self._arrays:
            group = self.node(f"{domain}/{split}")
            try:
                present = has_checksums(group, name)
            except (ValueError, zarr.errors.BaseZarrError):  # the checksum group's zarr.json: named by `node` below
                present = True
            if present:
                self._arrays[key] = self.node(f"{domain}/{split}/{CHECKSUM_GROUP}/{name}")
            elif self.checksummed:
                raise StoreError(f"{self.url}: {domain}/{split}: the checksums of {name} are missing: the store is damaged; "
                                 f"run `ddk-cache verify {self.url}`")
            else:
                self._arrays[key] = None
        return self._arrays[key]

    @property
    def embeds_tokenizer(self) -> bool:
        """Whether the store carries its tokenizer's files (`embedded_tokenizer.py`); older stores until attached do not."""
        return bool(self.header.tokenizer.files)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The embedded tokenizer's files by name, each checked against its sha256 in the header."""
        if not self.embeds_tokenizer:
            raise StoreError(f"{self.url} does not carry its tokenizer (written before stores did): attach it with "
                             f"`ddk-cache attach-tokenizer {self.url} TOKENIZER_DIR`")
        return read_tokenizer_files(self.root, self.header.tokenizer.files, self.url)

    def load_tokenizer(self):
        """The tokenizer the windows were made with, from the store alone (transformers), checked against the fingerprint."""
        return load_tokenizer_files(self.tokenizer_files(), self.header.tokenizer.fingerprint, self.url)

    @property
    def checksummed(self) -> bool:
        """Whether the store declares chunk checksums (written by ddk-cache since they exist): then they are required."""
        return self.header.integrity is not None and self.format_version >= 2

    def check_metadata(self) -> None:
        """Every domain's info, every split's arrays and their checksum arrays readable and as the layout says.

        A job that trains for hours calls this before it starts (a few small reads per split), so a deleted or
        damaged zarr.json is refused at once, before the run writes anything, rather than at its first read.
        """
        for domain in self.domains:
            self.domain_info(domain)
            for split in SPLITS:
                self.check_arrays(domain, split)
                for name in self.data_arrays:
                    self.checksums(domain, split, name)

    def check_arrays(self, domain: str, split: str) -> None:
        """Refuse arrays whose dtype, window shape, chunking or value-changing codecs differ from the layout's.

        Lossless codec settings (blosc's level, shuffle) may differ: they change bytes, not values.
        """
        if (domain, split) in self._checked or self.format_version == 1:
            return
        expected = {TOKENS: token_spec(self.header.seq_len)} if self.capture is None else self._layout().array_specs()
        expected.update(rollout_specs(self.header.seq_len, self.format_version, True))
        layout = self.header.layout
        for name in self.data_arrays:
            array, spec = self.array(domain, split, name), expected[name]
            trailing = tuple(array.shape[1:])
            problem = None
            if str(array.dtype) != spec.dtype:
                problem = f"dtype {array.dtype}, the layout says {spec.dtype}"
            elif trailing != spec.trailing:
                problem = f"window shape {trailing}, the layout says {spec.trailing}"
            elif array.chunks[0] != layout.chunk_windows or array.shards is None or array.shards[0] != layout.shard_windows:
                problem = f"chunks {array.chunks[0]} / shards {array.shards and array.shards[0]}, the layout says " \
                          f"{layout.chunk_windows} / {layout.shard_windows}"
            elif filters_signature(array.filters) != filters_signature(spec.filters):
                problem = f"codecs {filters_signature(array.filters)}, the layout says {filters_signature(spec.filters)}"
            elif self._encoding(array) != spec.encoding:  # a checksum covers the stored integers, not an edited scale
                problem = f"encoding {array.attrs.get(ENCODING_ATTR)}, the layout says {spec.encoding and spec.encoding.to_dict()}"
            if problem:
                raise StoreError(f"{self.url}: {domain}/{split}/{name} has {problem}: the store is damaged or edited; "
                                 f"run `ddk-cache verify {self.url}`")
        self._checked.add((domain, split))

    def _layout(self) -> StoreLayout:
        layout = self.header.layout
        return StoreLayout(layout.seq_len, self.capture, layout.vocab_size, layout.chunk_windows, layout.shard_windows, self.format_version)

    def read_array(self, domain: str, split: str, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows `[start, stop)` of one data array, decoded and checked against its chunk checksums."""
        return self.read_arrays(domain, split, (name,), start, stop)[name]

    def read_arrays(self, domain: str, split: str, names: tuple[str, ...], start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows `[start, stop)` of several data arrays of a split, decoded and checked against their chunk checksums.

        All arrays and their checksums are fetched in one concurrent batch (one round trip's latency on an
        object store, not one per array); the checked range is widened to whole chunks (a checksum covers a
        chunk), so a chunk-aligned read, the loaders' kind, costs nothing extra.
        """
        self.check_arrays(domain, split)  # every read passes here: the metadata is checked once per split
        arrays = {name: self.array(domain, split, name) for name in names}
        sums = {name: self.checksums(domain, split, name) for name in names}
        rows = arrays[names[0]].shape[0]
        stop = rows if stop is None else min(stop, rows)
        chunk = arrays[names[0]].chunks[0]
        checked = [name for name in names if sums[name] is not None]
        first, last = aligned(start, stop, chunk, rows) if checked else (start, stop)
        chunks = slice(first // chunk, -(-last // chunk))

        async def fetch() -> list:
            return await asyncio.gather(*(arrays[name].async_array.getitem(slice(first, last)) for name in names),
                                        *(sums[name].async_array.getitem(chunks) for name in checked))

        try:
            fetched = sync(fetch())
        except Exception as failure:  # whatever a codec raises on a truncated or corrupted object: find which array, one at a time
            for name, array, rows_or_chunks in [*((n, arrays[n], slice(first, last)) for n in names),
                                                *((f"checksums of {n}", sums[n], chunks) for n in checked)]:
                try:
                    array[rows_or_chunks]
                except Exception as exc:
                    raise StoreError(f"{self.url}: {domain}/{split}/{name} rows {first}-{last} cannot be decoded ({first_line(exc)}): "
                                     f"the store is damaged; run `ddk-cache verify {self.url}`") from None
            raise StoreError(f"{self.url}: {domain}/{split} rows {first}-{last} cannot be read ({first_line(failure)}): "
                             f"run `ddk-cache verify {self.url}`") from None
        values = dict(zip(names, fetched[: len(names)]))
        for name, expected in zip(checked, fetched[len(names):]):
            bad = mismatched_chunks(expected, values[name], first // chunk, chunk)
            if bad:
                array = arrays[name]
                shard = bad[0] * chunk // array.shards[0] if array.shards else bad[0]
                raise StoreError(f"{self.url}: {domain}/{split}/{name} chunk {bad[0]} (shard {shard}) does not match its checksum "
                                 f"(missing, moved or edited data): the store is damaged; run `ddk-cache verify {self.url}`")
        return {name: self._values(arrays[name], value[start - first : stop - first]) for name, value in values.items()}

    def _encoding(self, array: zarr.Array) -> Encoding | None:
        key = ("encoding", array.path)
        if key not in self._arrays:
            try:
                self._arrays[key] = array_encoding(array.attrs)
            except HeaderError as exc:
                raise StoreError(f"{self.url}: {array.path}: {exc}: the store is damaged or edited") from None
        return self._arrays[key]

    def _values(self, array: zarr.Array, stored: np.ndarray) -> np.ndarray:
        """Format 3: the stored integers through the array's encoding (checked against the layout's in check_arrays)."""
        encoding = self._encoding(array)
        return stored if encoding is None else encoding.decode(stored)

    def shards_done(self, domain: str, split: str) -> tuple[int, int]:
        if self.capture is None:
            return 0, 0
        done = self.array(domain, split, SHARD_DONE)[:]
        return int(done.sum()), int(done.size)

    def read(self, domain: str, split: str, start: int = 0, stop: int | None = None) -> WindowBlock:
        """Rows `[start, stop)` of every data array, decoded and checked; use chunk-aligned ranges for speed."""
        fetched = self.read_arrays(domain, split, self.data_arrays, start, stop)
        read = fetched.__getitem__
        if self.capture is None:  # packed, not scored: windows only (entries of width 0, target log-probs unknown)
            tokens = read(TOKENS)
            n, length = tokens.shape[0], tokens.shape[1] - 1
            return WindowBlock(tokens, np.zeros((n, length, 0), np.int32), np.zeros((n, length, 0), np.float32), None, None,
                               np.full((n, length), np.nan, np.float32))
        tokens, target = read(TOKENS), read(TARGET_LOGPROBS).astype(np.float32)
        rollout = {}
        if RESPONSE_MASK in fetched:
            rollout = {"response_mask": read(RESPONSE_MASK), "behaviour_logprobs": read(BEHAVIOUR_LOGPROBS).astype(np.float32)}
            if SAMPLING_LOGPROBS in fetched:
                rollout["sampling_logprobs"] = read(SAMPLING_LOGPROBS).astype(np.float32)
        if self.format_version == 1:
            return WindowBlock(tokens, read(V1_TOPK_IDS), read(V1_TOPK_LOGPROBS).astype(np.float32), None, None, target, **rollout)
        ids, n_entries = read(IDS).astype(np.int32), read(N_ENTRIES)
        width = ids.shape[-1]
        valid = None if self.capture.mode == "topk" else np.arange(width, dtype=n_entries.dtype) < n_entries[..., None]
        if self.capture.mode == "sampled":
            logprobs = sampled_logprobs(read(COUNTS), int(self.capture.draws))
            logprobs[~valid] = 0.0
            return WindowBlock(tokens, ids, logprobs, valid, None, target, **rollout)
        if self.capture.mode == "headtail":
            logprobs = estimated_logprobs(read(LOGPROBS), valid, read(REST_LOGPROBS), self.capture.k)
            return WindowBlock(tokens, ids, logprobs, valid, None, target, **rollout)
        return WindowBlock(tokens, ids, read(LOGPROBS).astype(np.float32), valid, read(REST_LOGPROBS).astype(np.float32), target,
                           **rollout)

    def mean_entries(self, domain: str, split: str) -> float:
        """Mean number of entries per position (variable in topp, sampled and headtail stores)."""
        if self.capture is None:
            return 0.0
        if self.format_version == 1 or self.capture.mode == "topk":
            return float(self.capture.width)
        n_entries = self.array(domain, split, N_ENTRIES)[:]
        return float(n_entries.mean()) if n_entries.size else 0.0

    def bytes_stored(self, domain: str, split: str | None = None) -> int:
        """Bytes on disk (or in the bucket) of a domain's arrays, optionally one split only."""
        splits = [split] if split else ["train", "valid"]
        return sum(self.array(domain, s, name).nbytes_stored() for s in splits for name in self.data_arrays)

