"""Intervals of Hedges' g and Cliff's delta for a handful of animals per group.

A percentile bootstrap gave 3 vs 3 slides ``Hedges g=-7.55 [-529, -6.32], Cliff's delta=-1
[-1, -1]``: g is now the noncentral-t interval (exact for normal data with equal variances),
delta Newcombe's (2006) method-5 score interval; each is checked against a computation of its
own here (a dense grid instead of root finding).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

import gen_ad.metrics.dose_response as dr
from gen_ad.app.groups import format_summary
from gen_ad.cli import main
from gen_ad.metrics.dose_response import (
    cliffs_delta_interval,
    effect_intervals,
    hedges_g_interval,
)
from gen_ad.metrics.stats import GroupSettings, compare_groups, group_analysis

# the walkthrough's per-slide percentages above the threshold (3 control, 3 treated slides)
CONTROL = [63.1578947368421, 72.22222222222223, 83.33333333333333]
TREATED = [4.545454545454546, 0.0, 4.762]


def _nct_grid_interval(a: list[float], b: list[float], ci: float = 0.95) -> list[float]:
    """delta's interval from the pooled t on a fine grid of noncentrality values."""
    na, nb = len(a), len(b)
    t = float(sps.ttest_ind(b, a, equal_var=True).statistic)
    lam = np.linspace(t - 40, t + 40, 80_001)
    cdf = sps.nct.cdf(t, na + nb - 2, lam)  # falls as lam rises
    lo = np.interp(-(0.5 + ci / 2), -cdf, lam)  # np.interp needs rising x
    hi = np.interp(-(0.5 - ci / 2), -cdf, lam)
    scale = math.sqrt(na * nb / (na + nb))
    return [lo / scale, hi / scale]


def _newcombe_grid_interval(a: list[float], b: list[float], ci: float = 0.95) -> list[float]:
    """delta's interval: the theta on a fine grid with (theta_hat - theta)^2 <= z^2 V(theta)."""
    m, n = len(b), len(a)
    wins = sum((x > y) + 0.5 * (x == y) for x in b for y in a)
    theta_hat, k, z = wins / (m * n), (m + n) / 2 - 1, sps.norm.ppf(0.5 + ci / 2)
    th = np.linspace(0.0, 1.0, 2_000_001)
    v = th * (1 - th) * (1 + k * (1 - th) / (2 - th) + k * th / (1 + th)) / (m * n)
    inside = th[(theta_hat - th) ** 2 <= z * z * v]
    return [2 * inside.min() - 1, 2 * inside.max() - 1]


def test_hedges_g_3_vs_3_is_the_noncentral_t_interval() -> None:
    g = compare_groups(CONTROL, TREATED)["hedges_g"]
    (lo, hi), method = hedges_g_interval(CONTROL, TREATED)
    assert method.startswith("noncentral t")
    assert [lo, hi] == pytest.approx(_nct_grid_interval(CONTROL, TREATED), rel=1e-4)
    assert lo < g < hi and -20 < lo < hi < -2  # the bootstrap's lower bound was -529
    flipped, _ = hedges_g_interval(TREATED, CONTROL)
    assert flipped == pytest.approx([-hi, -lo], rel=1e-9)
    a, b = [1.0, 2.0, 3.0, 4.0], [2.5, 3.0, 4.5, 6.0, 5.0]  # unequal sizes, overlapping
    assert hedges_g_interval(a, b)[0] == pytest.approx(_nct_grid_interval(a, b), rel=1e-4)
    assert hedges_g_interval([1.0, 1.0], [1.0, 1.0])[0] is None  # no spread: undefined


def test_hedges_g_interval_covers_delta_in_simulated_3_vs_3_studies() -> None:
    rng = np.random.default_rng(0)
    hit = [lo <= 1.5 <= hi for lo, hi in (
        hedges_g_interval(rng.normal(0, 1, 3), rng.normal(1.5, 1, 3))[0] for _ in range(200))]
    assert 0.92 <= np.mean(hit) <= 0.98


def test_hedges_g_large_t_limit_and_normal_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    below = dr._noncentrality_interval(999.9, 4, 0.95)
    above = dr._noncentrality_interval(1000.0, 4, 0.95)
    assert below is not None and above is not None
    assert np.array(above) == pytest.approx(np.array(below) * 1000.0 / 999.9, rel=1e-4)
    assert dr._noncentrality_interval(-1000.0, 4, 0.95) == pytest.approx([-above[1], -above[0]])
    monkeypatch.setattr(dr.sps.nct, "cdf", lambda *a, **k: math.nan)  # scipy's nct failing
    (lo, hi), method = hedges_g_interval(CONTROL, TREATED)
    g = compare_groups(CONTROL, TREATED)["hedges_g"]
    half = 1.959963984540054 * math.sqrt(6 / 9 + g * g / 12)  # Hedges & Olkin, n1 = n2 = 3
    assert method.startswith("normal approximation") and [lo, hi] == pytest.approx(
        [g - half, g + half], rel=1e-9)


