"""The typed metadata of a ddk-cache store, format version 2: the root header and each domain's info.

Why dataclasses with validating `from_dict` / `to_dict` (the way zarr-python types its own metadata in
`core/metadata/v3.py`): the header is written by three jobs (`pack`, `teacher-dump`, the writer's status
changes) and read by every command and by other teams' trainers. As a dict read by string keys, a key
renamed in one place, or a zarr.json edited by hand, surfaced as a KeyError deep in a command. Here
every key is parsed once, where the store is opened: a missing or mistyped key is refused in one line
naming its dotted path, and every later use is an attribute the type checker knows.

`to_dict` writes exactly the documented JSON (docs/cache-format.md, "HEADER" and "DOMAIN_INFO"); keys
this version does not know are kept in `extra` and written back unchanged, so rewriting a header
(a status change) never drops what a newer writer added. Both directions derive from the fields
(`metadata.py`'s `Metadata` base). This module knows version 2 only: `header_versions.py` tells the
versions apart and sends version 1 through its adapter (`header_v1.py`), which builds these same classes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ddk_cache.store.capture import Capture, capture_from_attrs
from ddk_cache.store.metadata import HeaderError, Metadata, short, take, take_object, unknown

FORMAT_NAME = "ddk-cache"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SAME_HEADER_VERSIONS = (2, 3)  # format 3 changed the arrays' encodings, not the header: one class reads both
# "creating"/"writing": a dump; "packing"/"packed": `ddk-cache pack`; "complete": readable for training
STATUSES = ("creating", "packing", "packed", "writing", "complete")
LOGPROBS_NOTE = "raw log_softmax of the teacher's logits at temperature 1, computed in float32"
PERMUTATION_RULE = "document-permutation-v1"  # teacher-dump --manifest's split rule; stores of ddk-cache <= 0.1 name none

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "STATUSES", "HeaderError", "TokenizerInfo", "LayoutInfo",
           "CaptureInfo", "TeacherInfo", "EngineRecord", "PackingInfo", "RolloutInfo", "StoreHeader", "SplitInfo", "DomainInfo",
           "bare_header", "now", "parse_capture", "check_status", "check_domains"]


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_status(raw: dict[str, Any]) -> str:
    status = take(raw, "status", str, "")
    if status not in STATUSES:
        raise HeaderError(f"the store header's 'status' is {status!r}, not one of {', '.join(STATUSES)}")
    return status


def check_domains(raw: dict[str, Any]) -> tuple[str, ...]:
    domains = take(raw, "domains", list, "")
    if not all(isinstance(name, str) for name in domains):
        raise HeaderError("the store header's 'domains' must be a list of domain names")
    return tuple(domains)


# -- the parts of the header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo(Metadata):
    """The tokenizer the windows were made with; `fingerprint` changes exactly when an id means another token.

    `files` (name -> sha256) names the tokenizer's own files embedded in the store's `_tokenizer` group
    (`embedded_tokenizer.py`); None where they are not (stores written before the tokenizer was embedded, until
    `ddk-cache attach-tokenizer` adds it).
    """

    name_or_path: str
    class_name: str = field(metadata={"key": "class"})
    fingerprint: str
    size: int
    eos_token_id: int | None
    bos_token_id: int | None
    files: dict[str, str] | None = field(default=None, metadata={"omit_none": True})

    @classmethod
    def from_dict(cls, raw: Any, where: str = "tokenizer") -> "TokenizerInfo":
        info = super().from_dict(raw, where)
        if info.files is not None and not all(isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:")
                                              for k, v in info.files.items()):
            raise HeaderError(f"the store header's '{where}.files' must map file names to \"sha256:...\" digests")
        return info


@dataclass(frozen=True)
class LayoutInfo(Metadata):
    """The windows' geometry; once scored also the capture, the teacher's vocabulary and the codec chains' name.

    `chunk_windows` / `shard_windows` are None only in version 1 headers that predate them.
    """

    OMIT_NONE: ClassVar[bool] = True

    seq_len: int
    chunk_windows: int | None
    shard_windows: int | None
    capture: Capture | None = None
    vocab_size: int | None = None
    codec_profile: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "layout", scored: bool = True) -> "LayoutInfo":
        """Why not derived: the capture is a `Capture` (checked by its own rules), and a scored store must name
        the teacher's vocabulary while a packed one has none yet."""
        capture = take_object(raw, "capture", where, optional=True)
        return cls(take(raw, "seq_len", int, where), take(raw, "chunk_windows", int, where), take(raw, "shard_windows", int, where),
                   capture=parse_capture(capture, f"{where}.capture") if capture is not None else None,
                   vocab_size=take(raw, "vocab_size", int, where, optional=not scored),
                   codec_profile=take(raw, "codec_profile", str, where, optional=True))


@dataclass(frozen=True)
class CaptureInfo(Metadata):
    """What is kept per position (`capture`), with the window length and a description of the values.

    Its JSON is flat (the capture's own keys beside `seq_len`, plus the derived `width` that readers in
    other languages use), so both directions are written here rather than derived.
    """

    capture: Capture
    seq_len: int
    temperature: float = 1.0
    logprobs: str = LOGPROBS_NOTE

    @classmethod
    def from_dict(cls, raw: Any, where: str = "capture") -> "CaptureInfo":
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
class TeacherInfo(Metadata):
    """Which teacher scored the store: path or hub id, revision or weight hash, architecture, logits' width."""

    name_or_path: str
    revision: str | None
    weights_sha256: str | None
    architecture: str | None
    vocab_size: int
    dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "teacher") -> "TeacherInfo":
        return super().from_dict(raw, where)


