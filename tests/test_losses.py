"""Sparse top-k divergences against dense full-vocabulary references, and the training loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddk_cache.training.losses import (
    DIVERGENCES,
    KDConfig,
    TeacherTargets,
    bucket_logprobs,
    check_sampled_config,
    dense_distillation_loss,
    distillation_loss,
    divergence,
)

V, N = 50, 12
BETA, ALPHA = 0.3, 0.1


def dense_reference(p: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """The textbook full-vocabulary definitions, written independently of the sparse code."""

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * kl(p, m) + (1 - BETA) * kl(q, m)
    if kind == "skew_forward_kl":
        return kl(p, ALPHA * p + (1 - ALPHA) * q)
    if kind == "skew_reverse_kl":
        return kl(q, (1 - ALPHA) * p + ALPHA * q)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(N, V, generator=generator, dtype=torch.float64).float() * 2
    student = torch.randn(N, V, generator=generator).requires_grad_(True)
    return teacher, student


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", ["rest", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_divergence_equals_dense_at_k_equal_vocab(logits, kind, tail, temperature):
    teacher_logits, student_logits = logits
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    top = teacher_lp.topk(V, dim=-1)  # k = vocabulary: the cache holds everything
    t_lp, s_lp = bucket_logprobs(torch.log_softmax(student_logits / temperature, -1), top.indices, top.values, tail, temperature)
    sparse = divergence(t_lp, s_lp, kind, beta=BETA, alpha=ALPHA)
    p = torch.softmax(teacher_logits / temperature, -1)
    q = torch.softmax(student_logits / temperature, -1)
    torch.testing.assert_close(sparse, dense_reference(p, q, kind), atol=2e-5, rtol=1e-4)
    sparse.sum().backward()
    assert torch.isfinite(student_logits.grad).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_rest_bucket_matches_dense_on_collapsed_tail(logits, kind):
    """With k < V, the rest mode equals the dense divergence between the (k+1)-bucket distributions."""
    teacher_logits, student_logits = logits
    k = 8
    p, q = torch.softmax(teacher_logits, -1), torch.softmax(student_logits, -1)
    top = p.topk(k, dim=-1)
    p_b = torch.cat([top.values, 1 - top.values.sum(-1, keepdim=True)], -1)
    q_top = q.gather(-1, top.indices)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    t_lp, s_lp = bucket_logprobs(torch.log_softmax(student_logits, -1), top.indices, top.values.log(), "rest")
    torch.testing.assert_close(divergence(t_lp, s_lp, kind, beta=BETA, alpha=ALPHA), dense_reference(p_b, q_b, kind), atol=2e-5, rtol=1e-4)


def test_padded_student_vocabulary_is_handled(logits):
    """A student with extra (padding) ids: teacher mass there is zero; the student's counts in the rest."""
    teacher_logits, _ = logits
    student_logits = torch.randn(N, V + 14, requires_grad=True)
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    top = teacher_lp.topk(V, dim=-1)
    t_lp, s_lp = bucket_logprobs(torch.log_softmax(student_logits, -1), top.indices, top.values, "rest")
    p = torch.cat([teacher_lp.exp(), torch.zeros(N, 14)], -1)
    q = torch.softmax(student_logits, -1)
    dense = (p * (torch.where(p > 0, p.log(), torch.zeros_like(p)) - q.log())).sum(-1)
    torch.testing.assert_close(divergence(t_lp, s_lp, "forward_kl"), dense, atol=2e-5, rtol=1e-4)


def test_ids_beyond_the_student_vocabulary_are_dropped_with_finite_gradients():
    student_logits = torch.randn(4, 10, requires_grad=True)
    ids = torch.tensor([[0, 3, 12, 15]] * 4)  # 12 and 15 do not exist in the student
    teacher_lp = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.05]] * 4))
    config = KDConfig(divergence="jsd")
    parts = distillation_loss(student_logits, torch.zeros(4, dtype=torch.long), TeacherTargets(ids, teacher_lp), config)
    parts.total.backward()
    assert torch.isfinite(parts.kd) and torch.isfinite(student_logits.grad).all()


def test_distillation_loss_forms():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V, requires_grad=True)
    targets = torch.randint(0, V, (2, 5))
    teacher = torch.log_softmax(torch.randn(2, 5, V), -1).topk(8, dim=-1)
    ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))

    added = distillation_loss(logits, targets, TeacherTargets(teacher.indices, teacher.values), KDConfig(gamma=0.2))
    torch.testing.assert_close(added.ce, ce)
    torch.testing.assert_close(added.total, ce + 0.2 * added.kd)
    mixed = distillation_loss(logits, targets, TeacherTargets(teacher.indices, teacher.values), KDConfig(form="mix", mix=0.5))
    torch.testing.assert_close(mixed.total, 0.5 * ce + 0.5 * mixed.kd)
    ce_only = distillation_loss(logits, targets, TeacherTargets(teacher.indices, teacher.values), KDConfig(gamma=0.0))
    assert ce_only.kd is None
    torch.testing.assert_close(ce_only.total, ce)
    assert added.kd > 0


