"""MiniLLM's loss parts against hand-computed values on a tiny vocabulary (clipping region included)."""

from __future__ import annotations

import math

import pytest
import torch

from ddk_cache.minillm.objective import (
    MiniLLMConfig,
    clipped_policy_loss,
    minillm_loss,
    normalised_returns,
    sequence_reverse_kl,
    token_rewards,
    whiten,
)
from ddk_cache.training.losses import TeacherTargets


def test_rewards_and_length_normalised_returns_by_hand():
    teacher = torch.tensor([[-1.0, -2.0, -0.5, -4.0]])
    behaviour = torch.tensor([[-3.0, -1.0, -1.5, -0.1]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])  # position 0 predicts a prompt token
    rewards = token_rewards(teacher, behaviour, mask)
    assert rewards.tolist() == [[0.0, -1.0, 1.0, pytest.approx(-3.9)]]
    # R_1 = -1 + 1 - 3.9 over 3 tokens, R_2 = 1 - 3.9 over 2, R_3 = -3.9 over 1; the prompt position sums 3 tokens too
    expected = [-3.9 / 3, -3.9 / 3, -2.9 / 2, -3.9]
    assert normalised_returns(rewards, mask)[0].tolist() == pytest.approx(expected)


def test_returns_stop_at_each_sequences_end():
    rewards = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the first response is 2 tokens, the second 1
    assert normalised_returns(rewards, mask).tolist() == [[1.5, 2.0, 0.0], [4.0, 0.0, 0.0]]


def test_whitening_uses_response_tokens_only():
    values = torch.tensor([[100.0, 1.0, 3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert whiten(values, mask)[0].tolist() == pytest.approx([0.0, -1.0, 1.0], abs=1e-6)


def test_clipped_surrogate_value_and_gradient_by_hand():
    behaviour = torch.log(torch.tensor([[0.2, 0.4, 0.5, 0.3]]))
    # ratios 1.5 (A > 0: clipped at 1.2, no gradient), 1.1 (A < 0: inside), 0.5 (A > 0: below the clip, gradient kept),
    # 0.5 with A < 0 (clipped at 0.8, no gradient)
    ratio = torch.tensor([[1.5, 1.1, 0.5, 0.5]])
    logprobs = (behaviour + ratio.log()).clone().requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, held = clipped_policy_loss(logprobs, behaviour, advantages, mask, clip=0.2)
    per_token = [max(-1.5, -1.2), max(1.1, 1.1), max(-0.5, -0.8), max(0.5, 0.8)]
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    loss.backward()
    # d(-A * ratio)/d logprob = -A * ratio where the unclipped branch is taken, 0 where the clipped constant is
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 1.1 / 4, -0.5 / 4, 0.0])
    assert held.item() == pytest.approx(3 / 4)  # 1.5, 0.5, 0.5 lie outside [0.8, 1.2]


def test_masked_tokens_add_nothing_to_the_surrogate():
    behaviour = torch.zeros(1, 3)
    logprobs = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logprobs, behaviour, torch.tensor([[9.0, 1.0, 1.0]]), torch.tensor([[0.0, 1.0, 1.0]]), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and logprobs.grad[0, 0].item() == 0.0


def _targets() -> tuple[TeacherTargets, list[float]]:
    """Teacher entries {0: 0.5, 1: 0.3} and rest 0.2 at one position of a 4-token vocabulary."""
    p = [0.5, 0.3, 0.2]
    targets = TeacherTargets(torch.tensor([[[0, 1]]]), torch.log(torch.tensor([[[0.5, 0.3]]])), rest=torch.log(torch.tensor([[0.2]])))
    return targets, p


def test_single_step_term_is_the_bucketed_reverse_kl_by_hand():
    targets, p = _targets()
    logits = torch.tensor([[[1.0, 0.0, 0.5, -1.0]]])
    q = torch.softmax(logits[0, 0], -1).tolist()
    buckets = [q[0], q[1], q[2] + q[3]]
    expected = sum(qb * (math.log(qb) - math.log(pb)) for qb, pb in zip(buckets, p))
    parts = minillm_loss(logits, torch.tensor([[2]]), targets, torch.log(torch.tensor([[0.2]])), torch.log(torch.tensor([[q[2]]])),
                         torch.ones(1, 1), MiniLLMConfig(whiten=False))
    assert parts.single_step.item() == pytest.approx(expected, rel=1e-5)
    # one token, whitening off: advantage = reward = log p(y) - log q_old(y); ratio 1, so the surrogate is -A
    reward = math.log(0.2) - math.log(q[2])
    assert parts.policy_gradient.item() == pytest.approx(-reward, rel=1e-5)
    assert parts.total.item() == pytest.approx(expected - reward, rel=1e-5)
    assert parts.reward.item() == pytest.approx(reward, rel=1e-5) and parts.reverse_kl.item() == pytest.approx(-reward, rel=1e-5)


def test_the_loss_ignores_prompt_positions_and_can_drop_the_single_step_term():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, requires_grad=True)
    ids = torch.tensor([[[0, 1]] * 3])
    targets = TeacherTargets(ids, torch.log(torch.tensor([[[0.5, 0.3]] * 3])), rest=torch.log(torch.full((1, 3), 0.2)))
    response, teacher_lp, behaviour = torch.tensor([[1, 2, 3]]), torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -1.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    parts = minillm_loss(logits, response, targets, teacher_lp, behaviour, mask)
    parts.total.backward()
    assert logits.grad[0, 0].abs().sum().item() == 0.0 and logits.grad[0, 1:].abs().sum().item() > 0
    alone = minillm_loss(logits, response, targets, teacher_lp, behaviour, mask, MiniLLMConfig(single_step=False))
    assert alone.total.item() == pytest.approx(alone.policy_gradient.item())
    assert parts.reverse_kl.item() == pytest.approx(sequence_reverse_kl(teacher_lp, behaviour, mask).item())
    assert sequence_reverse_kl(teacher_lp, behaviour, mask).item() == pytest.approx(((-1.0 + 2.0) + (-2.0 + 3.0)) / 2)


