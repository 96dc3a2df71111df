"""A cache read as a student with another tokenizer sees it: its own tokens, and the teacher's entries where aligned.

Why a view over decoded chunks (and not a second store): the alignment is a few milliseconds per window, runs in
the loader's decoding threads beside decompression, and depends on the student's tokenizer, which the cache's
writer never knew. Nothing is written; the same cache serves any student.

Per window: the student's tokens `[seq_len + 1]` (`token_alignment.py`), and per student position the teacher
entries of its aligned teacher position with their ids mapped to student ids (-1: no student token has those
bytes; the entry still counts for the losses' rest bucket and ULD), `valid` false at unaligned positions and
padding. `mask` marks the student's real positions (CE counts them all); `units` counts the bytes each window's
predicted tokens stand for (one per special token), so that losses of two tokenizers compare per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddk_cache.errors import DDKCacheError
from ddk_cache.store.reader import CacheReader, WindowBlock
from ddk_cache.training.token_alignment import WindowAligner
from ddk_cache.training.vocab_map import NO_TOKEN, VocabMap, vocab_map

COVERAGE_WINDOWS = 16  # per domain, the windows the coverage check aligns before training
ESTIMATE_WINDOWS = 32  # per domain, the windows whose student lengths choose the student's window


@dataclass(frozen=True)
class StudentWindows:
    """Decoded windows in the student's tokens, with the attribute names `window_loader` stacks."""

    tokens: np.ndarray  # int64 [n, seq_len + 1] student ids (padded)
    ids: np.ndarray  # int64 [n, seq_len, W] the aligned teacher entries' student ids, -1 where none
    logprobs: np.ndarray  # float32 [n, seq_len, W]
    valid: np.ndarray  # bool [n, seq_len, W]: a real entry at an aligned position
    mask: np.ndarray  # bool [n, seq_len]: a real student position (its next token is in the window)
    units: np.ndarray  # int64 [n]: bytes of the predicted student tokens (specials count one)
    teacher_units: np.ndarray  # int64 [n]: bytes of the teacher's predicted tokens, the same text on the teacher's side
    aligned: int
    positions: int
    exact_mass: float  # summed over aligned positions: the teacher mass on entries with a student twin
    cut_tokens: int
    unmatched_bytes: int
    rest_logprobs: None = None
    target_logprobs: None = None
    response_mask: None = None
    behaviour_logprobs: None = None
    sampling_logprobs: None = None


@dataclass(frozen=True)
class Coverage:
    """What the coverage check saw: the share of student positions aligned, and of the teacher's mass there that maps."""

    aligned_share: float
    exact_mass_share: float
    cut_share: float
    windows: int

    def to_dict(self) -> dict:
        return {"aligned_share": self.aligned_share, "exact_mass_share": self.exact_mass_share, "cut_share": self.cut_share,
                "windows": self.windows}


