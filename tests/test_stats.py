"""ctxaware.stats recomputed independently: brute-force enumeration, exact fractions, scipy when present."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from ctxaware import stats


def _binom_two_sided_bruteforce(k: int, n: int) -> float:
    """Sum of the probabilities of every outcome no more likely than k (the 'minlike' definition), exactly."""
    probs = [Fraction(math.comb(n, i), 2 ** n) for i in range(n + 1)]
    return float(sum(p for p in probs if p <= probs[k]))


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_against_bruteforce(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 40)
    a = [rng.random() < 0.6 for _ in range(n)]
    b = [x if rng.random() < 0.6 else rng.random() < 0.4 for x in a]
    t = stats.mcnemar([int(x) for x in a], [int(x) for x in b])
    up = sum(1 for x, y in zip(a, b) if x and not y)
    down = sum(1 for x, y in zip(a, b) if y and not x)
    assert t.n == n and t.extra["first_only"] == up and t.extra["second_only"] == down
    assert t.effect == pytest.approx((sum(a) - sum(b)) / n)
    expected = _binom_two_sided_bruteforce(up, up + down) if up + down else 1.0
    assert t.p == pytest.approx(expected, rel=1e-9)
    assert t.ci[0] <= t.effect <= t.ci[1]
    assert (t.ci[0] > 0 or t.ci[1] < 0) == (t.p < 0.05) or abs(t.p - 0.05) < 0.02  # interval follows the test


def test_mcnemar_known_values():
    # 6 discordant pairs all one way: p = 2 / 64
    t = stats.mcnemar([1] * 6 + [1] * 4, [0] * 6 + [1] * 4)
    assert t.p == pytest.approx(2 / 64) and t.significant
    # no discordant pair: p = 1, effect 0
    t = stats.mcnemar([1, 0, 1], [1, 0, 1])
    assert t.p == 1.0 and t.effect == 0 and not t.significant
    with pytest.raises(ValueError):
        stats.mcnemar([0.5], [1])


def test_mcnemar_against_scipy():
    sp = pytest.importorskip("scipy.stats")
    for up, down in [(0, 3), (2, 9), (7, 7), (1, 15), (30, 12)]:
        a = [1] * up + [0] * down + [1] * 5
        b = [0] * up + [1] * down + [1] * 5
        t = stats.mcnemar(a, b)
        assert t.p == pytest.approx(sp.binomtest(up, up + down, 0.5).pvalue, rel=1e-9)
        ci = sp.binomtest(up, up + down, 0.5).proportion_ci(0.95, method="exact")
        d, n = up + down, len(a)
        assert t.ci[0] == pytest.approx(d / n * (2 * ci.low - 1), abs=1e-7)
        assert t.ci[1] == pytest.approx(d / n * (2 * ci.high - 1), abs=1e-7)


def test_clopper_pearson_tails():
    lo, hi = stats.clopper_pearson(3, 10)
    # at the bounds the one-sided tails are alpha/2, computed by direct sums
    upper_tail = sum(math.comb(10, i) * lo ** i * (1 - lo) ** (10 - i) for i in range(3, 11))
    lower_tail = sum(math.comb(10, i) * hi ** i * (1 - hi) ** (10 - i) for i in range(0, 4))
    assert upper_tail == pytest.approx(0.025, abs=1e-9) and lower_tail == pytest.approx(0.025, abs=1e-9)


def test_paired_mean_exact_permutation_by_enumeration():
    rng = np.random.default_rng(3)
    x, y = rng.random(10), rng.random(10)
    t = stats.paired_mean(x, y, seed=1)
    d = x - y
    obs = abs(d.sum())
    hits = sum(abs(sum(s * v for s, v in zip(signs, d))) >= obs - 1e-12 for signs in itertools.product((-1, 1), repeat=10))
    assert t.p == pytest.approx(hits / 2 ** 10)
    assert t.effect == pytest.approx(d.mean()) and t.extra["permutation"] == "exact"
    # bootstrap interval: recomputed with the documented seed and resampling
    boots = d[np.random.default_rng(1).integers(0, 10, size=(10000, 10))].mean(axis=1)
    assert t.ci == (pytest.approx(np.quantile(boots, 0.025)), pytest.approx(np.quantile(boots, 0.975)))


def test_paired_mean_monte_carlo_close_to_exact_and_detects_shift():
    rng = np.random.default_rng(0)
    x = rng.random(30)
    y = x - 0.2 + 0.05 * rng.standard_normal(30)
    t = stats.paired_mean(x, y)
    assert t.extra["permutation"] == "monte-carlo" and t.significant and t.ci[0] > 0.15
    same = stats.paired_mean(x, x)
    assert same.p == 1.0 and same.effect == 0 and not same.significant
    # Monte-Carlo p of a null sample agrees with the exact one within sampling error
    z = rng.standard_normal(18)
    mc = stats.paired_mean(z, np.zeros(18), exact_max=0, resamples=20000).p
    ex = stats.paired_mean(z, np.zeros(18), exact_max=18).p
    assert abs(mc - ex) < 0.02


def test_sign_and_wilcoxon_against_independent():
    sp = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    d = np.round(rng.standard_normal(81) - 0.3, 2)  # rounding makes ties; zeros dropped
    w = stats.wilcoxon(d)
    ref = sp.wilcoxon(d, zero_method="wilcox", correction=False, method="approx")
    assert w.p == pytest.approx(ref.pvalue, rel=1e-6)
    s = stats.sign_test(d)
    neg, pos = int((d < 0).sum()), int((d > 0).sum())
    assert s.p == pytest.approx(_binom_two_sided_bruteforce(neg, neg + pos), rel=1e-9)
    assert s.effect == pytest.approx(neg / (neg + pos))


def test_power_against_simulation_and_sizes():
    # exact power vs a Monte-Carlo of the test itself
    n, effect, psi = 40, 0.2, 0.3
    power = stats.mcnemar_power(n, effect, psi)
    rng = np.random.default_rng(0)
    q = (psi + effect) / (2 * psi)
    hits = 0
    reps = 4000
    for _ in range(reps):
        d = rng.binomial(n, psi)
        up = rng.binomial(d, q)
        hits += _binom_two_sided_bruteforce(up, d) < 0.05 if d else 0
    assert power == pytest.approx(hits / reps, abs=0.03)
    mde = stats.mde_proportions(n, psi)
    assert stats.mcnemar_power(n, mde, psi) >= 0.8 > stats.mcnemar_power(n, mde - 0.005, psi)
    need = stats.n_for_proportions(0.2, 0.3)
    assert stats.mcnemar_power(need, 0.2, 0.3) >= 0.8 > stats.mcnemar_power(need - 1, 0.2, 0.3)
    # 15 cells: fewer than 6 discordant pairs can never reach p < 0.05, so small effects are undetectable
    assert stats.mde_proportions(15) > 0.3
    assert stats.mde_proportions(3) == math.inf
    # means: the textbook formula
    assert stats.mde_means(100, 1.0) == pytest.approx((1.959964 + 0.841621) / 10, rel=1e-5)
    assert stats.n_for_means(0.28, 1.0) == math.ceil(((1.959964 + 0.841621) / 0.28) ** 2)


def test_study_target_effect_sizes_the_grid():
    from ctxaware.errors import ConfigError
    from ctxaware.study.config import StudyConfig

    need = stats.n_for_proportions(0.3)
    cfg = StudyConfig(target_effect=0.3)
    cells = len(cfg.niah_config().grid_lengths()) * len(cfg.niah_config().grid_depths())
    assert cells >= need > 15 and cells - 3 < need  # the fewest depths (3 lengths) that reach it
    assert stats.mcnemar_power(cells, 0.3) >= 0.8
    assert StudyConfig(target_effect=0.9).niah_config().grid_depths() == [0, 25, 50, 75, 100]  # 15 cells suffice
    with pytest.raises(ConfigError, match=r"needs at least \d+ cells per mode"):
        StudyConfig(target_effect=0.02)


def test_study_runs_every_phrasing_into_its_own_directory():
    from ctxaware.errors import ConfigError
    from ctxaware.niah.needles import load_needle
    from ctxaware.study.config import StudyConfig

    parts = StudyConfig(out="/tmp/x").niah_configs()
    assert {k: v.out for k, v in parts.items()} == {"SF": "/tmp/x/niah", "SF@q1": "/tmp/x/niah-SF_q1",
                                                    "SF@q2": "/tmp/x/niah-SF_q2"}
    questions = [load_needle(v.needle).question for v in parts.values()]
    assert len(set(questions)) == 3 and questions[0] == load_needle("SF").question
    assert list(StudyConfig(task="multi-key", phrasings="1").niah_configs()) == ["multi-key@q1"]
    with pytest.raises(ConfigError, match="phrasings"):
        StudyConfig(phrasings="5")
