"""MiniLLM's objective (Gu et al. 2023) on cached teacher targets: reverse KL on the student's own samples.

MiniLLM minimises the sequence-level reverse KL, KL(q_theta || p), for responses y sampled from the
student q given a prompt x. Its gradient (the paper's eq. 5-7, and `minillm/losses.py` in its code)
has three named parts, computed here from what a scored rollout store holds: the sampled tokens y_t,
the student's behaviour log-probs log q_old(y_t) recorded at sampling time, and the teacher's cached
entries (+ rest bucket) and log-prob log p(y_t) of each sampled token.

- **single-step term**: at every response position, the exact reverse KL of the next-token
  distributions, sum_v q(v) (log q(v) - log p(v)). With a cache, p is known on the entries plus one
  rest bucket, so this is `losses.py`'s bucketed reverse KL (tail `rest`): exact over the buckets,
  and the student's mass outside the teacher's entries meets the teacher's rest.
- **long-term term**: a policy gradient with per-token reward r_t = log p(y_t) - log q_old(y_t).
  The return R_t = sum over t' >= t of r_t' (gamma = 1) is divided by the number of tokens it sums
  (length normalisation, so long responses are not favoured), then whitened over the batch's response
  tokens, as MiniLLM's code does.
- **importance sampling with clipping**: one round's rollouts serve several optimizer epochs, so the
  student moves away from the policy that sampled them; each token's term is weighted by
  rho_t = q_theta(y_t) / q_old(y_t), and PPO's clipped surrogate max(-A rho, -A clip(rho, 1 - eps,
  1 + eps)) (eps = 0.2) stops a round from pushing the policy far from where its samples came from.
- **teacher-mixed sampling** (`rollout --teacher T --teacher-mix a`): the paper draws the training responses
  from mix = (1 - a) q_old + a p, so the student sees continuations the teacher would give where its own
  samples wander off. The reward keeps its definition (log p - log q_old), and the importance ratio's
  denominator becomes the mixture: rho_t = q_theta(y_t) / mix(y_t), token by token, clipped as above --
  MiniLLM's code (`minillm/sampler.py`, `losses.py`: `w = q / mix` multiplies the ratio before the clip).
  The store's `sampling_logprobs` hold log mix(y_t); without them the mixture is the student.

A language-modelling loss on a pretraining store is added by the trainer (`pt_weight`), as in the paper.
The single-step term may be DistiLLM's skew reverse KL, KL(q || (1 - alpha) p + alpha q) (`divergence`,
`skew_alpha`): bounded where the teacher puts no mass, a stabiliser of the reverse KL that later work uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddk_cache.choices import SingleStepDivergence, values
from ddk_cache.errors import SettingError
from ddk_cache.lm_head import LMHead
from ddk_cache.training.fused_loss import sparse_head_loss
from ddk_cache.training.losses import KDConfig, TeacherTargets, _entries, _kd_per_position, _safe_ids, kd_loss
from ddk_cache.training.student_outputs import StudentOutputs
from ddk_cache.training.window_loader import Batch

SINGLE_STEP_DIVERGENCES = values(SingleStepDivergence)


@dataclass(frozen=True)
class MiniLLMConfig:
    """`clip`: PPO's epsilon; `whiten`: normalise the advantages over the batch (MiniLLM's default);
    `single_step`: add the single-step term (MiniLLM's default; off leaves the policy gradient alone);
    `divergence`: the single-step term's, reverse KL (MiniLLM) or skew reverse KL with `skew_alpha` (DistiLLM's 0.1)."""

    clip: float = 0.2
    whiten: bool = True
    single_step: bool = True
    divergence: str = "reverse_kl"
    skew_alpha: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.clip < 1:
            raise SettingError(f"--ppo-clip must be in (0, 1), got {self.clip}")
        if self.divergence not in SINGLE_STEP_DIVERGENCES:
            raise SettingError(f"--objective minillm takes --divergence {' or '.join(SINGLE_STEP_DIVERGENCES)} for its single-step "
                               f"term, got {self.divergence!r}")
        if not 0 < self.skew_alpha < 1:
            raise SettingError(f"--skew-alpha must be in (0, 1), got {self.skew_alpha}")

    @property
    def single_step_kd(self) -> KDConfig:
        """The single-step term as a KD divergence: exact over the cached entries and one rest bucket."""
        return KDConfig(divergence=self.divergence, tail="rest", skew_alpha=self.skew_alpha)


@dataclass
class MiniLLMParts:
    """The loss and its named parts; `reward` and `reverse_kl` are detached statistics of the batch."""

    total: torch.Tensor
    policy_gradient: torch.Tensor
    single_step: torch.Tensor
    reward: torch.Tensor  # mean per-token reward log p(y_t) - log q_old(y_t)
    reverse_kl: torch.Tensor  # mean over sequences of the length-normalised sum of log q_old - log p: the sampled estimate
    clipped_fraction: torch.Tensor  # share of response tokens whose ratio left [1 - eps, 1 + eps]
    pretraining: torch.Tensor | None = None  # L_PT, when the trainer adds it (`pretraining_data.py`)


def token_rewards(teacher_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t = log p(y_t) - log q_old(y_t) at response positions, 0 elsewhere; `[B, L]`."""
    return (teacher_logprobs.float() - behaviour_logprobs.float()) * mask


