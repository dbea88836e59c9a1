"""Mean, standard deviation and Student-t confidence interval of a few runs' metric (one value per seed).

The t quantile is computed here (scipy is not a dependency): the Student-t CDF through the regularized incomplete
beta function (its continued fraction, Numerical Recipes §6.4), inverted by bisection — exact to ~1e-10, so the
95 % quantiles come out as the tables print them (2 degrees of freedom: 4.303, 4: 2.776).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

CONFIDENCE = 0.95


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), `df` > 0 degrees of freedom."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Summary:
    """One metric over n runs: mean, sample standard deviation (n - 1) and the two-sided CONFIDENCE interval of
    the mean, mean ± t_{(1+CONFIDENCE)/2, n-1} sd / sqrt(n). With one run there is no spread: sd and the
    interval are None."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.ci_high is None else self.ci_high - self.mean

    def text(self, digits: int = 4) -> str:
        """`0.734 ± 0.052` (mean ± the interval's half width), or the mean alone for one run."""
        mean = f"{self.mean:.{digits}g}"
        return mean if self.half_width is None else f"{mean} ± {self.half_width:.2g}"

    def interval_text(self, digits: int = 4) -> str:
        return "" if self.ci_low is None else f"[{self.ci_low:.{digits}g}, {self.ci_high:.{digits}g}]"


def summarize(values: Iterable[float | int | None], confidence: float = CONFIDENCE) -> Summary | None:
    """The Summary of the finite values (None when there are none)."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    n = len(finite)
    mean = sum(finite) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)
