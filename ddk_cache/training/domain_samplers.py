"""Domain samplers: which domain each training window comes from.

`ddk` is the DDK rule (Liu et al. 2024). With l_S[i], l_T[i] the student's and teacher's
validation perplexities on domain i:

- initial factor:   r[i] = softmax_i(l_S[i] / l_T[i])
- every K steps:    psi[i] = r_prev[i] * exp(l_S[i] / l_T[i])
                    r[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N      (alpha = 0.5)
- `smooth=False` (the paper's "w/o FS" ablation) recomputes r = softmax(l_S / l_T) each time.

Domains where the student lags the teacher most get sampled more; the uniform floor keeps
every domain in the mix. `static` (the manifest's weights) and `uniform` are the baselines.

When the paper's factor collapses. The score l_S / l_T is a ratio of *perplexities*, i.e.
exp(CE_S - CE_T): exponential in the student's cross-entropy gap. The paper's students are
pretrained (gaps of a fraction of a nat, ratios 1-3), where a softmax over the ratios is a
graded preference. A student far behind (from random weights: gaps of 5-9 nats, ratios of
hundreds to thousands) gets ratios that differ by far more than 1 between domains, the softmax
is one-hot, and the smoothing's product r_prev * exp(score) compounds it every update: the
sampler gives alpha + (1 - alpha)/N of the data to one domain and the floor to the rest. Two
options, off by default so the paper's rule stays exact:

- `score="ce-ratio"`: CE_S / CE_T (ratio of log-perplexities) instead of ppl_S / ppl_T. Same
  ordering of domains, but linear in the gap rather than exponential, and scale-free (a gap of
  1 nat on a 2-nat domain counts as much as 2 nats on a 4-nat one).
- `temperature=tau`: every score is divided by tau before the softmax / exp; tau > 1 flattens,
  tau < 1 sharpens.

Neither rescues a student at random initialisation: with CE = ln V on every domain and this
repository's four benchmark domains, the paper's factor puts 1.000 on math, the CE ratio 0.84,
the CE ratio at tau = 2 still 0.58. Such a student should sample uniformly until it models every
domain (benchmarks/RESULTS.md: uniform beats DDK from scratch, DDK beats uniform once pruned and
healed); the options are for the in-between regime and for domains of very different difficulty.

The sampler only holds weights; the random draws come from the caller's generator, whose
state is checkpointed with everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ddk_cache.choices import DDKScore, SamplerName, parse_choice, values
from ddk_cache.ranges import AT_LEAST_ONE, FRACTION, Range, check_ranges

SAMPLER_NAMES = values(SamplerName)
DDK_SCORES = values(DDKScore)  # ppl-ratio: the paper's rule


class DomainSampler:
    """Fixed weights over domains; subclasses change them from evaluations."""

    name = "static"
    needs_evaluation = False

    def __init__(self, domains: Sequence[str], weights: Sequence[float] | None = None) -> None:
        if not domains:
            raise ValueError("a sampler needs at least one domain")
        self.domains = list(domains)
        raw = np.ones(len(domains)) if weights is None else np.asarray(weights, dtype=np.float64)
        if raw.shape != (len(domains),) or np.any(raw <= 0):
            raise ValueError("weights must be positive, one per domain")
        self.weights = raw / raw.sum()

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Domain indices of the next `n` windows."""
        return rng.choice(len(self.domains), size=n, p=self.weights)

    def update(self, student_ppl: Sequence[float], teacher_ppl: Sequence[float]) -> None:
        """Called after each evaluation; fixed-weight samplers ignore it."""

    def weights_by_domain(self) -> dict[str, float]:
        return {d: float(w) for d, w in zip(self.domains, self.weights)}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint sampler is {state.get('name')!r}, this run uses {self.name!r}")
        self.weights = np.asarray(state["weights"], dtype=np.float64)


class UniformSampler(DomainSampler):
    name = "uniform"

    def __init__(self, domains: Sequence[str]) -> None:
        super().__init__(domains, None)


# A DDK factor with this much on one domain is one-hot in effect: DDK has stopped comparing domains (README, "When
# DDK's factor collapses"). 0.99 leaves 1 % for all the others, where a graded preference gives each several %.
COLLAPSE_WEIGHT = 0.99


