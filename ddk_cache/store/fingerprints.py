"""Identities that make a cache checkable: which teacher weights and which tokenizer made it.

A student may only learn from a cache whose token ids mean the same tokens to it, so the
tokenizer fingerprint hashes the id <-> token mapping and the special tokens (not the file
bytes, which change with library versions). The teacher is identified by a hash of its
weight and config files when it is a local folder, and by its hub revision otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddk_cache.errors import DDKCacheError

if TYPE_CHECKING:
    from ddk_cache.engines.base import EngineInfo
    from ddk_cache.store.header import TokenizerInfo

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HASHED_CONFIG_FILES = ("config.json",)
_READ_BLOCK = 1 << 24


def require_same_tokenizer(tokenizer, recorded: "TokenizerInfo", whose: str, theirs: str, fix: str) -> None:
    """Refuse `tokenizer` unless it maps every id to the same token as the `recorded` one (a store's header entry).

    One line naming both tokenizers (path, size, fingerprint) and `fix`; `whose` / `theirs` say which is which.
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != recorded.fingerprint:
        raise DDKCacheError(
            f"the {whose} tokenizer ({tokenizer.name_or_path}, {len(tokenizer)} tokens, {fingerprint[:19]}...) differs from "
            f"{theirs} ({recorded.name_or_path}, {recorded.size} tokens, {recorded.fingerprint[:19]}...): {fix}"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included) and the special tokens."""
    content = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    return "sha256:" + hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def tokenizer_description(tokenizer) -> dict[str, Any]:
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def weights_sha256(model_dir: str | Path) -> str | None:
    """sha256 over the names and bytes of a local model folder's weight and config files."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in HASHED_CONFIG_FILES))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(_READ_BLOCK):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def teacher_description(name_or_path: str, revision: str | None, engine: "EngineInfo") -> dict[str, Any]:
    """What identifies the teacher: path or hub id, revision or weight hash, vocab size, architecture."""
    local = Path(name_or_path).is_dir()
    return {
        "name_or_path": str(Path(name_or_path).resolve()) if local else name_or_path,
        "revision": revision or engine.commit_hash,
        "weights_sha256": weights_sha256(name_or_path) if local else None,
        "architecture": engine.architecture,
        "vocab_size": engine.vocab_size,
    }