@pytest.mark.parametrize("a, b", [
    (CONTROL, TREATED),  # complete separation: delta = -1, the bootstrap gave [-1, -1]
    (TREATED, CONTROL),
    ([0.0, 0.0, 0.0, 5.0], [0.0, 3.0, 8.0, 9.0, 12.0, 2.0]),  # ties, unequal sizes
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
])
def test_cliffs_delta_interval_is_newcombes_method_5(a: list[float], b: list[float]) -> None:
    delta = compare_groups(a, b)["cliffs_delta"]
    lo, hi = cliffs_delta_interval(a, b)
    assert [lo, hi] == pytest.approx(_newcombe_grid_interval(a, b), abs=2e-6)
    assert -1.0 <= lo <= delta <= hi <= 1.0 and hi - lo > 0.5


def test_cliffs_delta_interval_covers_a_large_effect_in_3_vs_3_studies() -> None:
    """Shift of 3 SD: true delta = 2 Phi(3 / sqrt 2) - 1 = 0.966, the samples mostly separated
    (delta_hat = 1), where a bootstrap interval is [1, 1] and misses it."""
    rng = np.random.default_rng(1)
    true = 2 * sps.norm.cdf(3 / math.sqrt(2)) - 1
    hit = [lo <= true <= hi for lo, hi in (
        cliffs_delta_interval(rng.normal(0, 1, 3), rng.normal(3, 1, 3)) for _ in range(300))]
    assert 0.92 <= np.mean(hit) <= 0.99


def test_walkthrough_groups_line_and_zero_width_marker(tmp_path, capsys) -> None:
    slides = [f"s{i}" for i in range(6)]
    groups = {s: "control" if i < 3 else "treated" for i, s in enumerate(slides)}
    rows = ["path,score,slide"]
    for s, pct in zip(slides, CONTROL + [4.545454545454546, 0.0, 4.761904761904762]):
        n_above = round(pct * 21 / 100)  # 21 tiles per slide: 0-18 above the threshold
        rows += [f"t.png,{2.0 if j < n_above else 0.0},{s}" for j in range(21)]
    (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "groups.csv").write_text(
        "slide,group\n" + "".join(f"{s},{g}\n" for s, g in groups.items()))
    assert main(["groups", "--scores", str(tmp_path / "scores.csv"), "--groups",
                 str(tmp_path / "groups.csv"), "--threshold", "1", "--out",
                 str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "groups.json").read_text())["comparisons"]["treated"]
    g, ci = res["hedges_g"], res["ci"]
    assert ci["hedges_g"][0] < g < ci["hedges_g"][1] and ci["hedges_g"][0] > -20
    assert f"Hedges g={g:.3g} [{ci['hedges_g'][0]:.3g}, {ci['hedges_g'][1]:.3g}]," in out
    assert "Cliff's delta=-1 [-1, " in out and "zero-width" not in out
    assert "95% intervals: Welch t (mean diff), bootstrap (median diff), noncentral t (Hedges " \
           "g), Newcombe score (Cliff's delta)" in out
    # constant groups: the bootstrap of the median cannot vary, and says so
    flat = group_analysis([f"s{i}" for i in range(6) for _ in range(4)],
                          [0.0] * 12 + [2.0] * 12, groups, 1.0, GroupSettings(n_boot=50))
    text = format_summary(flat)
    assert "median diff 100 points [100, 100] (zero-width CI)" in text
    assert "Cliff's delta=1 [" in text and "Cliff's delta=1 [1, 1]" not in text


def test_larger_groups_keep_welch_and_the_median_bootstrap() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(10, 2, 12), rng.normal(14, 2, 12)
    out = effect_intervals(a, b, n_boot=500, seed=1)
    welch = sps.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert out["mean_diff"] == pytest.approx([welch.low, welch.high])
    draw = np.random.default_rng(1)
    ra = a[draw.integers(0, 12, size=(500, 12))]
    rb = b[draw.integers(0, 12, size=(500, 12))]
    md = np.median(rb, axis=1) - np.median(ra, axis=1)
    assert out["median_diff"] == pytest.approx(np.percentile(md, [2.5, 97.5]))
    assert out["hedges_g"] == pytest.approx(_nct_grid_interval(list(a), list(b)), rel=1e-4)