class DDKSampler(DomainSampler):
    """DDK's domain discrepancy factor with factor smooth updating."""

    name = "ddk"
    needs_evaluation = True

    def __init__(self, domains: Sequence[str], alpha: float = 0.5, smooth: bool = True, score: str = "ppl-ratio",
                 temperature: float = 1.0) -> None:
        super().__init__(domains, None)
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if score not in DDK_SCORES:
            raise ValueError(f"unknown DDK score {score!r}: choose one of {', '.join(DDK_SCORES)}")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"the DDK temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.smooth = smooth
        self.score = score
        self.temperature = float(temperature)
        self.initialized = False

    def discrepancy(self, student_ppl: Sequence[float], teacher_ppl: Sequence[float]) -> np.ndarray:
        """The per-domain score the factor is a softmax of, divided by the temperature."""
        student, teacher = np.asarray(student_ppl, dtype=np.float64), np.asarray(teacher_ppl, dtype=np.float64)
        if self.score == "ce-ratio":  # log ppl is the mean cross-entropy
            return np.log(student) / np.log(teacher) / self.temperature
        return student / teacher / self.temperature

    def update(self, student_ppl: Sequence[float], teacher_ppl: Sequence[float]) -> None:
        ratio = self.discrepancy(student_ppl, teacher_ppl)
        if not self.initialized or not self.smooth:
            self.weights = self.factor = _softmax(ratio)
            self.initialized = True
            return
        # psi = r_prev * exp(ratio), normalised in log space so large ratios cannot overflow
        # (a weight the first softmax underflowed to 0 stays -inf here; the uniform floor revives it)
        with np.errstate(divide="ignore"):
            log_psi = np.log(self.weights) + ratio
        psi = np.exp(log_psi - log_psi.max())
        self.factor = psi / psi.sum()
        self.weights = self.alpha * self.factor + (1 - self.alpha) / len(self.domains)

    def collapsed_onto(self) -> str | None:
        """The domain the last update's factor put at least COLLAPSE_WEIGHT on (None: no collapse, or no update yet).

        Why the factor and not the weights: smoothing caps a weight at alpha + (1 - alpha) / N, so collapsed
        weights look moderate (0.625 with four domains) while every other domain sits at the floor for good.
        """
        factor = getattr(self, "factor", None)
        if factor is None:
            return None
        top = int(np.argmax(factor))
        return self.domains[top] if factor[top] >= COLLAPSE_WEIGHT else None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initialized": self.initialized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initialized = bool(state["initialized"])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def create_sampler(name: str, domains: Sequence[str], manifest_weights: Sequence[float], alpha: float = 0.5, smooth: bool = True,
                   score: str = "ppl-ratio", temperature: float = 1.0) -> DomainSampler:
    if name == "ddk":
        return DDKSampler(domains, alpha=alpha, smooth=smooth, score=score, temperature=temperature)
    if name == "static":
        return DomainSampler(domains, manifest_weights)
    if name == "uniform":
        return UniformSampler(domains)
    raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLER_NAMES)}")


@dataclass(frozen=True)
class SamplerSettings:
    """Which sampler, DDK's knobs, and how often (and on how much) the student is evaluated to reweight."""

    name: SamplerName = SamplerName.ddk
    alpha: float = 0.5
    smooth: bool = True
    score: DDKScore = DDKScore.ppl_ratio  # the paper's rule; ce-ratio: see this module's docstring
    temperature: float = 1.0  # scores are divided by it before DDK's softmax
    update_every: int | None = None  # K; default: min(1000, max(1, steps // 10))
    eval_windows: int = 32
    eval_batch_size: int = 8

    RANGES: ClassVar[dict[str, Range]] = {"ddk_alpha": FRACTION, "ddk_temperature": Range(0, 1000, open_low=True), "update_every": AT_LEAST_ONE,
                                          "eval_windows": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE}

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", parse_choice(SamplerName, self.name, "sampler"))
        object.__setattr__(self, "score", parse_choice(DDKScore, self.score, "--ddk-score", " (the first is the paper's rule)"))
        check_ranges({"ddk_alpha": self.alpha, "ddk_temperature": self.temperature, "update_every": self.update_every,
                      "eval_windows": self.eval_windows, "eval_batch_size": self.eval_batch_size}, self.RANGES)

    def every(self, steps: int) -> int:
        """K: the steps between evaluations (and DDK's reweighting)."""
        return self.update_every or min(1000, max(1, steps // 10))

    def build(self, domains: Sequence[str], manifest_weights: Sequence[float]) -> DomainSampler:
        return create_sampler(self.name.value, domains, manifest_weights, alpha=self.alpha, smooth=self.smooth, score=self.score.value,
                              temperature=self.temperature)
