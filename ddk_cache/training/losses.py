"""Distillation losses on sparse teacher targets (top-k, top-p or sampled entries).

The cache holds, per position, a few teacher entries: ids with raw log-probs (top-k, top-p),
or ids with sample counts whose log(count / draws) estimates the teacher distribution
(sampled). A divergence is computed over "buckets": the cached ids, plus optionally one
"rest" bucket holding the probability mass outside them on each side. Two tail modes:

- `rest` (default): teacher rest = the stored mass outside the entries (version 2 stores; the
  entries and rest are renormalised together, which removes the log-prob quantization's
  drift), or 1 - sum(entry probs) (version 1 stores); student rest = 1 - sum of its probs on
  the same ids. A student that puts mass outside the teacher's entries is penalised, and at
  k = vocab every divergence equals its dense full-vocabulary value. Sampled targets have
  no teacher rest: forward KL against counts / draws then has the same expected gradient as
  forward KL against the full teacher distribution (the estimate is unbiased and the loss
  is linear in it); other divergences, renorm and T != 1 are not linear in it and are refused.
  Headtail targets (an exact head, and the tail's exact mass shared out by draws) are read as
  the same kind of estimate (`store.capture.estimated_logprobs`) and take the same rules: only
  the tail is estimated, so the gradient's variance is the tail's alone.
- `renorm`: both distributions are renormalised over the teacher's top-k ids (what many
  offline-KD tools do). Biased when the top-k misses mass, but insensitive to the tail.

Temperature T re-tempers both sides: the student as softmax(z / T), the teacher from its
stored log-probs as softmax(lp / T) over the top-k. In `rest` mode with T != 1 the tail's
shape is unknown; it is treated as spread evenly over the vocabulary's remaining ids (exact
at T = 1, the DDK default).

Memory: no `[positions, vocab]` tensor is built for the teacher; the student's log-probs are
gathered at the k ids. Beyond the student's own logits and their log_softmax (which CE needs
anyway), memory is `positions x k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ddk_cache.choices import Divergence as DivergenceChoice
from ddk_cache.choices import Tail, values
from ddk_cache.errors import SettingError
from ddk_cache.ranges import FRACTION, NON_NEGATIVE, Range, check_ranges

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]
TailMode = Literal["rest", "renorm"]
DIVERGENCES: tuple[str, ...] = values(DivergenceChoice)
TAIL_MODES: tuple[str, ...] = values(Tail)
_MIN_MASS = 1e-12  # floor of a rest bucket, so log() and its gradient stay finite
_ABSENT = -1e4  # log-prob of a dropped entry: exp() is exactly 0 in float32, yet gradients stay finite


@dataclass
class TeacherTargets:
    """The teacher's sparse distribution per position, as the losses take it.

    `ids` / `logprobs` `[..., W]`; `valid` `[..., W]` marks real entries (None: all are);
    `rest` `[...]`: log of the teacher mass outside the entries (None: 1 - sum(exp(logprobs))).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    valid: torch.Tensor | None = None
    rest: torch.Tensor | None = None
    sampled: bool = False  # entries are log(count / draws) of teacher samples (see check_sampled_config)

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> "TeacherTargets":
        """The targets in a batch of `cache_datasets.collate` (keys `teacher_ids`, `teacher_logprobs`, ...)."""
        missing = [key for key in ("teacher_ids", "teacher_logprobs") if key not in batch]
        if missing:
            raise KeyError(f"the batch lacks {', '.join(missing)}: build it with ddk_cache.collate from a ddk_cache dataset")
        return cls(batch["teacher_ids"], batch["teacher_logprobs"], batch.get("teacher_valid"), batch.get("teacher_rest"),
                   bool(torch.as_tensor(batch.get("teacher_sampled", False)).any()))  # a bool, or per-window flags

    def flat(self) -> "TeacherTargets":
        """The same targets with the positions flattened: entries `[N, W]`, rest `[N]` (what `rows` slices)."""
        k = self.ids.shape[-1]
        return TeacherTargets(self.ids.reshape(-1, k), self.logprobs.reshape(-1, k), None if self.valid is None else self.valid.reshape(-1, k),
                              None if self.rest is None else self.rest.reshape(-1), self.sampled)

    def rows(self, piece: slice) -> "TeacherTargets":
        """Positions `piece` of flat targets (a token chunk of the fused losses)."""
        return TeacherTargets(self.ids[piece], self.logprobs[piece], None if self.valid is None else self.valid[piece],
                              None if self.rest is None else self.rest[piece], self.sampled)


