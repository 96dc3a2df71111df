"""The DDK sampler follows the paper's formulas exactly; baselines stay fixed."""

from __future__ import annotations

import numpy as np
import pytest

from ddk_cache.training.domain_samplers import DDKSampler, DomainSampler, UniformSampler, create_sampler

DOMAINS = ["a", "b", "c"]


def softmax(x):
    e = np.exp(np.asarray(x) - np.max(x))
    return e / e.sum()


def test_ddk_initial_factor_is_softmax_of_perplexity_ratio():
    sampler = DDKSampler(DOMAINS)
    np.testing.assert_allclose(sampler.weights, [1 / 3] * 3)  # before any evaluation
    sampler.update([30.0, 20.0, 10.0], [10.0, 10.0, 10.0])
    np.testing.assert_allclose(sampler.weights, softmax([3.0, 2.0, 1.0]))


def test_ddk_smooth_update_matches_the_paper():
    sampler = DDKSampler(DOMAINS, alpha=0.5)
    sampler.update([30.0, 20.0, 10.0], [10.0, 10.0, 10.0])
    r_prev = sampler.weights.copy()
    sampler.update([12.0, 24.0, 18.0], [6.0, 8.0, 9.0])
    psi = r_prev * np.exp([2.0, 3.0, 2.0])
    np.testing.assert_allclose(sampler.weights, 0.5 * psi / psi.sum() + 0.5 / 3)
    assert sampler.weights.sum() == pytest.approx(1.0)
    assert sampler.weights.min() >= 0.5 / 3  # the uniform floor


def test_ddk_without_smoothing_recomputes_softmax():
    sampler = DDKSampler(DOMAINS, smooth=False)
    sampler.update([30.0, 20.0, 10.0], [10.0, 10.0, 10.0])
    sampler.update([12.0, 24.0, 18.0], [6.0, 8.0, 9.0])
    np.testing.assert_allclose(sampler.weights, softmax([2.0, 3.0, 2.0]))


def test_ddk_moves_weight_to_the_domain_with_the_largest_ratio():
    sampler = DDKSampler(DOMAINS)
    for _ in range(5):
        sampler.update([10.0, 10.0, 40.0], [10.0, 10.0, 10.0])
    assert np.argmax(sampler.weights) == 2 and sampler.weights[2] > 0.6


def test_huge_ratios_do_not_overflow():
    sampler = DDKSampler(DOMAINS)
    sampler.update([1e4, 1.0, 1.0], [1.0, 1.0, 1.0])
    sampler.update([1e4, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert np.isfinite(sampler.weights).all() and sampler.weights.sum() == pytest.approx(1.0)


def test_ce_ratio_score_is_the_ratio_of_cross_entropies():
    """The option: log ppl_S / log ppl_T in place of ppl_S / ppl_T, through the same softmax and smoothing."""
    student, teacher = [np.e**6, np.e**3, np.e**2], [np.e**2, np.e**2, np.e**1]
    sampler = DDKSampler(DOMAINS, score="ce-ratio")
    sampler.update(student, teacher)
    np.testing.assert_allclose(sampler.weights, softmax([3.0, 1.5, 2.0]))
    r_prev = sampler.weights.copy()
    sampler.update(student, teacher)
    psi = r_prev * np.exp([3.0, 1.5, 2.0])
    np.testing.assert_allclose(sampler.weights, 0.5 * psi / psi.sum() + 0.5 / 3)


def test_temperature_divides_the_score_and_keeps_far_behind_students_graded():
    """Ratios of a from-scratch student (hundreds apart) make the paper's softmax one-hot; a temperature of their scale does not."""
    student, teacher = [9000.0, 2000.0, 700.0], [1.0, 1.0, 1.0]
    paper = DDKSampler(DOMAINS)
    paper.update(student, teacher)
    assert paper.weights[0] == pytest.approx(1.0)  # the collapse the README describes
    tempered = DDKSampler(DOMAINS, temperature=4000.0)
    tempered.update(student, teacher)
    np.testing.assert_allclose(tempered.weights, softmax([9000 / 4000, 2000 / 4000, 700 / 4000]))
    assert tempered.weights.min() > 0.05
    graded = DDKSampler(DOMAINS, score="ce-ratio")
    graded.update([np.e**9, np.e**8, np.e**7], [np.e**3, np.e**4, np.e**2])
    np.testing.assert_allclose(graded.weights, softmax([3.0, 2.0, 3.5]))


def test_unknown_score_and_bad_temperature_are_refused():
    with pytest.raises(ValueError, match="unknown DDK score 'kl'"):
        DDKSampler(DOMAINS, score="kl")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            DDKSampler(DOMAINS, temperature=bad)


def test_draws_follow_the_weights_and_baselines_ignore_evaluations():
    static = create_sampler("static", DOMAINS, [1.0, 1.0, 2.0])
    np.testing.assert_allclose(static.weights, [0.25, 0.25, 0.5])
    static.update([100.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(static.weights, [0.25, 0.25, 0.5])
    counts = np.bincount(static.draw(np.random.default_rng(0), 20000), minlength=3) / 20000
    np.testing.assert_allclose(counts, [0.25, 0.25, 0.5], atol=0.02)
    assert isinstance(create_sampler("uniform", DOMAINS, [1, 1, 1]), UniformSampler)
    with pytest.raises(ValueError, match="unknown sampler"):
        create_sampler("random", DOMAINS, [1, 1, 1])


def test_state_round_trip():
    sampler = DDKSampler(DOMAINS)
    sampler.update([30.0, 20.0, 10.0], [10.0, 10.0, 10.0])
    restored = DDKSampler(DOMAINS)
    restored.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(restored.weights, sampler.weights)
    assert restored.initialized
    with pytest.raises(ValueError, match="checkpoint sampler is 'ddk'"):
        DomainSampler(DOMAINS).load_state_dict(sampler.state_dict())
