"""The typed metadata of a ddk-cache store, format version 2: the root header and each domain's info.

Why dataclasses with validating `from_dict` / `to_dict` (the way zarr-python types its own metadata in
`core/metadata/v3.py`): the header is written by three jobs (`pack`, `teacher-dump`, the writer's status
changes) and read by every command and by other teams' trainers. As a dict read by string keys, a key
renamed in one place, or a zarr.json edited by hand, surfaced as a KeyError deep in a command. Here
every key is parsed once, where the store is opened: a missing or mistyped key is refused in one line
naming its dotted path, and every later use is an attribute the type checker knows.

`to_dict` writes exactly the documented JSON (docs/cache-format.md, "HEADER" and "DOMAIN_INFO"); keys
this version does not know are kept in `extra` and written back unchanged, so rewriting a header
(a status change) never drops what a newer writer added. Version 1 headers are read through one
adapter (`store_header_v1.py`) into these same classes and are never written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from ddk_cache.capture import Capture, capture_from_attrs
from ddk_cache.errors import StoreError

FORMAT_NAME = "ddk-cache"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# "creating"/"writing": a dump; "packing"/"packed": `ddk-cache pack`; "complete": readable for training
STATUSES = ("creating", "packing", "packed", "writing", "complete")
LOGPROBS_NOTE = "raw log_softmax of the teacher's logits at temperature 1, computed in float32"
PERMUTATION_RULE = "document-permutation-v1"  # teacher-dump --manifest's split rule; stores of ddk-cache <= 0.1 name none


class HeaderError(StoreError):
    """A header key missing or of the wrong type (`damaged`), or a header this version cannot read at all.

    The message names the key's dotted path; `at(url)` says which store and what to do.
    """

    def __init__(self, message: str, damaged: bool = True) -> None:
        super().__init__(message)
        self.damaged = damaged

    def at(self, url: str) -> StoreError:
        if self.damaged:
            return StoreError(f"{url}: {self} (its zarr.json was edited or damaged): restore it from a copy, or re-create the store")
        return StoreError(f"{url} {self}")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- parsing helpers: one place that knows how to say "this key is wrong" --------------------------------------

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list", bool: "true or false"}


def take(raw: dict[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    """`raw[key]` checked to be of `kind` (None allowed when `optional`); errors name `where.key`."""
    path = f"{where}.{key}" if where else key
    if key not in raw:
        if optional:
            return None
        raise HeaderError(f"the store header lacks '{path}'")
    value = raw[key]
    if value is None and optional:
        return None
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
        raise HeaderError(f"the store header's '{path}' is {_short(value)}, not {_KIND_NAMES.get(kind, kind.__name__)}")
    return float(value) if kind is float else value


def take_object(raw: dict[str, Any], key: str, where: str, optional: bool = False) -> dict[str, Any] | None:
    return take(raw, key, dict, where, optional)


def unknown(raw: dict[str, Any], cls: type) -> dict[str, Any]:
    """The keys of `raw` that `cls` does not model (kept and written back as they were)."""
    known = {f.metadata.get("key", f.name) for f in dataclasses.fields(cls)}
    return {key: value for key, value in raw.items() if key not in known}


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


# -- the parts of the header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer the windows were made with; `fingerprint` changes exactly when an id means another token."""

    name_or_path: str
    class_name: str = field(metadata={"key": "class"})
    fingerprint: str
    size: int
    eos_token_id: int | None
    bos_token_id: int | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "tokenizer") -> "TokenizerInfo":
        return cls(take(raw, "name_or_path", str, where), take(raw, "class", str, where), take(raw, "fingerprint", str, where),
                   take(raw, "size", int, where), take(raw, "eos_token_id", int, where, optional=True),
                   take(raw, "bos_token_id", int, where, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return {"name_or_path": self.name_or_path, "class": self.class_name, "fingerprint": self.fingerprint, "size": self.size,
                "eos_token_id": self.eos_token_id, "bos_token_id": self.bos_token_id}


@dataclass(frozen=True)
class LayoutInfo:
    """The windows' geometry; once scored also the capture, the teacher's vocabulary and the codec chains' name.

    `chunk_windows` / `shard_windows` are None only in version 1 headers that predate them.
    """

    seq_len: int
    chunk_windows: int | None
    shard_windows: int | None
    capture: Capture | None = None
    vocab_size: int | None = None
    codec_profile: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], scored: bool, where: str = "layout") -> "LayoutInfo":
        capture = take_object(raw, "capture", where, optional=True)
        return cls(take(raw, "seq_len", int, where), take(raw, "chunk_windows", int, where), take(raw, "shard_windows", int, where),
                   capture=parse_capture(capture, f"{where}.capture") if capture is not None else None,
                   vocab_size=take(raw, "vocab_size", int, where, optional=not scored),
                   codec_profile=take(raw, "codec_profile", str, where, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"seq_len": self.seq_len, "capture": self.capture.to_attrs() if self.capture else None,
                           "vocab_size": self.vocab_size, "chunk_windows": self.chunk_windows,
                           "shard_windows": self.shard_windows, "codec_profile": self.codec_profile})