SAMPLED_DIVERGENCES = ("forward_kl",)


def check_sampled_config(config: "KDConfig") -> None:
    """Refuse the settings whose loss is not unbiased on sampled or headtail targets (see the module docstring)."""
    if config.divergence not in SAMPLED_DIVERGENCES:
        raise SettingError(f"sampled targets (sampled, headtail) are unbiased only with --divergence forward_kl, not {config.divergence}")
    if config.tail != "rest":
        raise SettingError("sampled targets (sampled, headtail) estimate the whole distribution, there is no tail to renormalise: use --tail rest")
    if config.temperature != 1.0:
        raise SettingError("sampled targets (sampled, headtail) are draws at temperature 1: use --temperature 1")


@dataclass(frozen=True)
class KDConfig:
    """How the distillation term is built and mixed with cross-entropy.

    `form="add"`: loss = CE + gamma * KD (DDK: gamma = 0.2, T = 1).
    `form="mix"`: loss = (1 - mix) * CE + mix * KD (MiniLLM's word-level KD baseline: mix = 0.5).
    Field names are the CLI's flag names (`--mix`, `--jsd-beta`, `--skew-alpha`).
    """

    divergence: Divergence = "forward_kl"
    tail: TailMode = "rest"
    temperature: float = 1.0
    gamma: float = 0.2
    form: Literal["add", "mix"] = "add"
    mix: float = 0.5
    jsd_beta: float = 0.5  # JSD mixing weight
    skew_alpha: float = 0.1  # skew KL weight (DistiLLM)

    @classmethod
    def from_flags(cls, divergence: str, tail: str, temperature: float, gamma: float, mix: float | None, jsd_beta: float,
                   skew_alpha: float) -> "KDConfig":
        """`distill`'s flags: `--mix` given selects the mixed form (1 - mix) * CE + mix * KD, else CE + gamma * KD."""
        return cls(divergence=divergence, tail=tail, temperature=temperature, gamma=gamma, form="mix" if mix is not None else "add",
                   mix=mix if mix is not None else 0.5, jsd_beta=jsd_beta, skew_alpha=skew_alpha)

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise SettingError(f"unknown divergence {self.divergence!r}: choose one of {', '.join(DIVERGENCES)}")
        if self.tail not in TAIL_MODES:
            raise SettingError(f"unknown tail mode {self.tail!r}: choose one of {', '.join(TAIL_MODES)}")
        # CE's weight is 1 - mix and KD's gamma or mix: outside these ranges a term trains backwards
        check_ranges({"temperature": self.temperature, "gamma": self.gamma, "mix": self.mix, "jsd_beta": self.jsd_beta, "skew_alpha": self.skew_alpha},
                     {"temperature": Range(0, 100, open_low=True), "gamma": NON_NEGATIVE, "mix": FRACTION,
                      "jsd_beta": Range(0, 1, open_low=True, open_high=True), "skew_alpha": Range(0, 1, open_high=True)})