class CrossTokenizerView:
    """Turns decoded teacher windows into `StudentWindows` for one student tokenizer."""

    def __init__(self, teacher_tokenizer, student_tokenizer, seq_len: int, mapping: VocabMap | None = None) -> None:
        self.mapping = mapping or vocab_map(teacher_tokenizer, student_tokenizer)
        self.aligner = WindowAligner(teacher_tokenizer, student_tokenizer, seq_len, self.mapping)
        self.seq_len = seq_len
        self._teacher_units = np.asarray([len(b) if b is not None else 1 for b in self.aligner.teacher_bytes], dtype=np.int64)
        self._student_units = np.asarray([len(b) if b is not None else 1 for b in self.aligner.student_bytes], dtype=np.int64)

    @classmethod
    def for_store(cls, reader: CacheReader, student_tokenizer, seq_len: int | None = None, domains: list[str] | None = None,
                  context: int | None = None) -> "CrossTokenizerView":
        """The view of `reader`'s cache with its embedded tokenizer (refused in one line without one); `seq_len` None:
        the longest student window among the first windows of each domain (`estimate_seq_len`), at most `context` - 1."""
        teacher = reader.load_tokenizer()
        mapping = vocab_map(teacher, student_tokenizer)
        if seq_len is None:
            probe = cls(teacher, student_tokenizer, 4 * reader.header.seq_len, mapping)
            seq_len = probe.estimate_seq_len(reader, domains or reader.domains)
            if context is not None:
                seq_len = min(seq_len, context - 1)
        return cls(teacher, student_tokenizer, seq_len, mapping)

    def estimate_seq_len(self, reader: CacheReader, domains: list[str]) -> int:
        """The most student tokens a teacher window needed among the first `ESTIMATE_WINDOWS` of each domain, minus one."""
        longest = 1
        for domain in domains:
            tokens = reader.read_array(domain, "train", "tokens", 0, min(ESTIMATE_WINDOWS, reader.domain_info(domain).split("train").windows))
            longest = max([longest, *(self.aligner.align(window).length - 1 for window in tokens)])
        return longest

    def _mapped(self, ids: np.ndarray) -> np.ndarray:
        table = self.mapping.teacher_to_student
        inside = ids < len(table)
        return np.where(inside, table[np.where(inside, ids, 0)], NO_TOKEN).astype(np.int64)

    def windows(self, block: WindowBlock) -> StudentWindows:
        n, width = len(block.tokens), block.ids.shape[-1]
        tokens = np.empty((n, self.seq_len + 1), dtype=np.int64)
        ids = np.full((n, self.seq_len, width), NO_TOKEN, dtype=np.int64)
        logprobs = np.zeros((n, self.seq_len, width), dtype=np.float32)
        valid = np.zeros((n, self.seq_len, width), dtype=bool)
        mask = np.zeros((n, self.seq_len), dtype=bool)
        units, teacher_units = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        aligned = positions = cut = unmatched = 0
        exact = 0.0
        entries_valid = block.valid if block.valid is not None else np.ones(block.ids.shape, dtype=bool)
        for row in range(n):
            window = block.tokens[row]
            result = self.aligner.align(window)
            tokens[row] = result.input_ids
            mask[row, : result.positions] = True
            at = np.flatnonzero(result.teacher_position >= 0)
            source = result.teacher_position[at]
            ids[row, at] = self._mapped(block.ids[row, source])
            logprobs[row, at] = block.logprobs[row, source]
            valid[row, at] = entries_valid[row, source]
            exact += float((np.exp(logprobs[row, at]) * (valid[row, at] & (ids[row, at] >= 0))).sum())
            units[row] = self._units(self._student_units, result.input_ids[1 : result.length])
            teacher_units[row] = self._units(self._teacher_units, window[1:])
            aligned, positions = aligned + result.aligned, positions + result.positions
            cut, unmatched = cut + result.cut_tokens, unmatched + result.unmatched_bytes
        return StudentWindows(tokens, ids, logprobs, valid, mask, units, teacher_units, aligned, positions, exact, cut, unmatched)

    @staticmethod
    def _units(table: np.ndarray, tokens: np.ndarray) -> int:
        inside = tokens < len(table)
        return int(np.where(inside, table[np.where(inside, tokens, 0)], 1).sum())

    def coverage(self, reader: CacheReader, domains: list[str], windows: int = COVERAGE_WINDOWS) -> Coverage:
        """Alignment over the first `windows` training windows of every domain."""
        aligned = positions = cut = seen = 0
        exact = 0.0
        for domain in domains:
            stop = min(windows, reader.domain_info(domain).split("train").windows)
            view = self.windows(reader.read(domain, "train", 0, stop))
            aligned, positions, exact = aligned + view.aligned, positions + view.positions, exact + view.exact_mass
            cut, seen = cut + view.cut_tokens, seen + stop
        return Coverage(aligned / max(positions, 1), exact / max(aligned, 1), cut / max(positions + cut, 1), seen)


def require_coverage(coverage: Coverage, minimum: float, student: str) -> None:
    """Refuse a student tokenizer whose positions mostly have no teacher distribution to learn from."""
    if coverage.aligned_share < minimum:
        raise DDKCacheError(f"only {coverage.aligned_share:.0%} of {student}'s positions align with the teacher's (over "
                            f"{coverage.windows} windows; --min-aligned {minimum:g}): its tokenizer cuts the text elsewhere, "
                            "or changes it (a normaliser); lower --min-aligned to train on what aligns")
