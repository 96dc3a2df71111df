"""The fused sparse loss equals the dense path (logits built, then `distillation_loss`) in value and in gradients with
respect to the hidden states, the head weight and its bias, for every divergence, tail and temperature, with
masks, dropped entries, sampled targets and chunks that do not divide the sizes (issue 26, first part)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ddk_cache.training.fused_loss import fused_distillation_loss, sparse_head
from ddk_cache.training.losses import DIVERGENCES, TAIL_MODES, KDConfig, TeacherTargets, distillation_loss

N, D, V, W = 37, 12, 101, 6  # sizes the chunks (7 ids, 5 tokens) do not divide


def problem(seed: int, sampled: bool = False, with_valid: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.5 * torch.randn(V, D, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    ids = torch.stack([torch.randperm(V + 4, generator=g)[:W] for _ in range(N)]).sort(-1).values  # some ids beyond V: dropped
    logprobs = torch.log_softmax(torch.randn(N, W, generator=g) * 2, -1) - 0.2  # entries short of 1: a rest
    rest = torch.log1p(-logprobs.exp().sum(-1).clamp(max=0.999))
    valid = (torch.rand(N, W, generator=g) > 0.2) if with_valid else None
    if sampled:
        counts = torch.randint(0, 5, (N, W), generator=g).float()
        counts[:, 0] += 1
        logprobs, rest = torch.log(counts / counts.sum(-1, keepdim=True)), None
        valid = counts > 0
    teacher = TeacherTargets(ids, logprobs, valid, rest, sampled)
    mask = (torch.rand(N, generator=g) > 0.3).float()
    return hidden, weight, bias, labels, teacher, mask


def dense_and_fused(config: KDConfig, seed: int, **kinds):
    hidden, weight, bias, labels, teacher, mask = problem(seed, **kinds)
    results = []
    for fused in (False, True):
        for tensor in (hidden, weight, bias):
            tensor.grad = None
        if fused:
            parts = fused_distillation_loss(hidden, weight, labels, teacher, config, bias=bias, mask=mask, vocab_chunk=7, token_chunk=5)
        else:
            parts = distillation_loss(hidden @ weight.t() + bias, labels, teacher, config, mask=mask)
        parts.total.backward()
        results.append((parts, [t.grad.clone() for t in (hidden, weight, bias)]))
    return results


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item())), (a - b).abs().max().item()


CASES = list(itertools.product(DIVERGENCES, TAIL_MODES, (1.0, 2.0)))


@pytest.mark.parametrize(("divergence", "tail", "temperature"), CASES)
def test_fused_equals_dense_for_every_divergence_tail_and_temperature(divergence, tail, temperature):
    config = KDConfig(divergence=divergence, tail=tail, temperature=temperature, gamma=0.7)
    (dense, dense_grads), (fused, fused_grads) = dense_and_fused(config, seed=CASES.index((divergence, tail, temperature)), with_valid=True)
    for name in ("total", "ce", "kd"):
        assert_close(getattr(fused, name), getattr(dense, name))
    for a, b in zip(fused_grads, dense_grads):
        assert_close(a, b)


def test_fused_equals_dense_on_sampled_targets_in_the_mixed_form_and_without_kd():
    for config, kinds in ((KDConfig(), {"sampled": True}), (KDConfig(form="mix", mix=0.5), {}), (KDConfig(gamma=0.0), {})):
        (dense, dense_grads), (fused, fused_grads) = dense_and_fused(config, seed=3, **kinds)
        assert_close(fused.total, dense.total)
        for a, b in zip(fused_grads, dense_grads):
            assert_close(a, b)


def test_the_sparse_head_without_a_bias_and_with_a_tied_head():
    """lse, lse at T and the gathered logits, and their gradient into an embedding matrix the head shares."""
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(V, D, generator=g).requires_grad_()  # tied: the head is the embedding matrix
    tokens, ids = torch.randint(0, V, (N,), generator=g), torch.randint(0, V, (N, W), generator=g)

    def objective(fused: bool) -> torch.Tensor:
        hidden = torch.nn.functional.embedding(tokens, embedding)
        if fused:
            lse, lse_t, at_ids = sparse_head(hidden, embedding, ids, None, 2.0, 13, 5)
        else:
            logits = hidden @ embedding.t()
            lse, lse_t, at_ids = logits.logsumexp(-1), (logits / 2).logsumexp(-1), logits.gather(-1, ids)
        return (lse ** 2).sum() + (lse_t ** 3).sum() + (at_ids ** 2).sum()

    values = []
    for fused in (True, False):
        embedding.grad = None
        value = objective(fused)
        value.backward()
        values.append((value.detach(), embedding.grad.clone()))
    assert_close(values[0][0], values[1][0])
    assert_close(values[0][1], values[1][1])
