"""Which teacher token is exactly one student token: the part of a cached distribution a student can be told directly.

Why exact string matches (GOLD's first step, TRL): where a teacher token's bytes (`token_bytes.py`) are also one
student token, "the teacher gives p to its next token being these bytes" and "the student gives q to its next
token being these bytes" are the same event, and p vs q is an honest KD target. Whatever has no such twin
(a teacher token the student spells in two pieces) goes to the loss's rest bucket and its sorted-probability
term (`cross_tokenizer_loss.py`). Special tokens map by role (EOS to EOS, BOS to BOS, UNK to UNK), then by
their text where both tokenizers have the same marker.

The map depends only on the two tokenizers, costs a pass over both vocabularies (a second or two for 150k-token
ones) and is the same for every window and every run, so it is computed once per pair and kept on disk under
both fingerprints (`DDK_CACHE_HOME`, default `~/.cache/ddk-cache`, `vocab-maps/`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddk_cache.store.fingerprints import tokenizer_fingerprint
from ddk_cache.training.token_bytes import special_ids, token_bytes

NO_TOKEN = -1


def cache_home() -> Path:
    return Path(os.environ.get("DDK_CACHE_HOME") or Path.home() / ".cache" / "ddk-cache")


@dataclass(frozen=True)
class VocabMap:
    """`teacher_to_student[t]`: the student id with teacher id t's bytes, or -1."""

    teacher_to_student: np.ndarray  # int32 [teacher vocabulary]
    teacher_fingerprint: str
    student_fingerprint: str

    @property
    def exact_share(self) -> float:
        """The share of the teacher's vocabulary that maps to one student token."""
        return float((self.teacher_to_student >= 0).mean())


def special_map(teacher, student) -> dict[int, int]:
    """Teacher special id -> student special id: by role first, then by the marker's text; -1 where the student has none."""
    out = {}
    for role in ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id"):
        t, s = getattr(teacher, role, None), getattr(student, role, None)
        if t is not None and t not in out:
            out[t] = s if s is not None else NO_TOKEN
    student_vocab = student.get_vocab()
    student_special = special_ids(student)
    for t in special_ids(teacher):
        if t not in out:
            s = student_vocab.get(teacher.convert_ids_to_tokens(t))
            out[t] = s if s is not None and s in student_special else NO_TOKEN
    return out


def build_vocab_map(teacher, student) -> VocabMap:
    teacher_bytes, student_bytes = token_bytes(teacher), token_bytes(student)
    by_bytes = {b: i for i, b in enumerate(student_bytes) if b is not None}
    mapping = np.full(len(teacher_bytes), NO_TOKEN, dtype=np.int32)
    for t, b in enumerate(teacher_bytes):
        if b is not None and b in by_bytes:
            mapping[t] = by_bytes[b]
    for t, s in special_map(teacher, student).items():
        if t < len(mapping):
            mapping[t] = s
    return VocabMap(mapping, tokenizer_fingerprint(teacher), tokenizer_fingerprint(student))


def vocab_map(teacher, student, cache_dir: Path | None = None) -> VocabMap:
    """The map for this pair, from the disk cache when it is there, built and written there otherwise."""
    teacher_fp, student_fp = tokenizer_fingerprint(teacher), tokenizer_fingerprint(student)
    folder = (cache_dir or cache_home()) / "vocab-maps"
    path = folder / f"{teacher_fp.removeprefix('sha256:')[:24]}-{student_fp.removeprefix('sha256:')[:24]}.npy"
    if path.exists():
        mapping = np.load(path)
        if mapping.shape == (len(teacher),) and mapping.dtype == np.int32:
            return VocabMap(mapping, teacher_fp, student_fp)
    built = build_vocab_map(teacher, student)
    try:  # written whole (temporary file, then renamed), so a reader never sees half a map
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as handle:
            np.save(handle, built.teacher_to_student)
        os.replace(handle.name, path)
    except OSError:
        pass  # a read-only home: the map is rebuilt next time, nothing else changes
    return built