def test_kd_is_zero_when_the_student_matches_the_teacher():
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    top = torch.log_softmax(logits, -1).topk(10, dim=-1)
    for kind in DIVERGENCES:
        for tail in ("rest", "renorm"):
            config = KDConfig(divergence=kind, tail=tail)
            kd = distillation_loss(logits, torch.zeros(3, dtype=torch.long), TeacherTargets(top.indices, top.values), config).kd
            assert abs(float(kd)) < 1e-5, (kind, tail)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown divergence"):
        KDConfig(divergence="kl")
    with pytest.raises(ValueError, match="--temperature must be in \\(0, 100\\], got 0"):
        KDConfig(temperature=0)
    with pytest.raises(ValueError, match="--mix must be in \\[0, 1\\], got 2"):
        KDConfig(form="mix", mix=2.0)
    with pytest.raises(ValueError, match="--gamma must be >= 0, got -1"):
        KDConfig(gamma=-1.0)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_loss_at_k_equal_vocab_equals_dense_online_loss(logits, kind, temperature):
    """The whole training loss from a full-vocabulary 'cache' equals the live dense reference."""
    from ddk_cache.training.losses import dense_distillation_loss

    teacher_logits, student_logits = logits
    targets = torch.arange(N) % V
    config = KDConfig(divergence=kind, temperature=temperature, jsd_beta=BETA, skew_alpha=ALPHA)
    top = torch.log_softmax(teacher_logits, -1).topk(V, dim=-1)
    cached = distillation_loss(student_logits, targets, TeacherTargets(top.indices, top.values), config)
    dense = dense_distillation_loss(student_logits, targets, teacher_logits, config)
    torch.testing.assert_close(cached.total, dense.total, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dense.ce, F.cross_entropy(student_logits, targets))
    p, q = torch.softmax(teacher_logits / temperature, -1), torch.softmax(student_logits / temperature, -1)
    torch.testing.assert_close(dense.kd, dense_reference(p, q, kind).mean(), atol=2e-5, rtol=1e-4)


def test_sampled_forward_kl_gradient_is_unbiased(logits):
    """E over draws of the gradient against counts / n equals the gradient against the full teacher."""
    teacher_logits, student_logits = logits
    p = torch.softmax(teacher_logits.double(), -1)
    targets = torch.zeros(N, dtype=torch.long)
    config = KDConfig(gamma=1.0)
    dense = dense_distillation_loss(student_logits, targets, teacher_logits, config).kd
    (dense_grad,) = torch.autograd.grad(dense, student_logits)
    generator, n, trials = torch.Generator().manual_seed(1), 16, 3000
    mean_grad = torch.zeros_like(student_logits)
    for _ in range(trials):
        draws = torch.multinomial(p, n, replacement=True, generator=generator)
        ids = draws.sort(-1).values
        counts = torch.stack([torch.bincount(row, minlength=V) for row in draws])[torch.arange(N)[:, None], ids]
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # keep one entry per distinct id
        teacher = TeacherTargets(ids, (counts.float() / n).log(), valid=first)
        kd = distillation_loss(student_logits, targets, teacher, config).kd
        one_draw = torch.autograd.grad(kd, student_logits)[0]
        mean_grad += one_draw / trials
    assert torch.allclose(mean_grad, dense_grad, atol=3e-3), (mean_grad - dense_grad).abs().max()
    assert (one_draw - dense_grad).abs().max() > 10 * (mean_grad - dense_grad).abs().max()  # a single draw is noisy: the test can fail


def test_stored_rest_and_padding_mask_give_the_same_loss_as_exact_entries(logits):
    """Entries + stored rest renormalised equals the exact top-k loss; padded slots change nothing."""
    teacher_logits, student_logits = logits
    top = torch.log_softmax(teacher_logits, -1).topk(10, dim=-1)
    rest = torch.log1p(-top.values.exp().sum(-1))
    targets = torch.zeros(N, dtype=torch.long)
    exact = distillation_loss(student_logits, targets, TeacherTargets(top.indices, top.values), KDConfig()).kd
    stored = distillation_loss(student_logits, targets, TeacherTargets(top.indices, top.values, rest=rest), KDConfig()).kd
    assert torch.allclose(stored, exact, atol=1e-6)
    pad_ids = torch.cat([top.indices, top.indices[:, -1:].expand(N, 5)], -1)  # padding repeats the last id
    pad_values = torch.cat([top.values, torch.zeros(N, 5)], -1)
    valid = torch.arange(15) < 10
    padded = distillation_loss(student_logits, targets, TeacherTargets(pad_ids, pad_values, valid.expand(N, 15), rest), KDConfig()).kd
    assert torch.allclose(padded, exact, atol=1e-6)
    unmasked = distillation_loss(student_logits, targets, TeacherTargets(pad_ids, pad_values, None, rest), KDConfig()).kd
    assert not torch.allclose(unmasked, exact, atol=1e-3)


def test_sampled_targets_refuse_biased_settings():
    check_sampled_config(KDConfig())
    for config, message in [(KDConfig(divergence="reverse_kl"), "forward_kl"), (KDConfig(tail="renorm"), "--tail rest"),
                            (KDConfig(temperature=2.0), "--temperature 1")]:
        with pytest.raises(ValueError, match=message):
            check_sampled_config(config)