@pytest.mark.parametrize("clip", [0.0, 1.0, -0.2])
def test_clip_out_of_range_is_refused(clip):
    with pytest.raises(ValueError, match="--ppo-clip must be in"):
        MiniLLMConfig(clip=clip)


def test_teacher_mixed_samples_weigh_by_the_student_over_the_mixture_and_keep_the_students_reward():
    """MiniLLM's code: w = q / mix multiplies the ratio before the clip; the reward stays log p - log q_old."""
    targets, _ = _targets()
    logits = torch.tensor([[[1.0, 0.0, 0.5, -1.0]]], requires_grad=True)
    q = torch.softmax(logits[0, 0].detach(), -1).tolist()
    teacher_lp, behaviour = torch.log(torch.tensor([[0.9]])), torch.log(torch.tensor([[q[2]]]))  # p(y) = 0.9, q(y) = 0.29
    mixture = torch.log(torch.tensor([[0.8 * q[2] + 0.2 * 0.9]]))  # a = 0.2: the mixture's probability of the sampled id 2
    config = MiniLLMConfig(whiten=False, single_step=False, clip=0.2)
    parts = minillm_loss(logits, torch.tensor([[2]]), targets, teacher_lp, behaviour, torch.ones(1, 1), config, sampling_logprobs=mixture)
    reward = math.log(0.9) - math.log(q[2])  # > 0 here: the teacher likes id 2 more than the student does
    weight = q[2] / (0.8 * q[2] + 0.2 * 0.9)
    assert weight < 0.8  # so with A > 0 the unclipped branch is the pessimistic one and carries the gradient
    assert parts.policy_gradient.item() == pytest.approx(-reward * weight, rel=1e-5)
    assert parts.reward.item() == pytest.approx(reward, rel=1e-5) and parts.clipped_fraction.item() == 1.0
    alone = minillm_loss(logits, torch.tensor([[2]]), targets, teacher_lp, behaviour, torch.ones(1, 1), config)
    assert alone.policy_gradient.item() == pytest.approx(-reward, rel=1e-5)  # the student alone: ratio 1


def test_the_single_step_term_can_be_distillms_skew_reverse_kl():
    targets, p = _targets()
    logits = torch.tensor([[[1.0, 0.0, 0.5, -1.0]]])
    q = torch.softmax(logits[0, 0], -1).tolist()
    buckets = [q[0], q[1], q[2] + q[3]]
    alpha = 0.1  # KL(q || (1 - alpha) p + alpha q)
    expected = sum(qb * (math.log(qb) - math.log((1 - alpha) * pb + alpha * qb)) for qb, pb in zip(buckets, p))
    parts = minillm_loss(logits, torch.tensor([[2]]), targets, torch.log(torch.tensor([[0.2]])), torch.log(torch.tensor([[q[2]]])),
                         torch.ones(1, 1), MiniLLMConfig(whiten=False, divergence="skew_reverse_kl", skew_alpha=alpha))
    assert parts.single_step.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(Exception, match="--divergence reverse_kl or skew_reverse_kl"):
        MiniLLMConfig(divergence="forward_kl")
