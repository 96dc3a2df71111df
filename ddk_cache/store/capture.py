"""What a store keeps of the teacher's distribution at each position, and the transform to it.

Four capture modes, all stored the same way (per position, up to `width` sparse entries
sorted by token id, the number of valid entries, padding after them):

- `topk`: the k most likely tokens with their raw log-probs, plus the exact log of the mass
  outside them (`rest`).
- `topp`: adaptive truncation (Peng et al. 2024): the fewest most-likely tokens whose mass
  reaches `top_p`, at most `k` of them; variable entries per position, `rest` as above.
- `sampled`: Sparse Logit Sampling (Anshumann et al. 2025): `draws` tokens drawn with
  replacement from the full teacher distribution; the distinct ids and their counts are kept,
  and counts / draws is an unbiased estimate of the teacher distribution.
- `headtail`: an exact head and a sampled tail. The `k` most likely tokens with their raw
  log-probs (as topk), then `draws` tokens drawn with replacement from the teacher's
  distribution *restricted to the other ids* (the tail), kept as distinct ids with
  log(count / draws) each, plus the exact log tail mass (`rest`). The tail token t's
  probability is estimated as exp(rest) x count_t / draws, so the whole distribution is
  estimated without bias, and the variance sits where the mass is small: the head, which
  holds most of it, is exact. Why: top-k + rest lumps a flat teacher's tail into one bucket,
  and pure sampling spends most of its draws (and its id bytes) re-drawing the head.

Why sorted by id, not by rank (headtail: the head, then the tail, each ascending): sorted ids delta-code to small numbers (ids are the bulk of the
bytes; `benchmarks/RESULTS.md`), and the order of entries means nothing to the losses.
Why an explicit `rest`: log-probs are quantized, so 1 - sum(exp(decoded)) would carry their
rounding into the tail bucket (and go negative when the top token holds almost all the mass).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from ddk_cache.choices import CaptureMode, values
from ddk_cache.engines.base import TopKResult
from ddk_cache.errors import SettingError

MODES = values(CaptureMode)
REST_FLOOR = -69.0  # log(1e-30): "no mass outside the entries" (k = vocabulary, or rounding)
DEFAULT_LOGPROB_SCALE = 32  # quantization levels per nat; see benchmarks/RESULTS.md for the trade-off


@dataclass(frozen=True)
class Capture:
    """The capture settings a store is made with (recorded in its header; part of its identity).

    `k`: entries per position (topk), their maximum (topp), the exact head (headtail), unused by `sampled`.
    `logprob_scale`: stored log-probs are round(lp * scale) / scale; 0 keeps float16 instead.
    `draws`, `seed`: the sample size of the sampled mode (or of headtail's tail) and the seed its draws derive from.
    """

    mode: str = "topk"
    k: int = 64
    top_p: float | None = None
    draws: int | None = None
    logprob_scale: int = DEFAULT_LOGPROB_SCALE
    seed: int = 0

    def __post_init__(self) -> None:
        """Every rule of the capture flags, here rather than in the CLI: library callers get the same checks."""
        if self.mode not in MODES:
            raise SettingError(f"unknown capture mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode != "topp" and self.top_p is not None:
            raise SettingError(f"--top-p belongs to --mode topp, not {self.mode}")
        if not self.drawn and self.draws is not None:
            raise SettingError(f"--draws belongs to --mode sampled or headtail, not {self.mode}")
        if self.drawn and (self.draws is None or not 1 <= self.draws <= 255):
            raise SettingError(f"{self.mode} mode needs --draws between 1 and 255, got {self.draws}")
        if self.mode != "sampled" and self.k <= 0:
            raise SettingError(f"--k must be a positive integer, got {self.k}")
        if self.mode == "topp" and (self.top_p is None or not 0 < self.top_p <= 1):
            raise SettingError(f"topp mode needs --top-p in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise SettingError(f"--seed must be >= 0, got {self.seed}")
        if self.logprob_scale < 0 or self.logprob_scale > 1024:
            raise SettingError(f"--logprob-scale must be 0 (float16) or 1..1024 levels per nat, got {self.logprob_scale}")

    @property
    def drawn(self) -> bool:
        """Whether the engine draws samples (sampled: from the whole distribution; headtail: from the tail). The stored
        entries are then an unbiased *estimate* of the whole distribution, not exact values of part of it: only losses
        linear in the teacher's probabilities stay unbiased (forward KL at T = 1; `training.losses.check_sampled_config`),
        and MiniLLM's reverse KL, which needs them exactly, is refused."""
        return self.mode in ("sampled", "headtail")

    @property
    def width(self) -> int:
        """Entry slots per position in the stored arrays."""
        if self.mode == "sampled":
            return int(self.draws)
        if self.mode == "headtail":
            return self.k + int(self.draws)
        return self.k

    @property
    def engine_k(self) -> int:
        """How many top entries the engine must return (sampled mode only needs the actual token)."""
        return 1 if self.mode == "sampled" else self.k

    def to_attrs(self) -> dict:
        attrs = asdict(self)
        if not self.drawn:
            attrs.pop("draws"), attrs.pop("seed")
        if self.mode != "topp":
            attrs.pop("top_p")
        if self.mode == "sampled":
            attrs.pop("logprob_scale"), attrs.pop("k")
        return attrs

    def describe(self) -> str:
        """One line for people: `topk k=64, log-probs to 1/32 nat`, `sampled n=32 (seed 0)` ..."""
        if self.mode == "sampled":
            return f"sampled n={self.draws} draws (seed {self.seed}): distinct ids + counts"
        values = f"log-probs to 1/{self.logprob_scale} nat" if self.logprob_scale else "float16 log-probs"
        if self.mode == "headtail":
            return f"headtail: top h={self.k} exact + n={self.draws} tail draws (seed {self.seed}), {values}"
        entries = f"k={self.k}" if self.mode == "topk" else f"p={self.top_p}, at most k={self.k}"
        return f"{self.mode} {entries}, {values}"

    def shard_seed(self, domain: str, split: str, shard: int) -> int:
        """Seed of one shard's draws: independent of which process scores it or when (resume)."""
        return int(np.random.SeedSequence([self.seed, zlib.crc32(f"{domain}/{split}".encode()), shard]).generate_state(1)[0])


@dataclass(frozen=True)
class EncodedTargets:
    """Stored form of `B` windows of `L` positions (before the arrays' own codecs)."""

    ids: np.ndarray  # int32 [B, L, width], ascending over the first n_entries, then the last id repeated
    values: np.ndarray  # float32 log-probs (topk, topp; headtail: head log-probs, then tail log(count / draws)) or uint8 counts (sampled), [B, L, width], 0 as padding
    n_entries: np.ndarray  # int32 [B, L]
    rest_logprobs: np.ndarray | None  # float32 [B, L], log of the mass outside the entries (not in sampled mode)
    target_logprobs: np.ndarray  # float32 [B, L]

    def windows(self, rows: slice) -> "EncodedTargets":
        rest = None if self.rest_logprobs is None else self.rest_logprobs[rows]
        return EncodedTargets(self.ids[rows], self.values[rows], self.n_entries[rows], rest, self.target_logprobs[rows])


def encode_targets(result: TopKResult, capture: Capture) -> EncodedTargets:
    """Turn an engine's output (rank-ordered top-K, and draws in sampled / headtail mode) into stored entries."""
    if capture.drawn and result.samples is None:
        raise ValueError(f"{capture.mode} capture needs an engine result with draws")
    if capture.mode == "sampled":
        ids, counts, n_entries = distinct_counts(result.samples)
        return EncodedTargets(ids, counts, n_entries, None, result.target_logprobs.astype(np.float32))
    if capture.mode == "headtail":
        return head_and_tail(result, capture)
    logprobs = result.topk_logprobs[..., : capture.k].astype(np.float32)
    ids = result.topk_ids[..., : capture.k].astype(np.int32)
    if capture.mode == "topp":
        n_entries = top_p_entries(logprobs, capture.top_p)
    else:
        n_entries = np.full(logprobs.shape[:-1], logprobs.shape[-1], dtype=np.int32)
    valid = np.arange(logprobs.shape[-1]) < n_entries[..., None]
    rest = rest_logprobs(np.where(valid, logprobs, -np.inf))
    sorted_ids, sorted_values = sort_entries(ids, logprobs, valid)
    return EncodedTargets(sorted_ids, sorted_values, n_entries, rest, result.target_logprobs.astype(np.float32))


def head_and_tail(result: TopKResult, capture: Capture) -> EncodedTargets:
    """headtail entries: the exact head ascending by id, then the tail's distinct draws ascending by id.

    Values: the head's raw log-probs, then log(count / draws) of each tail id (its share of the tail's
    draws, not its probability: that is exp(rest) x count / draws, see `estimated_logprobs`); `rest` is
    the exact log mass outside the head, which the draws come from. `n_entries` = k + distinct tail ids.
    """
    k = capture.k
    logprobs = result.topk_logprobs[..., :k].astype(np.float32)
    head_ids, head_values = sort_entries(result.topk_ids[..., :k].astype(np.int32), logprobs, np.ones(logprobs.shape, dtype=bool))
    tail_ids, counts, n_tail = distinct_counts(result.samples)
    tail_values = np.where(counts > 0, sampled_logprobs(counts, int(capture.draws)), np.float32(0.0))
    return EncodedTargets(np.concatenate([head_ids, tail_ids], -1), np.concatenate([head_values, tail_values], -1),
                          (n_tail + k).astype(np.int32), rest_logprobs(logprobs), result.target_logprobs.astype(np.float32))


def top_p_entries(rank_logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Entries kept per position: the fewest leading (descending) entries whose mass reaches top_p."""
    mass = np.cumsum(np.exp(rank_logprobs.astype(np.float64)), axis=-1)
    reached = mass >= top_p - 1e-12
    first = np.where(reached.any(-1), reached.argmax(-1) + 1, rank_logprobs.shape[-1])
    return first.astype(np.int32)


def rest_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(logprobs))) per position in float64, floored at REST_FLOOR; -inf entries are ignored."""
    with np.errstate(divide="ignore"):
        mass = np.exp(logprobs.astype(np.float64)).sum(-1)
        rest = np.log1p(-np.minimum(mass, 1.0))
    return np.maximum(rest, REST_FLOOR).astype(np.float32)


def sort_entries(ids: np.ndarray, values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Valid entries ascending by id; padding repeats the last valid id (delta 0) with value 0."""
    big = np.iinfo(np.int64).max
    order = np.argsort(np.where(valid, ids.astype(np.int64), big), axis=-1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, -1)
    sorted_values = np.take_along_axis(values, order, -1)
    n = valid.sum(-1, keepdims=True)
    slot = np.arange(ids.shape[-1])
    last = np.take_along_axis(sorted_ids, np.maximum(n - 1, 0), -1)
    sorted_ids = np.where(slot < n, sorted_ids, last)
    sorted_values = np.where(slot < n, sorted_values, np.zeros_like(sorted_values))
    return sorted_ids.astype(np.int32), sorted_values


def distinct_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ids of each position's draws (ascending), their counts, and how many there are.

    `draws` int `[B, L, n]`; returns ids int32 `[B, L, n]` (padding repeats the last id), counts
    uint8 `[B, L, n]` (padding 0) and n_entries int32 `[B, L]`. Vectorised: one sort, no loops.
    """
    s = np.sort(draws.astype(np.int32), axis=-1)
    n = s.shape[-1]
    new = np.ones(s.shape, dtype=bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    slot = np.cumsum(new, axis=-1) - 1  # which distinct entry each draw belongs to
    n_entries = slot[..., -1] + 1
    flat = s.reshape(-1, n)
    rows = np.repeat(np.arange(flat.shape[0]), n)
    counts = np.zeros_like(flat, dtype=np.int64)
    np.add.at(counts, (rows, slot.reshape(-1)), 1)
    ids = np.zeros_like(flat)
    ids[rows, slot.reshape(-1)] = flat.reshape(-1)
    ids = ids.reshape(s.shape)
    keep = np.arange(n) < n_entries[..., None]
    last = np.take_along_axis(ids, (n_entries - 1)[..., None], -1)
    ids = np.where(keep, ids, last)
    return ids.astype(np.int32), counts.reshape(s.shape).astype(np.uint8), n_entries.astype(np.int32)


def capture_from_attrs(attrs: dict) -> Capture:
    """The Capture a version-2 header describes (keys written by `Capture.to_attrs`)."""
    known = {key: attrs[key] for key in ("mode", "k", "top_p", "draws", "logprob_scale", "seed") if key in attrs}
    if known.get("mode") == "sampled":
        known.setdefault("k", int(known["draws"]))
    return Capture(**known)


def sampled_logprobs(counts: np.ndarray, draws: int) -> np.ndarray:
    """log(count / draws) as float32; padding (count 0) becomes -inf and must be masked by n_entries."""
    with np.errstate(divide="ignore"):
        return (np.log(counts.astype(np.float32)) - np.float32(math.log(draws))).astype(np.float32)


def estimated_logprobs(values: np.ndarray, valid: np.ndarray, rest: np.ndarray, k: int) -> np.ndarray:
    """A headtail store's entries as log-probs of one estimated distribution: the head's as stored, each tail
    id's log(exp(rest) x share), its share of the tail draws renormalised to sum to 1 (the stored log(count /
    draws) are quantized like every log-prob: renormalising keeps the tail's total at exactly exp(rest)).
    Padding is 0 (mask it with `valid`). The head and the tail then sum to 1 up to the head's quantization."""
    tail = np.where(valid[..., k:], values[..., k:].astype(np.float64), -np.inf)
    with np.errstate(invalid="ignore"):
        shares = tail - np.logaddexp.reduce(tail, axis=-1, keepdims=True)
    estimated = np.where(valid[..., k:], rest[..., None].astype(np.float64) + shares, 0.0)
    return np.concatenate([values[..., :k].astype(np.float32), estimated.astype(np.float32)], -1)