@dataclass(frozen=True)
class EngineRecord(Metadata):
    """The engine of the run that created the store: name (hf, vllm), its version, its own settings, processes."""

    OMIT_NONE: ClassVar[bool] = True

    name: str
    version: str | None
    torch_version: str | None = None
    settings: dict[str, Any] = field(default_factory=dict, metadata={"optional": True})
    data_parallel: int | None = None
    selected_by: str | None = None  # why this engine ran ("--engine vllm", "auto: ..."); absent in older stores

    @classmethod
    def from_dict(cls, raw: Any, where: str = "engine") -> "EngineRecord":
        return super().from_dict(raw, where)


@dataclass(frozen=True)
class PackingInfo(Metadata):
    """How documents were split and cut into windows (`split_rule`; `valid_fraction` for `ddk-cache pack`'s rule)."""

    OMIT_NONE: ClassVar[bool] = True

    split_rule: str = PERMUTATION_RULE
    valid_fraction: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "packing") -> "PackingInfo":
        return super().from_dict(raw, where)


@dataclass(frozen=True)
class RolloutInfo(Metadata):
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
    # teacher-mixed sampling (MiniLLM): the train split's tokens were drawn from (1 - teacher_mix) q + teacher_mix p, p
    # being `mix_teacher`'s; its `sampling_logprobs` array holds the mixture's log-prob of each. 0: the student alone.
    teacher_mix: float = field(default=0.0, metadata={"optional": True})
    mix_teacher: str | None = None
    mix_teacher_weights_sha256: str | None = None

    OMIT_NONE: ClassVar[bool] = True  # stores of ddk-cache before teacher mixing have none of the mixture's keys

    @property
    def sampled(self) -> bool:
        """Whether the responses are the student's samples (MiniLLM's policy gradient needs them), not the references."""
        return self.generator != "references"

    @classmethod
    def from_dict(cls, raw: Any, where: str = "rollout") -> "RolloutInfo":
        return super().from_dict(raw, where)


# -- the root header ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreHeader(Metadata):
    """Root attribute `ddk_cache`: what the store is, where it came from, and how far its writing got.

    A packed store (`ddk-cache pack`) has no `identity`, `teacher`, `engine` or `capture`; scoring adds
    all four (`scored`). `identity` stays a plain object: it is compared key by key on resume, and
    names whatever a resumed run must match.
    """

    OMIT_NONE: ClassVar[bool] = True

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
    def from_dict(cls, raw: Any, where: str = "") -> "StoreHeader":
        """Parse and check a version 2 header (`header_versions.parse_header` reads any version). Raises
        `HeaderError` naming the key. Why not derived: which parts are required depends on whether the
        store is scored yet, and the status and domain names have rules of their own."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise HeaderError("is not a ddk-cache store (no 'ddk_cache' header)", damaged=False, not_ddk_cache=True)
        if raw.get("format_version") not in SAME_HEADER_VERSIONS:
            raise HeaderError(f"has cache format version {raw.get('format_version')!r}, not {FORMAT_VERSION}: "
                              "read it with `ddk_cache.store.header_versions.parse_header`", damaged=False)
        status, scored, domains = check_status(raw), "capture" in raw or "identity" in raw, check_domains(raw)
        packing, teacher = take_object(raw, "packing", "", optional=True), take_object(raw, "teacher", "", optional=not scored)
        capture, engine = take_object(raw, "capture", "", optional=not scored), take_object(raw, "engine", "", optional=not scored)
        rollout = take_object(raw, "rollout", "", optional=True)
        return cls(
            format_version=raw["format_version"], status=status, created_by=take(raw, "created_by", str, ""),
            created_at=take(raw, "created_at", str, ""),
            tokenizer=TokenizerInfo.from_dict(take_object(raw, "tokenizer", "")),
            layout=LayoutInfo.from_dict(take_object(raw, "layout", ""), scored=scored),
            manifest=take_object(raw, "manifest", ""), manifest_sha256=take(raw, "manifest_sha256", str, ""),
            seed=take(raw, "seed", int, ""), domains=domains, versions=take_object(raw, "versions", ""),
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
        """The JSON written to the root's `ddk_cache` attribute (absent parts left out), `format` first."""
        return {"format": FORMAT_NAME, **super().to_dict()}


# -- a domain group's attribute ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitInfo(Metadata):
    """A split's size and the sha256 of its tokens (which detects changed source text on resume)."""

    windows: int
    tokens: int
    documents: int | None
    tokens_sha256: str


@dataclass(frozen=True)
class DomainInfo(Metadata):
    """Domain group attribute `ddk_cache_domain`. `train` / `valid` are None while `pack` writes the domain;
    the teacher's validation loss is None until scoring finishes the domain.

    `sha256` seals the other keys (`sealed()`; checked by `header_versions.read_domain_info`): the sizes and the
    teacher's validation loss, which DDK's sampler divides by, change results as much as any chunk does. None in
    stores written before it existed.
    """

    name: str
    train: SplitInfo | None = None
    valid: SplitInfo | None = None
    teacher_valid_loss: float | None = None
    teacher_valid_ppl: float | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, metadata={"key": None})

    def split(self, split: str) -> SplitInfo | None:
        return self.train if split == "train" else self.valid

    def content_sha256(self) -> str:
        """sha256 of the canonical JSON of every key but `sha256` itself."""
        content = {key: value for key, value in self.to_dict().items() if key != "sha256"}
        return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self) -> "DomainInfo":
        return dataclasses.replace(self, sha256=self.content_sha256())

    @classmethod
    def from_dict(cls, raw: Any, where: str = "ddk_cache_domain") -> "DomainInfo":
        if not isinstance(raw, dict):
            raise HeaderError(f"the domain attribute '{where}' is {short(raw)}, not an object")
        return super().from_dict(raw, where)


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