def bucket_logprobs(
    student_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail: TailMode = "rest",
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
    teacher_vocab: int | None = None,
    rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the k cached ids (+ rest bucket), shape `[N, k(+1)]`.

    The training path does not call it (the losses gather from logits they already hold); it is the loss's
    bucketing written out on log-probs, which the tests check the losses and the capture against.

    `student_logprobs` `[N, V_s]` is log_softmax(student_logits / temperature); `topk_ids` /
    `topk_logprobs` `[N, k]`; `valid` `[N, k]` marks entries to keep (ids the student
    vocabulary lacks are dropped, so their teacher mass lands in the rest bucket).
    `teacher_vocab` (default: the student's) sizes the tail for re-tempering the rest bucket.
    `rest` `[N]`: the stored log of the teacher mass outside the entries, if the store has it.
    """
    if valid is None:
        valid = torch.ones_like(topk_ids, dtype=torch.bool)
    s_top = student_logprobs.gather(-1, _safe_ids(topk_ids, valid))
    return _buckets(s_top, topk_logprobs, valid, tail, temperature, student_logprobs.shape[-1], teacher_vocab, rest)


def _safe_ids(topk_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ids usable as gather indices: dropped entries point at id 0 (and are masked afterwards)."""
    return torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()


def _buckets(
    s_top: torch.Tensor,
    topk_logprobs: torch.Tensor,
    valid: torch.Tensor,
    tail: TailMode,
    temperature: float,
    student_vocab: int,
    teacher_vocab: int | None,
    rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket log-probs from the student's log-probs already gathered at the entry ids."""
    absent = torch.tensor(_ABSENT, device=s_top.device)
    s_top = torch.where(valid, s_top, absent)
    t_raw = torch.where(valid, topk_logprobs.float(), absent)
    if tail == "renorm":
        return torch.log_softmax(t_raw / temperature, dim=-1), torch.log_softmax(s_top, dim=-1)
    t_top, t_rest = _teacher_with_rest(t_raw, valid, temperature, teacher_vocab or student_vocab, rest)
    if student_vocab <= s_top.shape[-1]:  # every student id is cached: no student rest
        s_rest = torch.full_like(s_top[..., :1], _ABSENT)
    else:
        s_rest = _log_rest(s_top)
    return torch.cat([t_top, t_rest], dim=-1), torch.cat([s_top, s_rest], dim=-1)


def _teacher_with_rest(
    t_raw: torch.Tensor, valid: torch.Tensor, temperature: float, vocab: int, stored_rest: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher entry and rest log-probs at `temperature` (rest spread evenly over the tail ids).

    With a stored rest, entries and rest are renormalised together (quantized log-probs do not
    sum exactly); without one the rest is 1 - sum(entries), as version 1 stores define it.
    """
    k = t_raw.shape[-1]
    if k >= vocab:  # the whole vocabulary is cached: any rest is rounding error, not mass
        top = t_raw if temperature == 1.0 else torch.log_softmax(t_raw / temperature, dim=-1)
        return top, torch.full_like(t_raw[..., :1], math.log(_MIN_MASS))
    if stored_rest is None:
        rest = _log_rest(t_raw)
        if temperature == 1.0:
            return t_raw, rest
    else:
        rest = stored_rest.float().reshape(*t_raw.shape[:-1], 1)
    if temperature != 1.0:
        # each tail id holds rest / tail_ids; tempering raises it to 1/T, the bucket sums tail_ids of them
        log_tail_ids = torch.log((vocab - valid.sum(-1, keepdim=True)).clamp(min=1).float())
        tempered = (rest - log_tail_ids) / temperature + log_tail_ids
        rest = torch.where(rest <= math.log(_MIN_MASS), torch.full_like(rest, _ABSENT), tempered)
    joint = torch.cat([t_raw / temperature, rest], dim=-1)
    joint = joint - torch.logsumexp(joint, dim=-1, keepdim=True)
    return joint[..., :k], joint[..., k:]


def _log_rest(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top))) as `[N, 1]`, floored so an exhausted tail stays finite."""
    mass = torch.exp(torch.logsumexp(top_logprobs, dim=-1, keepdim=True))
    return torch.log((1.0 - mass).clamp(min=_MIN_MASS))


def divergence(teacher_lp: torch.Tensor, student_lp: torch.Tensor, kind: Divergence, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-position divergence `[N]` between bucket distributions given as log-probs."""
    p, q = teacher_lp.exp(), student_lp.exp()
    if kind == "forward_kl":
        return _kl(p, teacher_lp, student_lp)
    if kind == "reverse_kl":
        return _kl(q, student_lp, teacher_lp)
    if kind == "jsd":
        m_lp = _log_mix(teacher_lp, student_lp, beta)
        return beta * _kl(p, teacher_lp, m_lp) + (1 - beta) * _kl(q, student_lp, m_lp)
    if kind == "skew_forward_kl":
        return _kl(p, teacher_lp, _log_mix(teacher_lp, student_lp, alpha))
    if kind == "skew_reverse_kl":
        return _kl(q, student_lp, _log_mix(teacher_lp, student_lp, 1 - alpha))
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p (log p - log q), with 0 * log 0 = 0 (empty buckets contribute nothing)."""
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) computed in log space."""
    stacked = torch.stack([log_a + math.log(max(weight_a, 1e-30)), log_b + math.log(max(1 - weight_a, 1e-30))])
    return torch.logsumexp(stacked, dim=0)


@dataclass
class LossParts:
    """The scalar training loss and its parts (detached copies are what gets logged)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor | None


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherTargets | None,
    config: KDConfig,
    teacher_vocab: int | None = None,
    mask: torch.Tensor | None = None,
) -> LossParts:
    """CE on the true next token plus the KD term on the cached entries, mixed as `config.form` says.

    Shapes: logits `[..., V]`, targets `[...]`, entries `[..., W]`. With `teacher=None` (or
    gamma = 0 in the "add" form) the KD term is skipped: plain language-model training.
    `mask` `[...]` (1 = counts): both terms are means over the masked positions only (a store of
    prompts and reference answers trains on the answers). The dense reference: it holds `[N, V]`
    logits; `fused_loss.fused_distillation_loss` computes the same from the hidden states.
    """
    vocab = student_logits.shape[-1]
    kd_weight = config.gamma if config.form == "add" else config.mix
    weights = None if mask is None else mask.reshape(-1).float()
    ce, kd = distillation_parts(student_logits.reshape(-1, vocab), targets.reshape(-1), None if kd_weight == 0 else teacher, config, teacher_vocab)
    if kd is None:
        ce = _mean(ce, weights)
        return LossParts(total=ce, ce=ce, kd=None)
    return _combine(_mean(ce, weights), _mean(kd, weights), config)


def distillation_parts(
    logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets | None, config: KDConfig, teacher_vocab: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per position `[N]`: CE on the next token and the KD divergence on the cached entries (None without a teacher).

    `logits` `[N, V]`, `targets` `[N]`, the teacher's entries `[N, W]`. The one place both loss paths compute
    the terms: the dense one on all positions, the fused one a token chunk at a time. One log_softmax serves
    both terms at T = 1, and one gather (a single sparse gradient instead of two dense ones).
    """
    vocab = logits.shape[-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    column = targets.reshape(-1, 1).long()
    if teacher is None:
        return -logprobs.gather(-1, column)[:, 0], None
    ids, valid = _entries(teacher, vocab)
    if config.temperature == 1.0:
        gathered = logprobs.gather(-1, torch.cat([column, _safe_ids(ids, valid)], dim=-1))
        ce, s_top = -gathered[:, 0], gathered[:, 1:]
    else:
        ce = -logprobs.gather(-1, column)[:, 0]
        s_top = torch.log_softmax(logits.float() / config.temperature, dim=-1).gather(-1, _safe_ids(ids, valid))
    return ce, _kd_per_position(s_top, teacher, valid, config, vocab, teacher_vocab)


def _mean(per_position: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean over positions, or over the masked ones (`weights` 1 = counts)."""
    if weights is None:
        return per_position.mean()
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def _entries(teacher: TeacherTargets, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached ids flattened to `[positions, W]`, and which of them are real entries the student can score."""
    k = teacher.ids.shape[-1]
    ids = teacher.ids.reshape(-1, k)
    valid = ids < vocab
    if teacher.valid is not None:
        valid = valid & teacher.valid.reshape(-1, k)
    return ids, valid


def _kd_per_position(s_top: torch.Tensor, teacher: TeacherTargets, valid: torch.Tensor, config: KDConfig, vocab: int,
                     teacher_vocab: int | None) -> torch.Tensor:
    """The divergence at each position, from the student's log-probs already gathered at the entry ids."""
    rest = None if teacher.rest is None else teacher.rest.reshape(-1)
    teacher_lp, student_lp = _buckets(
        s_top, teacher.logprobs.reshape(-1, valid.shape[-1]), valid, config.tail, config.temperature, vocab, teacher_vocab, rest
    )
    return divergence(teacher_lp, student_lp, config.divergence, beta=config.jsd_beta, alpha=config.skew_alpha)


def dense_distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, config: KDConfig) -> LossParts:
    """CE plus KD against the teacher's *full* distribution, from live teacher logits.

    The reference that the cache approximates (dense online KD): no top-k, no tail model,
    both sides tempered by `config.temperature`. It needs `[positions, vocab]` for the teacher
    as well, which is exactly the memory and the teacher GPU time the cache saves. A student
    vocabulary padded beyond the teacher's gets teacher probability 0 on the extra ids.
    """
    vocab = student_logits.shape[-1]
    ce, kd = dense_parts(student_logits.reshape(-1, vocab), targets.reshape(-1), teacher_logits.reshape(-1, teacher_logits.shape[-1]), config)
    return _combine(ce.mean(), kd.mean(), config)


def dense_parts(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, config: KDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position `[N]`: CE and the divergence from the teacher's full distribution (`[N, V]` logits on both sides)."""
    vocab, teacher_vocab = logits.shape[-1], teacher_logits.shape[-1]
    if teacher_vocab > vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocab}) is larger than the student's ({vocab})")
    flat = logits.float()
    logprobs = torch.log_softmax(flat, dim=-1)
    ce = -logprobs.gather(-1, targets.reshape(-1, 1).long())[:, 0]
    t_logits = teacher_logits.float()
    if teacher_vocab < vocab:
        t_logits = F.pad(t_logits, (0, vocab - teacher_vocab), value=_ABSENT)
    t = config.temperature
    teacher_lp = torch.log_softmax(t_logits / t, dim=-1)
    student_lp = logprobs if t == 1.0 else torch.log_softmax(flat / t, dim=-1)
    return ce, divergence(teacher_lp, student_lp, config.divergence, beta=config.jsd_beta, alpha=config.skew_alpha)


def kd_loss(
    student_logits: torch.Tensor,
    targets: TeacherTargets | Mapping[str, Any],
    divergence: Divergence = "forward_kl",
    tail: TailMode = "rest",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    teacher_vocab: int | None = None,
) -> torch.Tensor:
    """The KD term alone, for your own trainer: mean over positions of the divergence on the cached entries.

    `student_logits` `[..., V]` and the teacher's entries `[..., W]` (a `TeacherTargets`, or a
    batch from `ddk_cache.collate`, whose `teacher_*` keys are used) describe the same positions:
    the distribution of the token after each input position. `mask` `[...]` (1 = counts) averages
    over the masked positions only. Mix it with CE yourself (DDK: CE + 0.2 * KD). Sampled targets
    take forward KL, the `rest` tail and T = 1 only (otherwise biased: ValueError). The same
    computation as `distillation_loss`'s KD term (`_entries`, `_kd_per_position`).
    """
    config = KDConfig(divergence=divergence, tail=tail, temperature=temperature, jsd_beta=jsd_beta, skew_alpha=skew_alpha)  # validates
    teacher = targets if isinstance(targets, TeacherTargets) else TeacherTargets.from_batch(targets)
    if teacher.sampled:
        check_sampled_config(config)
    vocab = student_logits.shape[-1]
    if student_logits.shape[:-1] != teacher.ids.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher entries {tuple(teacher.ids.shape)} "
                         "cover different positions: pass the logits of the batch's input_ids")
    ids, valid = _entries(teacher, vocab)
    flat = student_logits.reshape(-1, vocab).float()
    s_top = torch.log_softmax(flat if temperature == 1.0 else flat / temperature, dim=-1).gather(-1, _safe_ids(ids, valid))
    per_position = _kd_per_position(s_top, teacher, valid, config, vocab, teacher_vocab)
    return _mean(per_position, None if mask is None else mask.reshape(-1).to(per_position.dtype))


def _combine(ce: torch.Tensor, kd: torch.Tensor, config: KDConfig) -> LossParts:
    total = ce + config.gamma * kd if config.form == "add" else (1 - config.mix) * ce + config.mix * kd
    return LossParts(total=total, ce=ce, kd=kd)
