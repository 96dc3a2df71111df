"""`ddk-cache verify`: is every shard of a store present, intact and well-formed?

Why a command and not just reading: a shared cache is copied between buckets and disks, and
a missing shard object reads back as zeros (the fill value) without any error. `verify` checks,
for every shard of every data array of every split:

- presence: the shard object exists, and `shard_done` marks it written;
- integrity: it decodes (every inner chunk carries a crc32c checksum, so flipped bits fail here), and
  every inner chunk's decoded values match the checksum recorded at its place (`integrity.py`: a
  shard copied over another, a deleted one read as zeros, an edited scale all fail here);
- metadata: each array's dtype, window shape, chunking and value-changing codecs are the layout's;
- form (format versions 2 and 3): 1 <= n_entries <= width, ids strictly ascending (headtail: within the
  head and within the tail, no tail id in the head) and inside the teacher's vocabulary, log-probs <= 0
  (up to their quantization), draws counted exactly once (headtail: the tail's shares sum to 1, up to
  their quantization), and actual-token log-probs <= 0;

and, per domain, that the teacher's validation loss was recorded. It reads the whole store once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from zarr.core.sync import sync

from ddk_cache.errors import StoreError
from ddk_cache.store.encodings import decoded
from ddk_cache.store.format import COUNTS, LOGPROBS, N_ENTRIES, SHARD_DONE, SPLITS
from ddk_cache.store.reader import CacheReader


@dataclass
class VerifyReport:
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # limits of the check, not problems
    checksummed: bool = True  # whether chunk checksums were there to check

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_url(url: str, storage_options: dict | None = None) -> VerifyReport:
    """`ddk-cache verify URL`: the store opened as it is (incomplete ones too: what is missing is a finding)."""
    return verify_store(CacheReader(url, storage_options=storage_options, allow_incomplete=True))


def verify_store(reader: CacheReader) -> VerifyReport:
    report = VerifyReport()
    if not reader.complete:
        report.problems.append(f"status is {reader.header.status!r}, not 'complete': run teacher-dump again to finish it")
    _verify_tokenizer(reader, report)
    if not reader.checksummed:
        report.checksummed = False
        report.notes.append("written before chunk checksums existed: a shard moved within the store or an edited codec "
                            "cannot be detected; re-create the store to get them")
    unsealed = []
    for domain in reader.domains:
        if not reader.has_domain(domain):
            report.problems.append(f"{domain}: group missing")
            continue
        try:
            info = reader.domain_info(domain)
        except StoreError as exc:  # an edited size or teacher validation loss: nothing of the domain can be trusted
            report.problems.append(_why(str(exc)))
            continue
        if info.sha256 is None:
            unsealed.append(domain)
        if reader.capture is not None and info.teacher_valid_loss is None:
            report.problems.append(f"{domain}: teacher validation loss not recorded")
        for split in SPLITS:
            _verify_split(reader, domain, split, report)
    if unsealed:
        report.notes.append(f"domain info of {', '.join(unsealed)} written before its sha256 existed: an edited size or teacher "
                            "validation loss cannot be detected; re-create the store to get it")
    return report


def _verify_tokenizer(reader: CacheReader, report: VerifyReport) -> None:
    """The embedded tokenizer's files against their sha256 in the header; a store without them gets a note."""
    if not reader.embeds_tokenizer:
        report.notes.append(f"does not carry its tokenizer's files: readers need the tokenizer's own folder; add them with "
                            f"`ddk-cache attach-tokenizer {reader.url} TOKENIZER_DIR`")
        return
    try:
        reader.tokenizer_files()
    except StoreError as exc:
        report.problems.append(str(exc).split(": ", 1)[1])