@dataclass(frozen=True)
class CaptureInfo:
    """What is kept per position (`capture`), with the window length and a description of the values."""

    capture: Capture
    seq_len: int
    temperature: float = 1.0
    logprobs: str = LOGPROBS_NOTE

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "capture") -> "CaptureInfo":
        return cls(parse_capture(raw, where), take(raw, "seq_len", int, where), take(raw, "temperature", float, where),
                   take(raw, "logprobs", str, where, optional=True) or LOGPROBS_NOTE)

    def to_dict(self) -> dict[str, Any]:
        return {**self.capture.to_attrs(), "width": self.capture.width, "seq_len": self.seq_len,
                "temperature": self.temperature, "logprobs": self.logprobs}


def parse_capture(raw: dict[str, Any], where: str) -> Capture:
    """A `Capture` from its attributes, its settings' own checks reported under `where`."""
    take(raw, "mode", str, where)
    try:
        return capture_from_attrs(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise HeaderError(f"the store header's '{where}' is not a valid capture ({str(exc).splitlines()[0]})") from None


@dataclass(frozen=True)
class TeacherInfo:
    """Which teacher scored the store: path or hub id, revision or weight hash, architecture, logits' width."""

    name_or_path: str
    revision: str | None
    weights_sha256: str | None
    architecture: str | None
    vocab_size: int
    dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "teacher") -> "TeacherInfo":
        return cls(take(raw, "name_or_path", str, where), take(raw, "revision", str, where, optional=True),
                   take(raw, "weights_sha256", str, where, optional=True), take(raw, "architecture", str, where, optional=True),
                   take(raw, "vocab_size", int, where), take(raw, "dtype", str, where, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EngineRecord:
    """The engine of the run that created the store: name (hf, vllm), its version, its own settings, processes."""

    name: str
    version: str | None
    torch_version: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    data_parallel: int | None = None
    selected_by: str | None = None  # why this engine ran ("--engine vllm", "auto: ..."); absent in older stores

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "engine") -> "EngineRecord":
        return cls(take(raw, "name", str, where), take(raw, "version", str, where, optional=True),
                   take(raw, "torch_version", str, where, optional=True), take_object(raw, "settings", where, optional=True) or {},
                   take(raw, "data_parallel", int, where, optional=True), take(raw, "selected_by", str, where, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))


@dataclass(frozen=True)
class PackingInfo:
    """How documents were split and cut into windows (`split_rule`; `valid_fraction` for `ddk-cache pack`'s rule)."""

    split_rule: str = PERMUTATION_RULE
    valid_fraction: float | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "packing") -> "PackingInfo":
        return cls(take(raw, "split_rule", str, where), take(raw, "valid_fraction", float, where, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))


