"""One cached teacher window re-tokenized for a student with another tokenizer, and where the two can be compared.

Why byte spans: the teacher's distribution at position i is about what follows the text of its tokens 0..i.
A student's position j is about what follows the text of *its* tokens 0..j. Both windows start at the same byte,
so the two are comparable exactly where both prefixes end at the same byte: a student position is *aligned*
where its next token starts at a teacher token boundary, and then its teacher position is the one whose token
ends there. Everywhere else (the student's next token starts inside a teacher token) no cached distribution
speaks of the same event, and the student gets CE only.

How: the window's tokens become bytes (`token_bytes.py`); special tokens (EOS between packed documents) cut the
text into segments and count as one unit each; each segment's text is encoded by the student; the student's
tokens concatenate to the same bytes, which gives their ends on the same axis as the teacher's. What cannot
be read as text is handled, never dropped silently:

- a window that starts or ends inside a UTF-8 character (documents are cut at window edges): those few bytes
  have no student token, and the positions around them are not aligned;
- a segment the student's tokens do not spell back exactly (a normaliser that changes text): no alignment
  in it, counted in `unmatched_bytes`, which the coverage check reports;
- a teacher special token the student has no twin for (`vocab_map.special_map`): it is skipped on the student's
  side;
- student tokens beyond the student's window (`seq_len + 1` tokens) are cut and counted in `cut_tokens`.

A SentencePiece student that puts a space before the first word of a segment gets that space as part of its
first token's span: its first token then ends where the teacher's does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddk_cache.training.token_bytes import spelling, token_bytes
from ddk_cache.training.vocab_map import NO_TOKEN, VocabMap, special_map


@dataclass(frozen=True)
class AlignedWindow:
    """A student window made from one teacher window.

    `input_ids` `[seq_len + 1]` (padded with `pad_id` past `length`); `teacher_position[j]` (j < seq_len): the
    teacher position whose cached distribution predicts the same next text as student position j, -1 where none
    (and at padding). Counts for the coverage report: `aligned` positions, `positions` real student positions,
    `unmatched_bytes` of text the student could not spell, `cut_tokens` beyond the window.
    """

    input_ids: np.ndarray
    length: int
    teacher_position: np.ndarray
    positions: int
    aligned: int
    unmatched_bytes: int
    cut_tokens: int


def _complete_utf8(data: bytes) -> tuple[int, int]:
    """How many bytes to skip at the start (continuation bytes of a character begun before) and at the end (a character
    the window cuts), so that the rest decodes."""
    lead = 0
    while lead < min(3, len(data)) and 0x80 <= data[lead] < 0xC0:
        lead += 1
    for trail in range(0, min(4, len(data) - lead) + 1):
        try:
            data[lead:len(data) - trail].decode()
            return lead, trail
        except UnicodeDecodeError:
            continue
    return lead, 0


class WindowAligner:
    """Aligns teacher windows for one (teacher tokenizer, student tokenizer) pair; `align` is called per window."""

    def __init__(self, teacher, student, seq_len: int, mapping: VocabMap) -> None:
        self.student = student
        self.seq_len = seq_len
        self.teacher_bytes = token_bytes(teacher)
        self.student_bytes = token_bytes(student)
        self.specials = special_map(teacher, student)
        self.mapping = mapping
        self.sentencepiece = spelling(student) == "sentencepiece"
        pad = student.pad_token_id if student.pad_token_id is not None else student.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    def teacher_ends(self, window: np.ndarray) -> np.ndarray:
        """Each teacher token's end on the shared axis (bytes, and one unit per special token)."""
        lengths = [len(b) if b is not None else 1 for b in (self._teacher_token(int(t)) for t in window)]
        return np.cumsum(lengths)

    def _teacher_token(self, token: int) -> bytes | None:
        return self.teacher_bytes[token] if token < len(self.teacher_bytes) else None

    def align(self, window: np.ndarray) -> AlignedWindow:
        ids: list[int] = []
        ends: list[int] = []
        starts: list[int] = []
        offset = unmatched = 0
        segment = bytearray()

        def flush() -> None:
            nonlocal offset, unmatched
            if segment:
                unmatched += self._encode(bytes(segment), offset, ids, starts, ends)
                offset += len(segment)
                segment.clear()

        for token in window:
            text = self._teacher_token(int(token))
            if text is not None:
                segment += text
                continue
            flush()
            twin = self.specials.get(int(token), NO_TOKEN)
            if twin != NO_TOKEN:
                ids.append(int(twin))
                starts.append(offset)
                ends.append(offset + 1)
            offset += 1
        flush()
        return self._window(np.asarray(ids, dtype=np.int64), np.asarray(starts), np.asarray(ends), self.teacher_ends(window), unmatched)

    def _encode(self, data: bytes, offset: int, ids: list[int], starts: list[int], ends: list[int]) -> int:
        """Append the student's tokens of one text segment at `offset`; returns the bytes it could not spell."""
        lead, trail = _complete_utf8(data)
        body = data[lead:len(data) - trail]
        if not body:
            return 0
        tokens = self.student(body.decode(), add_special_tokens=False)["input_ids"]
        pieces = [self.student_bytes[t] if t < len(self.student_bytes) else None for t in tokens]
        if any(p is None for p in pieces):
            return len(body)
        spelled = b"".join(pieces)
        shift = 0
        if spelled != body and self.sentencepiece and spelled == b" " + body:
            shift = 1  # the space SentencePiece puts before a segment's first word: part of that token's span
        elif spelled != body:
            return len(body)
        position = offset + lead - shift
        for token, piece in zip(tokens, pieces):
            ids.append(int(token))
            starts.append(max(position, offset + lead))
            position += len(piece)
            ends.append(position)
        return 0

    def _window(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, teacher_ends: np.ndarray, unmatched: int) -> AlignedWindow:
        width = self.seq_len + 1
        cut = max(0, len(ids) - width)
        ids, starts, ends = ids[:width], starts[:width], ends[:width]
        n = len(ids)
        teacher_position = np.full(self.seq_len, -1, dtype=np.int64)
        if n > 1:
            # position j predicts token j + 1: comparable where token j ends at a teacher boundary and token j + 1 starts there
            scored_ends = teacher_ends[:-1]  # teacher position i predicts token i + 1: the last token predicts nothing here
            at = np.searchsorted(scored_ends, ends[:-1])
            found = at < len(scored_ends)
            hit = found & (scored_ends[np.minimum(at, len(scored_ends) - 1)] == ends[:-1]) & (starts[1:] == ends[:-1])
            teacher_position[: n - 1] = np.where(hit, at, -1)
        padded = np.full(width, self.pad_id, dtype=np.int64)
        padded[:n] = ids
        return AlignedWindow(padded, n, teacher_position, max(n - 1, 0), int((teacher_position >= 0).sum()), unmatched, cut)