def _verify_split(reader: CacheReader, domain: str, split: str, report: VerifyReport) -> None:
    where = f"{domain}/{split}"
    recorded = reader.domain_info(domain).split(split)
    if recorded is None:
        report.problems.append(f"{where}: not packed yet (its size is not recorded): run `ddk-cache pack` again to finish it")
        return
    n_windows = recorded.windows
    packed_only = reader.capture is None  # `ddk-cache pack` output: windows, no markers or targets yet
    unreadable = _unreadable_metadata(reader, domain, split, packed_only)
    if unreadable:  # nothing below can be read without it: one problem per damaged zarr.json, not one per shard
        report.problems += unreadable
        return
    shard_windows = reader.array(domain, split, reader.data_arrays[0]).shards[0]
    done = None if packed_only else reader.array(domain, split, SHARD_DONE)[:]
    try:
        reader.check_arrays(domain, split)
    except StoreError as exc:
        report.problems.append(str(exc).split(": ", 1)[1])
        return
    for name in reader.data_arrays:
        if reader.array(domain, split, name).shape[0] != n_windows:
            report.problems.append(f"{where}/{name}: {reader.array(domain, split, name).shape[0]} windows, the domain says {n_windows}")
    for shard in range(-(-n_windows // shard_windows) if done is None else len(done)):
        report.shards_checked += 1
        start, stop = shard * shard_windows, min((shard + 1) * shard_windows, n_windows)
        if done is not None and done[shard] not in (0, 1):  # a marker is written as 0 or 1, nothing else
            report.problems.append(f"{where} shard {shard}: marker is {done[shard]}, not 0 or 1 (edited?)")
        elif done is not None and not done[shard]:
            report.problems.append(f"{where} shard {shard}: not marked done")
        missing = [name for name in reader.data_arrays if not _shard_exists(reader, domain, split, name, shard)]
        if missing:
            report.problems.append(f"{where} shard {shard}: object missing for {', '.join(missing)}")
            continue
        if packed_only:
            report.problems += [f"{where} shard {shard}: {p}" for p in _undecodable(reader, domain, split, start, stop)]
            continue
        try:
            block = reader.read(domain, split, start, stop)
        except StoreError:  # undecodable, or not what its checksums say: name every array that fails
            report.problems.append(f"{where} shard {shard}: {'; '.join(_undecodable(reader, domain, split, start, stop))}")
            continue
        report.problems += [f"{where} shard {shard}: {problem}" for problem in _form_problems(reader, domain, split, start, stop, block)]


def _unreadable_metadata(reader: CacheReader, domain: str, split: str, packed_only: bool) -> list[str]:
    """The split's group, arrays, markers and checksum arrays whose zarr.json is missing or damaged, each with why."""
    where = f"{domain}/{split}"
    try:
        reader.node(where)
    except StoreError as exc:
        return [_why(str(exc))]
    problems = []
    for name in [*reader.data_arrays, *(() if packed_only else (SHARD_DONE,))]:
        try:
            reader.array(domain, split, name)
            if name != SHARD_DONE and reader.checksummed:
                reader.checksums(domain, split, name)
        except StoreError as exc:
            problems.append(_why(str(exc)))
    return problems


def _undecodable(reader: CacheReader, domain: str, split: str, start: int, stop: int) -> list[str]:
    """The arrays whose rows `[start, stop)` fail to decode or to match their checksums, each with why."""
    failures = []
    for name in reader.data_arrays:
        try:
            reader.read_array(domain, split, name, start, stop)
        except StoreError as exc:
            failures.append(_why(str(exc)))
    return failures


def _why(message: str) -> str:
    """The reader's one-line error without the store URL and the advice to run verify (verify is running)."""
    return message.split(": ", 1)[-1].split(": the store is damaged")[0]


def _shard_exists(reader: CacheReader, domain: str, split: str, name: str, shard: int) -> bool:
    array = reader.array(domain, split, name)
    key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
    return bool(sync(array.store.exists(f"{array.path}/{key}" if array.path else key)))


def _form_problems(reader: CacheReader, domain: str, split: str, start: int, stop: int, block) -> list[str]:
    """Format-level checks of one decoded shard (the decoded form is the same for versions 1 and 2)."""
    problems = []
    if np.any(block.target_logprobs > 1e-3):
        problems.append("actual-token log-probs above 0")
    vocab = reader.header.teacher.vocab_size
    valid = np.ones(block.ids.shape, dtype=bool) if block.valid is None else block.valid
    if np.any(valid & ((block.ids < 0) | (block.ids >= vocab))):
        problems.append(f"entry ids outside the teacher's vocabulary ({vocab})")
    if reader.format_version == 1:
        return problems
    capture = reader.capture
    n_entries = reader.array(domain, split, N_ENTRIES)[start:stop]
    if np.any(n_entries < 1) or np.any(n_entries > capture.width):
        problems.append(f"n_entries outside 1..{capture.width} (a shard of zeros: lost data?)")
        return problems
    ids = np.where(valid, block.ids.astype(np.int64), np.iinfo(np.int64).max)
    gaps = np.diff(ids, axis=-1)
    ascending = valid[..., 1:]
    if capture.mode == "headtail":
        ascending = ascending & (np.arange(1, ids.shape[-1]) != capture.k)  # the tail starts again from its own smallest id
    if np.any((gaps <= 0) & ascending):
        problems.append("entry ids not strictly ascending" + (" within the head and within the tail" if capture.mode == "headtail" else ""))
    if capture.mode == "headtail":
        problems += _head_and_tail_problems(ids, valid, decoded(reader.array(domain, split, LOGPROBS), slice(start, stop)), capture)
    if capture.mode == "sampled":
        counts = reader.array(domain, split, COUNTS)[start:stop].astype(np.int64)
        if np.any(counts.sum(-1) != capture.draws):
            problems.append(f"draw counts do not sum to {capture.draws}")
    elif np.any(np.where(valid, block.logprobs, 0) > (0.5 / capture.logprob_scale if capture.logprob_scale else 1e-3)):
        problems.append("entry log-probs above 0")
    return problems


def _head_and_tail_problems(ids: np.ndarray, valid: np.ndarray, stored: np.ndarray, capture) -> list[str]:
    """headtail: a tail id never repeats a head id (the draws come from outside the head), and each position's tail
    values log(count / draws) add up to 1 draw in all, up to their quantization (half a level each, relatively).
    Log-probs above 0 are the check every log-prob mode shares (on the read entries: the head's, and the tail's
    rest + share)."""
    k, problems = capture.k, []
    head, tail = ids[..., :k, None], np.where(valid[..., k:], ids[..., k:], -1)[..., None, :]
    if np.any(head == tail):
        problems.append("a tail id repeats a head id")
    shares = np.where(valid[..., k:], np.exp(stored[..., k:].astype(np.float64)), 0.0).sum(-1)
    slack = math.expm1(0.5 / capture.logprob_scale) + 1e-6 if capture.logprob_scale else 2e-3
    if np.any(np.abs(shares - 1.0) > slack):
        problems.append("tail shares do not sum to one draw in all")
    return problems
