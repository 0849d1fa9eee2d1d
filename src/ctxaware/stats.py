"""Paired significance tests, intervals and sample sizes for the verdicts (no scipy needed).

Every comparison the report states is paired: two modes answered the same cells, two conditions
the same questions. Each test returns a :class:`Test` with the effect (first minus second), its
95 % interval, the two-sided p-value and ``n``:

* :func:`mcnemar` — 0/1 outcomes (needle found, exact match): the exact McNemar test, i.e. a
  two-sided binomial test with p = 1/2 on the discordant pairs (b one way, c the other);
  effect ``(b − c)/n``; interval: Clopper–Pearson on ``b/(b + c)`` mapped to ``(b + c)/n · (2θ − 1)``
  (conditional on the discordant count, hence consistent with the exact test).
* :func:`paired_mean` — fractional scores (recall, F1): effect = mean of the paired differences,
  percentile interval of a seeded paired bootstrap, p-value of the sign-flip permutation test
  (exact over all ``2^m`` sign patterns of the ``m`` non-zero differences up to ``exact_max``,
  else Monte-Carlo with the same seed).
* :func:`sign_test`, :func:`wilcoxon` — one sample of differences (e.g. per attention head):
  the binomial sign test, and the Wilcoxon signed-rank test (normal approximation with the tie
  correction, zeros dropped).

Planning: :func:`mcnemar_power` (exact, by enumerating the discordant counts),
:func:`mde_proportions` / :func:`n_for_proportions` (smallest detectable difference at ``n`` and the
``n`` a target difference needs, 80 % power by default) and :func:`mde_means` / :func:`n_for_means`
(normal approximation with the differences' standard deviation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

ALPHA = 0.05
POWER = 0.8
EXACT_MAX = 16  # sign-flip permutation enumerated exactly up to this many non-zero differences


@dataclass
class Test:
    """One paired comparison: ``effect`` (first − second), its ``ci`` at ``1 − alpha``, two-sided ``p``, ``n``."""

    test: str
    effect: float
    ci: tuple[float, float]
    p: float
    n: int
    alpha: float = ALPHA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def significant(self) -> bool:
        return self.p < self.alpha

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        d["significant"] = self.significant
        return d

    def describe(self, unit: str = "") -> str:
        """``"+0.13 (95 % CI −0.07 to 0.33, exact McNemar p = 0.25, n = 15)"``."""
        u = f" {unit}" if unit else ""
        level = round(100 * (1 - self.alpha))
        return (f"{self.effect:+.3f}{u} ({level} % CI {self.ci[0]:+.3f} to {self.ci[1]:+.3f}, {self.test} "
                f"p = {format_p(self.p)}, n = {self.n})")


def format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"


# --------------------------------------------------------------------------- binomial helpers
_LOGFACT = np.zeros(1)


def _logfact(n: int) -> np.ndarray:
    """``log k!`` for ``k = 0..n`` (a table grown on demand)."""
    global _LOGFACT
    if len(_LOGFACT) <= n:
        _LOGFACT = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, 2 * n + 2, dtype=float)))])
    return _LOGFACT[: n + 1]


def _log_binom_pmf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    k = np.asarray(k, dtype=int)
    lf = _logfact(n)
    out = lf[n] - lf[k] - lf[n - k]
    if p > 0:
        out = out + k * math.log(p)
    else:
        out = np.where(k > 0, -np.inf, out)
    if p < 1:
        out = out + (n - k) * math.log1p(-p)
    else:
        out = np.where(n - k > 0, -np.inf, out)
    return out


def binom_pmf(n: int, p: float) -> np.ndarray:
    """``P(X = k)`` for ``k = 0..n``, ``X ~ Binomial(n, p)``."""
    return np.exp(_log_binom_pmf(np.arange(n + 1), n, p))


def binom_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)``."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(min(1.0, binom_pmf(n, p)[: k + 1].sum()))


def binom_test_half(k: int, n: int) -> float:
    """Exact two-sided binomial test of ``k`` successes in ``n`` at p = 1/2 (symmetric: doubled smaller tail)."""
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(k, n - k), n, 0.5))


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact interval for a binomial proportion (bisection on the binomial tails)."""
    if n == 0:
        return 0.0, 1.0

    def solve(f) -> float:  # f increasing in θ, root in [0, 1]
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else solve(lambda t: (1 - binom_cdf(k - 1, n, t)) - alpha / 2)
    high = 1.0 if k == n else solve(lambda t: alpha / 2 - binom_cdf(k, n, t))
    return low, high