def normalised_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_t / n_t: the sum of rewards from t to the response's end over how many tokens that sum covers.

    Masked positions carry reward 0, so a reverse cumulative sum gives R_t; n_t counts the response
    tokens from t on (at least 1, so prompt and padding positions stay finite: they are masked later).
    """
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    remaining = mask.flip(-1).cumsum(-1).flip(-1).clamp_min(1.0)
    return returns / remaining


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0."""
    count = mask.sum().clamp_min(1.0)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask


def clipped_policy_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, mean over response tokens, and the share of tokens the clip held.

    ratio = exp(log q_theta(y_t) - log q_old(y_t)); per token max(-A ratio, -A clip(ratio)): the
    pessimistic of the two, so the gradient vanishes once the ratio has moved past 1 +- eps in the
    direction the advantage asks for.
    """
    count = mask.sum().clamp_min(1.0)
    per_token, held = _clipped_terms(logprobs, behaviour_logprobs, advantages, mask, clip)
    return per_token.sum() / count, held.sum().detach() / count


def _clipped_terms(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (0 outside the mask): the clipped surrogate, and 1 where the clip held the ratio."""
    ratio = torch.exp((logprobs - behaviour_logprobs.float()) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped) * mask, ((ratio < 1.0 - clip) | (ratio > 1.0 + clip)).float() * mask


def sequence_reverse_kl(teacher_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the mean over its response tokens of log q(y_t) - log p(y_t): a sampled estimate of the
    reverse KL per token (the sequence's log-ratio, length-normalised), `[B]`."""
    per_token = (behaviour_logprobs.float() - teacher_logprobs.float()) * mask
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1.0)


def minillm_loss(
    student_logits: torch.Tensor,
    response_ids: torch.Tensor,
    teacher: TeacherTargets,
    teacher_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    config: MiniLLMConfig = MiniLLMConfig(),
    teacher_vocab: int | None = None,
    sampling_logprobs: torch.Tensor | None = None,
) -> MiniLLMParts:
    """MiniLLM's loss on a batch of scored rollouts. All per-position tensors are `[B, L]` and describe the
    token *after* each input position: `response_ids` the sampled token, `teacher_logprobs` log p of it
    (the store's `target_logprobs`), `behaviour_logprobs` log q_old of it, `mask` 1 where it is a response
    token, `sampling_logprobs` log mix of it where the teacher was mixed into sampling (None: the student
    sampled alone). `student_logits` `[B, L, V]`, `teacher` the cached entries `[B, L, W]`."""
    mask = mask.float()
    logprobs = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, response_ids.long().unsqueeze(-1)).squeeze(-1)
    advantages = _advantages(teacher_logprobs, behaviour_logprobs, mask, config)
    sampled_from = behaviour_logprobs if sampling_logprobs is None else sampling_logprobs
    policy_gradient, held = clipped_policy_loss(logprobs, sampled_from, advantages, mask, config.clip)
    single_step = kd_loss(student_logits, teacher, divergence=config.divergence, tail="rest", skew_alpha=config.skew_alpha, mask=mask,
                          teacher_vocab=teacher_vocab)
    total = policy_gradient + single_step if config.single_step else policy_gradient
    return MiniLLMParts(total, policy_gradient, single_step, *_statistics(teacher_logprobs, behaviour_logprobs, mask), held)


