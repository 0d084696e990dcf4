"""Several dose groups: Holm, Dunnett, Kruskal-Wallis, Jonckheere-Terpstra (against exact
enumeration), effect-size intervals, and the groups command with a dose order."""

from __future__ import annotations

import inspect
import itertools
import json

import numpy as np
import pytest
from scipy import stats as sps

from gen_ad.cli import main
from gen_ad.errors import DataError
from gen_ad.metrics.dose_response import (
    effect_intervals,
    holm,
    jonckheere_terpstra,
    jt_null_moments,
    jt_statistic,
    kruskal_wallis,
    many_to_one,
)
from gen_ad.metrics.stats import GroupSettings, group_analysis, read_group_order

TIED = [np.array([1.0, 2.0]), np.array([2.0, 3.0]), np.array([3.0, 3.0, 5.0])]


def _split(values: tuple[float, ...], sizes: list[int]) -> list[np.ndarray]:
    cuts = np.cumsum([0, *sizes])
    return [np.array(values[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def test_holm_step_down() -> None:
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1, monotone
    assert holm([]) == [] and holm([0.02]) == [0.02]


def test_jt_statistic_is_a_sum_of_mann_whitney_counts() -> None:
    rng = np.random.default_rng(0)
    groups = [np.round(rng.normal(i, 1.0, n), 1) for i, n in enumerate([4, 5, 3])]
    u = sum(sps.mannwhitneyu(groups[b], groups[a]).statistic
            for a, b in itertools.combinations(range(3), 2))
    assert jt_statistic(groups) == pytest.approx(u)


def test_null_moments_and_exact_p_equal_full_enumeration() -> None:
    values = tuple(np.concatenate(TIED))
    sizes = [g.size for g in TIED]
    every = np.array([jt_statistic(_split(p, sizes))
                      for p in itertools.permutations(values)])  # 7! orderings, ties included
    mean, var = jt_null_moments(sizes, np.array(values))
    assert mean == pytest.approx(every.mean(), abs=1e-9)
    assert var == pytest.approx(every.var(), abs=1e-9)
    out = jonckheere_terpstra(TIED)
    j = jt_statistic(TIED)
    assert out["method"].startswith("exact") and out["j"] == j
    assert out["p_increasing"] == pytest.approx((every >= j).mean(), abs=1e-12)
    assert out["p_decreasing"] == pytest.approx((every <= j).mean(), abs=1e-12)
    assert out["p_two_sided"] == pytest.approx(
        (np.abs(every - mean) >= abs(j - mean) - 1e-9).mean(), abs=1e-12)


def test_monte_carlo_agrees_with_exact_and_normal_with_large_groups() -> None:
    rng = np.random.default_rng(1)
    small = [rng.normal(0.4 * i, 1.0, n) for i, n in enumerate([3, 4, 4])]  # 11550 ways
    exact = jonckheere_terpstra(small)
    mc = jonckheere_terpstra(small, exact_limit=0, n_perm=20000, seed=3)
    assert mc["method"].startswith("Monte-Carlo") and exact["method"].startswith("exact")
    assert mc["p_increasing"] == pytest.approx(exact["p_increasing"], abs=0.01)
    assert mc == jonckheere_terpstra(small, exact_limit=0, n_perm=20000, seed=3)
    big = [rng.normal(0.15 * i, 1.0, 15) for i in range(4)]
    out = jonckheere_terpstra(big, n_perm=20000)
    assert out["method"].startswith("Monte-Carlo")
    assert out["p_two_sided"] == pytest.approx(out["p_normal_two_sided"], abs=0.02)


def test_trend_direction() -> None:
    rising = [np.array([1.0, 2.0, 1.5]), np.array([3.0, 2.5, 4.0]), np.array([5.0, 6.0, 5.5])]
    up = jonckheere_terpstra(rising)
    assert up["p_increasing"] == pytest.approx(1 / 1680) and up["p_decreasing"] == 1.0
    down = jonckheere_terpstra(rising[::-1])
    assert down["p_decreasing"] == pytest.approx(1 / 1680) and down["z"] < 0
    with pytest.raises(DataError, match="2 non-empty"):
        jonckheere_terpstra([np.array([1.0])])


def test_dunnett_p_is_never_zero_and_exact_for_one_comparison() -> None:
    """scipy 1.17 gave p = 0.0 for 3 vs 3 animals (1 - a quasi-Monte Carlo integral)."""
    ctrl, treated = np.array([1.0, 1.2, 0.9]), np.array([9.0, 9.3, 8.8])
    out = many_to_one(ctrl, [treated])
    pooled = sps.ttest_ind(treated, ctrl, equal_var=True).pvalue  # Dunnett with k = 1
    assert out["dunnett_p"][0] == pytest.approx(pooled, rel=1e-12) and out["dunnett_p"][0] > 0
    assert out["dunnett_p_method"].startswith("exact")
    two = many_to_one(ctrl, [treated, treated + 0.1])
    assert all(0 < p < 1e-3 for p in two["dunnett_p"]) and "Bonferroni" in two["dunnett_p_method"]


def test_dunnett_and_kruskal_equal_scipy() -> None:
    rng = np.random.default_rng(2)
    ctrl, low, high = rng.normal(5, 1, 6), rng.normal(5.5, 1, 6), rng.normal(8, 1, 6)
    out = many_to_one(ctrl, [low, high], seed=4)
    key = "rng" if "rng" in inspect.signature(sps.dunnett).parameters else "random_state"
    ref = sps.dunnett(low, high, control=ctrl, **{key: np.random.default_rng(4)})
    # scipy's p where its integral resolves it; below 1e-3 the Bonferroni bound k * p_t
    df = 18 - 3
    p_t = 2 * sps.t.sf(np.abs(ref.statistic), df)
    want = [p if p >= 1e-3 else min(1.0, 2 * pt) for p, pt in zip(ref.pvalue, p_t)]
    assert out["dunnett_p"] == pytest.approx(want, rel=1e-9)
    assert all(pt <= p <= 2 * pt for p, pt in zip(out["dunnett_p"], p_t))
    lo, hi = ref.confidence_interval(0.95)
    assert out["dunnett_ci"][1] == pytest.approx([lo[1], hi[1]], rel=1e-9)
    assert many_to_one([1.0, 1.0], [[1.0, 1.0]])["dunnett_p"] == [None]
    kw = kruskal_wallis([ctrl, low, high])
    assert kw["kruskal_p"] == pytest.approx(sps.kruskal(ctrl, low, high).pvalue)
    assert kruskal_wallis([[1.0, 1.0], [1.0, 1.0]])["kruskal_p"] is None


def test_effect_intervals() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(10, 2, 8), rng.normal(14, 2, 8)
    out = effect_intervals(a, b, n_boot=2000, seed=1)
    welch = sps.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert out["mean_diff"] == pytest.approx([welch.low, welch.high])
    point_g = (b.mean() - a.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert out["hedges_g"][0] < point_g < out["hedges_g"][1]
    assert out["median_diff"][0] < np.median(b) - np.median(a) < out["median_diff"][1]
    assert -1.0 <= out["cliffs_delta"][0] <= out["cliffs_delta"][1] <= 1.0
    assert out == effect_intervals(a, b, n_boot=2000, seed=1)
    wide = effect_intervals(a[:3], b[:3], n_boot=2000, seed=1)
    assert np.diff(wide["mean_diff"]) > np.diff(out["mean_diff"])
    const = effect_intervals([0.0, 0.0], [0.0, 0.0], n_boot=50)
    assert const["hedges_g"] is None and const["mean_diff"] is None


def _study(tmp_path, dose_column: bool = True):
    """Four groups of 4 slides: the share of high-scoring tiles rises with the dose."""
    rng = np.random.default_rng(0)
    rows, groups = ["path,score"], ["slide,group" + (",dose" if dose_column else "")]
    for gi, (name, dose) in enumerate([("control", 0), ("low", 10), ("mid", 30), ("high", 100)]):
        for s in range(4):
            slide = f"{name}{s}"
            groups.append(f"{slide},{name}" + (f",{dose}" if dose_column else ""))
            for t in range(25):
                hot = rng.random() < 0.05 + 0.12 * gi
                rows.append(f"tiles/{slide}_x{t * 64}_y0.png,{rng.normal(2.0 if hot else 0, 0.3)}")
    (tmp_path / "scores.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "groups.csv").write_text("\n".join(groups) + "\n")


def test_group_analysis_with_dose_order(tmp_path) -> None:
    _study(tmp_path)
    assert read_group_order(tmp_path / "groups.csv") == ["control", "low", "mid", "high"]
    rc = main(["groups", "--scores", str(tmp_path / "scores.csv"), "--groups",
               str(tmp_path / "groups.csv"), "--threshold", "1.0", "--out", str(tmp_path / "o"),
               "--n-boot", "500"])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "groups.json").read_text())
    trend = res["trend"]
    assert trend["order"] == ["control", "low", "mid", "high"] and trend["p_increasing"] < 0.01
    assert trend["method"].startswith("Monte-Carlo")  # 16!/(4!)^4 assignments: too many
    hi = res["comparisons"]["high"]
    assert hi["mannwhitney_p_holm"] >= hi["mannwhitney_p"] and hi["dunnett_p"] < 0.05
    assert hi["ci"]["mean_diff"][0] > 0 and hi["ci"]["n_boot"] == 500
    assert res["omnibus"]["kruskal_p"] < 0.05
    direct = group_analysis(*_tables(tmp_path), 1.0, GroupSettings(
        order=["control", "low", "mid", "high"], n_boot=500))
    assert direct["trend"]["p_two_sided"] == trend["p_two_sided"]


def _tables(tmp_path):
    from gen_ad.metrics.stats import read_groups, read_scores

    slides, scores = read_scores([tmp_path / "scores.csv"])
    return slides, scores, read_groups(tmp_path / "groups.csv")


def test_order_option_and_its_errors(tmp_path, capsys) -> None:
    _study(tmp_path, dose_column=False)
    base = ["groups", "--scores", str(tmp_path / "scores.csv"), "--groups",
            str(tmp_path / "groups.csv"), "--threshold", "1.0", "--n-boot", "200"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "Holm" in text and "Dunnett p=" in text and "Jonckheere" not in text
    res = json.loads((tmp_path / "a" / "groups.json").read_text())
    assert res["trend"]["order"] is None and "no trend test" in res["trend"]["note"]
    assert main(base + ["--out", str(tmp_path / "b"), "--order", "control,low,mid,high"]) == 0
    assert "trend over control < low < mid < high: Jonckheere-Terpstra p=" in (
        capsys.readouterr().out)
    assert main(base + ["--out", str(tmp_path / "c"), "--order", "control,low,high"]) == 2
    assert "missing: mid" in capsys.readouterr().err


@pytest.mark.parametrize("table, message", [
    ("slide,group,dose\na1,a,0\na2,a,x\n", "is not a number"),
    ("slide,group,dose\na1,a,0\na2,a,1\n", "two doses"),
    ("slide,group,dose\na1,a,0\nb1,b,0\n", "share a dose"),
])
def test_dose_column_errors(tmp_path, table: str, message: str) -> None:
    (tmp_path / "g.csv").write_text(table)
    with pytest.raises(DataError, match=message):
        read_group_order(tmp_path / "g.csv")