@dataclass(frozen=True)
class RolloutInfo:
    """A rollout store's origin (`ddk-cache rollout`): which student sampled, in which MiniLLM round, how.

    `student_weights_sha256` identifies the policy whose behaviour log-probs are stored: an update must
    start from exactly these weights for its importance ratios to mean anything.
    """

    student: str
    student_weights_sha256: str | None
    round: int
    seed: int
    temperature: float
    max_prompt_tokens: int
    max_new_tokens: int
    generator: str  # "hf" (transformers' generate), "vllm", or "references" (the manifest's answers, not samples)
    train_prompts: int
    test_prompts: int

    @property
    def sampled(self) -> bool:
        """Whether the responses are the student's samples (MiniLLM's policy gradient needs them), not the references."""
        return self.generator != "references"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "rollout") -> "RolloutInfo":
        return cls(take(raw, "student", str, where), take(raw, "student_weights_sha256", str, where, optional=True),
                   take(raw, "round", int, where), take(raw, "seed", int, where), take(raw, "temperature", float, where),
                   take(raw, "max_prompt_tokens", int, where), take(raw, "max_new_tokens", int, where), take(raw, "generator", str, where),
                   take(raw, "train_prompts", int, where), take(raw, "test_prompts", int, where))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the root header ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreHeader:
    """Root attribute `ddk_cache`: what the store is, where it came from, and how far its writing got.

    A packed store (`ddk-cache pack`) has no `identity`, `teacher`, `engine` or `capture`; scoring adds
    all four (`scored`). `identity` stays a plain object: it is compared key by key on resume, and
    names whatever a resumed run must match.
    """

    format_version: int
    status: str
    created_by: str
    created_at: str
    tokenizer: TokenizerInfo
    layout: LayoutInfo
    manifest: dict[str, Any]
    manifest_sha256: str
    seed: int
    domains: tuple[str, ...]
    versions: dict[str, Any]
    packing: PackingInfo | None = None
    integrity: dict[str, Any] | None = None
    packed_at: str | None = None
    completed_at: str | None = None
    identity: dict[str, Any] | None = None
    teacher: TeacherInfo | None = None
    engine: EngineRecord | None = None
    capture: CaptureInfo | None = None
    rollout: RolloutInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict, metadata={"key": None})

    @property
    def scored(self) -> bool:
        return self.capture is not None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def split_rule(self) -> str:
        return (self.packing or PackingInfo()).split_rule

    def manifest_weights(self) -> dict[str, float]:
        """Each domain's manifest `weight` (1.0 where it gives none), in the header's domain order."""
        given = {d.get("name"): d.get("weight", 1.0) for d in self.manifest.get("domains", []) if isinstance(d, dict)}
        return {name: float(given.get(name, 1.0)) for name in self.domains}

    def with_status(self, status: str, **stamps: str) -> "StoreHeader":
        """The same header with a new status (and `packed_at` / `completed_at` when given)."""
        return dataclasses.replace(self, status=status, **stamps)

    @classmethod
    def from_dict(cls, raw: Any) -> "StoreHeader":
        """Parse and check a header; version 1 goes through its adapter. Raises `HeaderError` naming the key."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise HeaderError("is not a ddk-cache store (no 'ddk_cache' header)", damaged=False)
        version = raw.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise HeaderError(f"has cache format version {version}; this ddk-cache reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
                              + ("upgrade ddk-cache" if newer else "re-create the store with teacher-dump"), damaged=False)
        if version == 1:
            from ddk_cache.store_header_v1 import header_from_v1

            return header_from_v1(raw)
        status = take(raw, "status", str, "")
        if status not in STATUSES:
            raise HeaderError(f"the store header's 'status' is {status!r}, not one of {', '.join(STATUSES)}")
        scored = "capture" in raw or "identity" in raw
        domains = take(raw, "domains", list, "")
        if not all(isinstance(name, str) for name in domains):
            raise HeaderError("the store header's 'domains' must be a list of domain names")
        packing, teacher = take_object(raw, "packing", "", optional=True), take_object(raw, "teacher", "", optional=not scored)
        capture, engine = take_object(raw, "capture", "", optional=not scored), take_object(raw, "engine", "", optional=not scored)
        rollout = take_object(raw, "rollout", "", optional=True)
        return cls(
            format_version=version, status=status, created_by=take(raw, "created_by", str, ""), created_at=take(raw, "created_at", str, ""),
            tokenizer=TokenizerInfo.from_dict(take_object(raw, "tokenizer", "")),
            layout=LayoutInfo.from_dict(take_object(raw, "layout", ""), scored),
            manifest=take_object(raw, "manifest", ""), manifest_sha256=take(raw, "manifest_sha256", str, ""),
            seed=take(raw, "seed", int, ""), domains=tuple(domains), versions=take_object(raw, "versions", ""),
            packing=PackingInfo.from_dict(packing) if packing is not None else None,
            integrity=take_object(raw, "integrity", "", optional=True),
            packed_at=take(raw, "packed_at", str, "", optional=True), completed_at=take(raw, "completed_at", str, "", optional=True),
            identity=take_object(raw, "identity", "", optional=not scored),
            teacher=TeacherInfo.from_dict(teacher) if teacher is not None else None,
            engine=EngineRecord.from_dict(engine) if engine is not None else None,
            capture=CaptureInfo.from_dict(capture) if capture is not None else None,
            rollout=RolloutInfo.from_dict(rollout) if rollout is not None else None,
            extra=unknown({key: value for key, value in raw.items() if key != "format"}, cls),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to the root's `ddk_cache` attribute (absent parts left out)."""
        return _drop_none({
            "format": FORMAT_NAME, "format_version": self.format_version, "created_by": self.created_by, "created_at": self.created_at,
            "tokenizer": self.tokenizer.to_dict(), "layout": self.layout.to_dict(), "manifest": self.manifest,
            "manifest_sha256": self.manifest_sha256, "seed": self.seed, "domains": list(self.domains),
            "integrity": self.integrity, "versions": self.versions,
            "packing": self.packing.to_dict() if self.packing else None,
            "identity": self.identity, "teacher": self.teacher.to_dict() if self.teacher else None,
            "engine": self.engine.to_dict() if self.engine else None,
            "capture": self.capture.to_dict() if self.capture else None,
            "rollout": self.rollout.to_dict() if self.rollout else None,
            "status": self.status, "packed_at": self.packed_at, "completed_at": self.completed_at, **self.extra,
        })


