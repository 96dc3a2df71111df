"""Format version 1 headers, read into the version 2 classes (`header.py`); never written.

Version 1 stores kept rank-ordered top-k ids and float16 log-probs, always `k` per position, with no
rest and no checksums. Their header differs from version 2 only in `capture` (`{mode: "topk", k,
seq_len, temperature, logprobs}`, no quantization) and in `layout` (which had `k` and no `vocab_size`,
and is absent from the oldest stores). This adapter is the one place that knows it: readers and `verify`
see a `StoreHeader` whose `format_version` is 1 and whose capture is top-k with `logprob_scale` 0.
"""

from __future__ import annotations

from typing import Any

from ddk_cache.store.capture import Capture
from ddk_cache.store.header import (
    CaptureInfo,
    EngineRecord,
    LayoutInfo,
    PackingInfo,
    StoreHeader,
    TeacherInfo,
    TokenizerInfo,
    check_domains,
    check_status,
)
from ddk_cache.store.metadata import HeaderError, take, take_object, unknown


def header_from_v1(raw: dict[str, Any]) -> StoreHeader:
    status = check_status(raw)
    captured = take_object(raw, "capture", "")
    k = take(captured, "k", int, "capture")
    if k <= 0:
        raise HeaderError(f"the store header's 'capture.k' is {k}, not a positive integer")
    capture = CaptureInfo(Capture(mode="topk", k=k, logprob_scale=0), take(captured, "seq_len", int, "capture"),
                          take(captured, "temperature", float, "capture", optional=True) or 1.0)
    layout = take_object(raw, "layout", "", optional=True) or {}
    domains = check_domains(raw)
    packing, engine = take_object(raw, "packing", "", optional=True), take_object(raw, "engine", "", optional=True)
    return StoreHeader(
        format_version=1, status=status,
        created_by=take(raw, "created_by", str, "", optional=True) or "ddk-cache (format version 1)",
        created_at=take(raw, "created_at", str, "", optional=True) or "",
        tokenizer=TokenizerInfo.from_dict(take_object(raw, "tokenizer", "")),
        layout=LayoutInfo(capture.seq_len, take(layout, "chunk_windows", int, "layout", optional=True),
                          take(layout, "shard_windows", int, "layout", optional=True), capture=capture.capture,
                          codec_profile=take(layout, "codec_profile", str, "layout", optional=True)),
        manifest=take_object(raw, "manifest", "", optional=True) or {},
        manifest_sha256=take(raw, "manifest_sha256", str, "", optional=True) or "",
        seed=take(raw, "seed", int, "", optional=True) or 0,
        domains=tuple(domains),
        versions=take_object(raw, "versions", "", optional=True) or {},
        packing=PackingInfo.from_dict(packing) if packing is not None else None,
        completed_at=take(raw, "completed_at", str, "", optional=True),
        identity=take_object(raw, "identity", "", optional=True),
        teacher=TeacherInfo.from_dict(take_object(raw, "teacher", "")),
        engine=EngineRecord.from_dict(engine) if engine is not None else None,
        capture=capture,
        extra=unknown({key: value for key, value in raw.items() if key != "format"}, StoreHeader),
    )