# --------------------------------------------------------------------------- paired tests
def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be two 1-D sequences of the same length, got {x.shape} and {y.shape}")
    return x, y


def mcnemar(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Test:
    """Exact McNemar test of paired 0/1 outcomes ``a`` vs ``b`` (effect = mean(a) − mean(b))."""
    x, y = _pair(a, b)
    if not np.all(np.isin(x, (0, 1))) or not np.all(np.isin(y, (0, 1))):
        raise ValueError("mcnemar needs 0/1 outcomes")
    n = len(x)
    up, down = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
    d = up + down
    effect = (up - down) / n if n else 0.0
    lo, hi = clopper_pearson(up, d, alpha) if d else (0.5, 0.5)
    ci = (d / n * (2 * lo - 1), d / n * (2 * hi - 1)) if n else (0.0, 0.0)
    return Test("exact McNemar", effect, ci, binom_test_half(up, d), n, alpha,
                {"first_only": up, "second_only": down, "discordant": d})


def _sign_flip_p(diff: np.ndarray, seed: int, resamples: int, exact_max: int) -> tuple[float, str]:
    nz = diff[diff != 0]
    m = len(nz)
    if m == 0:
        return 1.0, "exact"
    observed = abs(nz.sum())
    tol = 1e-12 * max(1.0, float(np.abs(nz).sum()))
    if m <= exact_max:
        signs = ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1) * 2 - 1
        sums = np.abs(signs @ nz)
        return float(np.mean(sums >= observed - tol)), "exact"
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(resamples, m)) * 2 - 1
    sums = np.abs(signs @ nz)
    return float((1 + np.sum(sums >= observed - tol)) / (resamples + 1)), "monte-carlo"


def paired_mean(a: Sequence[float], b: Sequence[float], *, alpha: float = ALPHA, seed: int = 0,
                resamples: int = 10000, exact_max: int = EXACT_MAX) -> Test:
    """Paired comparison of fractional scores: bootstrap interval, sign-flip permutation p-value."""
    x, y = _pair(a, b)
    diff = x - y
    n = len(diff)
    if n == 0:
        return Test("paired permutation", 0.0, (0.0, 0.0), 1.0, 0, alpha)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    ci = (float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2)))
    p, how = _sign_flip_p(diff, seed, resamples, exact_max)
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    return Test("paired permutation", float(diff.mean()), ci, p, n, alpha,
                {"permutation": how, "bootstrap_resamples": resamples, "seed": seed, "sd_diff": sd})


def sign_test(diffs: Sequence[float], alpha: float = ALPHA) -> Test:
    """Binomial sign test that positive and negative differences are equally likely (zeros dropped);
    effect = share of negative differences among the non-zero ones, with its Clopper–Pearson interval."""
    d = np.asarray(diffs, dtype=float)
    neg, pos = int(np.sum(d < 0)), int(np.sum(d > 0))
    m = neg + pos
    return Test("sign test", neg / m if m else 0.5, clopper_pearson(neg, m, alpha), binom_test_half(neg, m), m,
                alpha, {"negative": neg, "positive": pos, "zero": int(len(d) - m)})


