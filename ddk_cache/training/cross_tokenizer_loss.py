"""KD from a cached teacher distribution into a student whose tokenizer differs, at aligned positions.

At an aligned position (`token_alignment.py`) the teacher's cached entries and the student's distribution
both speak of the text that comes next, over two vocabularies. Two ways to compare them, as in the
literature the issue names:

- `gold` (TRL's GOLD): the *exact part*. Teacher entries whose bytes are one student token (`vocab_map.py`)
  are the same events on both sides: compare p with q on them, and put everything else in one bucket per side
  (the teacher's mass outside those entries, the student's outside those ids). That is the project's `rest`
  tail: the buckets make both sides proper distributions over the same outcomes, so the forward KL is a
  divergence (zero only when they agree), not a renormalised guess. What the teacher spreads over tokens the
  student spells in pieces is compared by ULD's sorted probabilities, weighted by `uld_weight`: the teacher's
  unmapped entries against the student's largest probabilities outside the mapped ids.
- `uld` (Boizard et al. 2024, Universal Logit Distillation): only the sorted probabilities, the teacher's
  entries against the student's top probabilities, L1 (the closed form of their Wasserstein distance). It
  needs no vocabulary map; it transfers the *shape* of the distribution, not which token.

Both work on the cached entries as they are (top-k, top-p, or the estimated ones of sampled and headtail
captures): p is exp(logprob) where an entry is valid, and the teacher's mass outside them is 1 - sum p.
Temperature is 1 (the cache's); positions arrive gathered, so memory is `aligned positions x student vocab`
for the student's log-softmax, which small-vocabulary students afford (the fused path is same-tokenizer only).
"""

from __future__ import annotations

import torch

EPS = 1e-12


def _first_occurrence(ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`keep` where an id is not repeated earlier in its row (two teacher markers mapped to one student id count once)."""
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & keep.unsqueeze(-2)
    earlier = torch.tril(same, diagonal=-1).any(-1)
    return keep & ~earlier


def gold_exact_kl(student_logprobs: torch.Tensor, student_ids: torch.Tensor, teacher_probs: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """Forward KL over the mapped entries plus one rest bucket per side; `[N]`.

    `student_logprobs` `[N, V]`; `student_ids` `[N, W]` (the mapped student id of each teacher entry); `teacher_probs`
    `[N, W]` (0 where invalid); `mapped` `[N, W]` bool.
    """
    mapped = _first_occurrence(student_ids, mapped)
    p = teacher_probs * mapped
    log_q = student_logprobs.gather(-1, student_ids.clamp(min=0))
    q = log_q.exp() * mapped
    p_rest = (1 - p.sum(-1)).clamp(min=EPS)
    log_q_rest = torch.log((1 - q.sum(-1)).clamp(min=EPS))
    entries = torch.where(mapped, p * (torch.log(p.clamp(min=EPS)) - log_q), torch.zeros_like(p)).sum(-1)
    return entries + p_rest * (torch.log(p_rest) - log_q_rest)


def sorted_l1(student_logprobs: torch.Tensor, teacher_probs: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """ULD's term: L1 between the teacher's probabilities sorted and the student's largest ones sorted; `[N]`.

    `exclude` `[N, V]` bool: student ids left out (GOLD's mapped ones, compared exactly instead).
    """
    width = teacher_probs.shape[-1]
    q = student_logprobs.exp()
    if exclude is not None:
        q = q.masked_fill(exclude, 0.0)
    top_q = q.topk(min(width, q.shape[-1]), dim=-1).values
    top_p = teacher_probs.sort(dim=-1, descending=True).values[..., : top_q.shape[-1]]
    return (top_p - top_q).abs().sum(-1)


def cross_tokenizer_kd(student_logits: torch.Tensor, student_ids: torch.Tensor, teacher_logprobs: torch.Tensor, valid: torch.Tensor,
                       method: str = "gold", uld_weight: float = 1.0) -> torch.Tensor:
    """The KD term per aligned position, `[N]`: `gold` (exact part + `uld_weight` x ULD of the rest) or `uld`.

    `student_logits` `[N, V]` at the aligned positions; `student_ids` `[N, W]` the teacher entries' student ids (-1:
    none); `teacher_logprobs` `[N, W]`; `valid` `[N, W]` the entries that exist.
    """
    student_logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_probs = torch.where(valid, teacher_logprobs.float().exp(), torch.zeros_like(teacher_logprobs, dtype=torch.float32))
    if method == "uld":
        return sorted_l1(student_logprobs, teacher_probs)
    if method != "gold":
        raise ValueError(f"unknown cross-tokenizer method {method!r}")
    mapped = valid & (student_ids >= 0)
    exact = gold_exact_kl(student_logprobs, student_ids, teacher_probs, mapped)
    if uld_weight == 0:
        return exact
    excluded = torch.zeros_like(student_logprobs).scatter_add(-1, student_ids.clamp(min=0), mapped.float()) > 0
    rest = sorted_l1(student_logprobs, teacher_probs * ~mapped, exclude=excluded)
    return exact + uld_weight * rest