def fused_minillm_loss(
    hidden: torch.Tensor,
    head: LMHead,
    response_ids: torch.Tensor,
    teacher: TeacherTargets,
    teacher_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    mask: torch.Tensor,
    config: MiniLLMConfig = MiniLLMConfig(),
    teacher_vocab: int | None = None,
    rows: int | None = None,
    sampling_logprobs: torch.Tensor | None = None,
) -> MiniLLMParts:
    """`minillm_loss` from the final hidden states `[B, L, d]` and the head, a token chunk at a time (`fused_loss.py`):
    both terms need of the head only the log-sum-exp and the logits at the sampled token and the cached entries."""
    mask = mask.float()
    flat_mask = mask.reshape(-1)
    advantages = _advantages(teacher_logprobs, behaviour_logprobs, mask, config).reshape(-1)
    sampled_from = (behaviour_logprobs if sampling_logprobs is None else sampling_logprobs).reshape(-1)
    count = flat_mask.sum().clamp_min(1.0)
    entries = teacher.flat()
    ids, valid = _entries(entries, head.vocab)
    reverse = config.single_step_kd

    def rows_loss(lse, _lse_t, at, piece):
        m = flat_mask[piece]
        per_token, held = _clipped_terms(at[:, 0] - lse, sampled_from[piece], advantages[piece], m, config.clip)
        single = _kd_per_position(at[:, 1:] - lse[:, None], entries.rows(piece), valid[piece], reverse, head.vocab, teacher_vocab) * m
        pg_sum, single_sum = per_token.sum() / count, single.sum() / count
        return pg_sum + single_sum if config.single_step else pg_sum, torch.stack([pg_sum, single_sum, held.sum() / count])

    gathered = torch.cat([response_ids.reshape(-1, 1).long(), _safe_ids(ids, valid)], dim=-1)
    total, stats = sparse_head_loss(hidden.reshape(-1, hidden.shape[-1]), head, gathered, rows_loss, 1.0, rows)
    return MiniLLMParts(total, stats[0], stats[1], *_statistics(teacher_logprobs, behaviour_logprobs, mask), stats[2])


def _advantages(teacher_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, config: MiniLLMConfig) -> torch.Tensor:
    """The length-normalised returns of the per-token rewards, whitened over the batch: no gradient, from the store alone."""
    with torch.no_grad():
        advantages = normalised_returns(token_rewards(teacher_logprobs, behaviour_logprobs, mask), mask)
        return whiten(advantages, mask) if config.whiten else advantages


def _statistics(teacher_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(reward, reverse_kl)` of the batch, as `MiniLLMParts` logs them."""
    with torch.no_grad():
        reward = token_rewards(teacher_logprobs, behaviour_logprobs, mask).sum() / mask.sum().clamp_min(1.0)
        has_response = mask.sum(-1) > 0
        return reward, sequence_reverse_kl(teacher_logprobs, behaviour_logprobs, mask)[has_response].mean()


@dataclass(frozen=True)
class MiniLLMObjective:
    """MiniLLM's update as a training objective (the protocol of `training/objectives.py`): a batch of the
    student's scored samples in, the policy gradient + single-step reverse KL out, with its statistics logged."""

    config: MiniLLMConfig
    teacher_vocab: int

    def loss(self, outputs: StudentOutputs, batch: Batch) -> MiniLLMParts:
        rollout = batch.rollout
        if outputs.fused:
            return fused_minillm_loss(outputs.hidden, outputs.head, batch.targets, batch.teacher, rollout.teacher_logprobs,
                                      rollout.behaviour_logprobs, rollout.response_mask, self.config, teacher_vocab=self.teacher_vocab,
                                      sampling_logprobs=rollout.sampling_logprobs)
        return minillm_loss(outputs.logits, batch.targets, batch.teacher, rollout.teacher_logprobs, rollout.behaviour_logprobs,
                            rollout.response_mask, self.config, teacher_vocab=self.teacher_vocab, sampling_logprobs=rollout.sampling_logprobs)

    def log_parts(self, parts: MiniLLMParts) -> dict[str, float]:
        return {"loss": float(parts.total.detach()), "policy_gradient": float(parts.policy_gradient.detach()),
                "single_step": float(parts.single_step.detach()), "reward": float(parts.reward), "reverse_kl": float(parts.reverse_kl),
                "clipped_fraction": float(parts.clipped_fraction),
                **({"pretraining_lm": float(parts.pretraining.detach())} if parts.pretraining is not None else {})}