def wilcoxon(diffs: Sequence[float], alpha: float = ALPHA) -> Test:
    """Wilcoxon signed-rank test (zeros dropped, mid-ranks for ties, normal approximation with the tie
    correction); effect = median difference, interval = its bootstrap-free order-statistic interval
    from the sign test's binomial."""
    d = np.asarray(diffs, dtype=float)
    nz = d[d != 0]
    m = len(nz)
    if m == 0:
        return Test("Wilcoxon signed-rank", 0.0, (0.0, 0.0), 1.0, 0, alpha)
    order = np.argsort(np.abs(nz), kind="mergesort")
    absd = np.abs(nz)[order]
    ranks = np.empty(m)
    i = 0
    ties = 0.0
    while i < m:
        j = i
        while j + 1 < m and absd[j + 1] == absd[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    w_plus = float(ranks[nz > 0].sum())
    mean = m * (m + 1) / 4
    var = m * (m + 1) * (2 * m + 1) / 24 - ties / 48
    z = (w_plus - mean) / math.sqrt(var) if var > 0 else 0.0
    p = min(1.0, 2 * (1 - NormalDist().cdf(abs(z))))
    s = np.sort(nz)
    # order-statistic interval of the median: the k-th smallest and largest, k from the binomial(m, 1/2) tail
    k = 0
    while k + 1 <= m and binom_cdf(k, m, 0.5) <= alpha / 2:
        k += 1
    ci = (float(s[max(0, k - 1)]), float(s[min(m - 1, m - k)])) if k > 0 else (float(s[0]), float(s[-1]))
    return Test("Wilcoxon signed-rank", float(np.median(nz)), ci, p, m, alpha, {"w_plus": w_plus, "z": z})


# --------------------------------------------------------------------------- power and sizes
@lru_cache(maxsize=65536)
def _rejection_bounds(d: int, alpha: float) -> int:
    """Largest k with two-sided exact p(k of d) < alpha (−1 when none): reject when b <= k or b >= d − k."""
    if d == 0:
        return -1
    cdf = np.cumsum(binom_pmf(d, 0.5))
    ok = np.nonzero(2 * cdf[: d // 2 + 1] < alpha)[0]
    return int(ok[-1]) if len(ok) else -1


def mcnemar_power(n: int, effect: float, discordant: float | None = None, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided exact McNemar test at ``n`` pairs for a difference ``effect`` in
    proportions when a share ``discordant`` (>= |effect|; default |effect|, the most favourable) of the
    pairs disagree."""
    e = abs(effect)
    psi = e if discordant is None else max(float(discordant), e)
    if n < 1 or psi <= 0:
        return 0.0
    psi = min(psi, 1.0)
    q = (psi + e) / (2 * psi)
    p_d = binom_pmf(n, psi)
    total = 0.0
    for d in range(1, n + 1):
        if p_d[d] < 1e-15:
            continue
        k = _rejection_bounds(d, alpha)
        if k < 0:
            continue
        pmf = binom_pmf(d, q)
        total += p_d[d] * (pmf[: k + 1].sum() + pmf[d - k:].sum())
    return float(min(1.0, total))


def mde_proportions(n: int, discordant: float | None = None, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest difference in paired proportions the exact McNemar test detects with ``power`` at ``n``
    (1.0 or more means no difference can be detected: returned as ``inf``)."""
    if n < 1 or mcnemar_power(n, 1.0, discordant, alpha) < power:
        return math.inf
    lo, hi = 0, 200  # in steps of 0.005: power grows with the effect (up to the test's discreteness)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mcnemar_power(n, mid / 200, discordant, alpha) >= power else (mid, hi)
    return hi / 200


def n_for_proportions(effect: float, discordant: float | None = None, alpha: float = ALPHA, power: float = POWER,
                      limit: int = 100000) -> int:
    """Smallest ``n`` at which the exact McNemar test detects ``effect`` with ``power`` (doubling, then bisection)."""
    if not 0 < abs(effect) <= 1:
        raise ValueError(f"effect must be in (0, 1], got {effect}")
    hi = 4
    while mcnemar_power(hi, effect, discordant, alpha) < power:
        hi *= 2
        if hi > limit:
            return limit
    lo = hi // 2
    while lo + 1 < hi:  # power is not strictly monotone in n (discreteness): the first n past the threshold
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mcnemar_power(mid, effect, discordant, alpha) >= power else (mid, hi)
    return hi


def _z(alpha: float, power: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)


def mde_means(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest mean paired difference detectable at ``n`` with differences of standard deviation ``sd``."""
    return math.inf if n < 2 else _z(alpha, power) * sd / math.sqrt(n)


def n_for_means(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """``n`` pairs needed to detect a mean difference ``effect`` when the differences have deviation ``sd``."""
    if effect == 0:
        raise ValueError("effect must be non-zero")
    return max(2, math.ceil((_z(alpha, power) * sd / abs(effect)) ** 2))