# -- a domain group's attribute ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitInfo:
    """A split's size and the sha256 of its tokens (which detects changed source text on resume)."""

    windows: int
    tokens: int
    documents: int | None
    tokens_sha256: str

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "SplitInfo":
        return cls(take(raw, "windows", int, where), take(raw, "tokens", int, where), take(raw, "documents", int, where, optional=True),
                   take(raw, "tokens_sha256", str, where))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DomainInfo:
    """Domain group attribute `ddk_cache_domain`. `train` / `valid` are None while `pack` writes the domain;
    the teacher's validation loss is None until scoring finishes the domain."""

    name: str
    train: SplitInfo | None = None
    valid: SplitInfo | None = None
    teacher_valid_loss: float | None = None
    teacher_valid_ppl: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, metadata={"key": None})

    def split(self, split: str) -> SplitInfo | None:
        return self.train if split == "train" else self.valid

    @classmethod
    def from_dict(cls, raw: Any, where: str = "ddk_cache_domain") -> "DomainInfo":
        if not isinstance(raw, dict):
            raise HeaderError(f"the domain attribute '{where}' is {_short(raw)}, not an object")
        splits = {s: take_object(raw, s, where, optional=True) for s in ("train", "valid")}
        return cls(take(raw, "name", str, where),
                   **{s: SplitInfo.from_dict(value, f"{where}.{s}") if value is not None else None for s, value in splits.items()},
                   teacher_valid_loss=take(raw, "teacher_valid_loss", float, where, optional=True),
                   teacher_valid_ppl=take(raw, "teacher_valid_ppl", float, where, optional=True), extra=unknown(raw, cls))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "teacher_valid_loss": self.teacher_valid_loss, "teacher_valid_ppl": self.teacher_valid_ppl,
                "train": self.train.to_dict() if self.train else None, "valid": self.valid.to_dict() if self.valid else None, **self.extra}


def bare_header(domains: list[str], seq_len: int, capture: Capture, vocab_size: int, chunk_windows: int, shard_windows: int) -> StoreHeader:
    """A complete, scored header with placeholder provenance, for arrays written directly (benchmarks of the
    codecs, tests of the writer) rather than by `teacher-dump`; readers treat it like any other store."""
    return StoreHeader(
        format_version=FORMAT_VERSION, status="complete", created_by="ddk-cache (bare header)", created_at=now(),
        tokenizer=TokenizerInfo("none", "none", "sha256:none", vocab_size, None, None),
        layout=LayoutInfo(seq_len, chunk_windows, shard_windows, capture, vocab_size),
        manifest={}, manifest_sha256="", seed=0, domains=tuple(domains), versions={},
        identity={}, teacher=TeacherInfo("none", None, None, None, vocab_size), engine=EngineRecord("none", None),
        capture=CaptureInfo(capture, seq_len),
    )
