"""Group statistics: per-slide percentages, tests equal scipy, the groups CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from gen_ad.cli import main
from gen_ad.errors import DataError
from gen_ad.metrics.stats import (
    compare_groups,
    group_analysis,
    per_slide_percent,
    pick_control,
    read_animals,
    read_groups,
    read_scores,
    slide_from_path,
)
from gen_ad.scoring.thresholds import Threshold


def test_slide_from_tile_name() -> None:
    assert slide_from_path("/a/b/rat_12_liver_x1024_y2048.png") == "rat_12_liver"
    assert slide_from_path("S1_x0_y0_level0.png") == "S1"
    with pytest.raises(DataError, match="slide"):
        slide_from_path("tile_0001.png")


def test_per_slide_percent() -> None:
    slides = ["b", "a", "a", "b", "a", "a"]
    scores = [0.1, 0.5, 2.0, 3.0, 0.2, 1.5]
    out = {p.slide: p for p in per_slide_percent(slides, scores, threshold=1.0)}
    assert list(out) == ["a", "b"]
    assert (out["a"].n_patches, out["a"].n_above, out["a"].percent_above) == (4, 2, 50.0)
    assert out["b"].percent_above == 50.0 and out["b"].max_score == 3.0
    assert out["a"].mean_score == pytest.approx(1.05)


def test_compare_groups_equals_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(5, 2, 7), rng.normal(8, 3, 9)
    c = compare_groups(a, b)
    mw = sps.mannwhitneyu(b, a, alternative="two-sided")
    wt = sps.ttest_ind(b, a, equal_var=False)
    assert c["mannwhitney_p"] == pytest.approx(mw.pvalue, rel=1e-12)
    assert c["mannwhitney_u"] == pytest.approx(mw.statistic)
    assert c["welch_p"] == pytest.approx(wt.pvalue, rel=1e-12)
    assert c["welch_t"] == pytest.approx(wt.statistic, rel=1e-12)
    assert c["welch_df"] == pytest.approx(wt.df, rel=1e-12)
    pooled = np.sqrt((6 * a.var(ddof=1) + 8 * b.var(ddof=1)) / 14)  # unequal sizes: 7 and 9
    assert c["hedges_g"] == pytest.approx((b.mean() - a.mean()) / pooled * (1 - 3 / (4 * 16 - 9)),
                                          rel=1e-12)
    assert c["median_diff"] == pytest.approx(np.median(b) - np.median(a))
    cliff = np.mean([np.sign(x - y) for x in b for y in a])
    assert c["cliffs_delta"] == pytest.approx(cliff)
    assert c["cliffs_delta"] == pytest.approx(2 * mw.statistic / (7 * 9) - 1)
    assert c["hedges_g"] > 0 and c["mean_diff"] == pytest.approx(b.mean() - a.mean())
    with pytest.raises(DataError, match="at least 2"):
        compare_groups([1.0], [2.0, 3.0])
    # a hand-computed case (treated minus control): control [1,2,3] (mean 2, median 2, s^2 = 1),
    # treated [4,6,8] (mean 6, median 6, s^2 = 4); pooled s = sqrt((2*1 + 2*4) / 4) = sqrt(2.5),
    # Cohen's d = 4 / sqrt(2.5), Hedges' J = 1 - 3 / (4 * 6 - 9) = 0.8;
    # Welch-Satterthwaite df = (1/3 + 4/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 50 / 17
    hand = compare_groups([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert hand["hedges_g"] == pytest.approx(0.8 * 4.0 / np.sqrt(2.5), rel=1e-12)
    assert hand["welch_df"] == pytest.approx(50.0 / 17.0, rel=1e-12)
    assert hand["median_diff"] == 4.0 and hand["mean_diff"] == 4.0
    assert hand["welch_t"] == pytest.approx(4.0 / np.sqrt(1.0 / 3.0 + 4.0 / 3.0), rel=1e-12)
    flipped = compare_groups([4.0, 6.0, 8.0], [1.0, 2.0, 3.0])  # the sign follows treated - control
    assert flipped["hedges_g"] == pytest.approx(-hand["hedges_g"], rel=1e-12)
    assert flipped["median_diff"] == -4.0 and flipped["welch_df"] == pytest.approx(50.0 / 17.0)
    const = compare_groups([1.0, 1.0], [1.0, 1.0])
    assert const["hedges_g"] is None and json.dumps(const, allow_nan=False)


def test_group_analysis_errors_and_control() -> None:
    slides = ["s1", "s1", "s2", "s3", "s4"]
    scores = [0.0, 2.0, 0.0, 2.0, 2.0]
    with pytest.raises(DataError, match="at least 2 scored slides"):
        group_analysis(slides, scores, {"s1": "control", "s2": "control", "s3": "high"}, 1.0)
    with pytest.raises(DataError, match="at least 2 groups"):
        group_analysis(slides, scores, {"s1": "a", "s2": "a"}, 1.0)
    res = group_analysis(slides, scores, {"s1": "Control", "s2": "Control", "s3": "high",
                                          "s4": "high", "s9": "high"}, 1.0)
    assert res["control"] == "Control" and res["groups"]["Control"] == [50.0, 0.0]
    assert res["slides_without_scores"] == ["s9"] and list(res["comparisons"]) == ["high"]
    assert pick_control(["b", "a"]) == "a"


def _write_tables(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,score,label"]
    for i in range(6):
        hi = i >= 3  # slides 3..5 treated: more high scores
        for j in range(20):
            s = rng.normal(2.0 if hi and j % 2 else 0.0, 0.3)
            rows.append(f"tiles/slide{i}_x{j * 256}_y0.png,{s:.4f},0")
    (tmp_path / "scores.csv").write_text("\n".join(rows[:61]) + "\n")
    (tmp_path / "more.csv").write_text("\n".join([rows[0]] + rows[61:]) + "\n")
    groups = ["slide,group"] + [f"slide{i},{'treated' if i >= 3 else 'control'}"
                                for i in range(6)]
    (tmp_path / "groups.csv").write_text("\n".join(groups) + "\n")


def test_groups_cli_end_to_end(tmp_path, capsys) -> None:
    _write_tables(tmp_path)
    Threshold(value=1.0, method="iqr", n=100).save(tmp_path / "thr.json")
    out = tmp_path / "out"
    rc = main(["groups", "--scores", str(tmp_path / "scores.csv"), str(tmp_path / "more.csv"),
               "--groups", str(tmp_path / "groups.csv"), "--threshold-file",
               str(tmp_path / "thr.json"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Mann-Whitney p=" in text and "treated vs control" in text
    res = json.loads((out / "groups.json").read_text())
    assert res["control"] == "control" and len(res["per_slide"]) == 6
    assert all(v < 15 for v in res["groups"]["control"])
    assert all(v > 35 for v in res["groups"]["treated"])
    mw = sps.mannwhitneyu(res["groups"]["treated"], res["groups"]["control"],
                          method=sps.PermutationMethod(n_resamples=np.inf))  # exact, 3 vs 3
    assert res["comparisons"]["treated"]["mannwhitney_p"] == pytest.approx(mw.pvalue)
    lines = (out / "per_slide.csv").read_text().splitlines()
    assert lines[0].startswith("slide,group,n_patches") and len(lines) == 7
    assert (out / "groups_box.png").stat().st_size > 1000


def test_groups_cli_one_line_errors(tmp_path, capsys) -> None:
    _write_tables(tmp_path)
    (tmp_path / "bad.csv").write_text("slide,grp\nslide0,a\n")
    base = ["groups", "--scores", str(tmp_path / "scores.csv"), "--out", str(tmp_path / "o")]
    assert main(base + ["--groups", str(tmp_path / "bad.csv"), "--threshold", "1"]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) group" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "g1.csv").write_text("slide,group\nslide0,control\nslide1,control\nslide2,t\n")
    assert main(base + ["--groups", str(tmp_path / "g1.csv"), "--threshold", "1"]) == 2
    assert "at least 2 scored slides: t (1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--groups", str(tmp_path / "g1.csv")])  # threshold is required


def test_animals_are_the_unit_when_the_table_names_them(tmp_path, capsys) -> None:
    # 6 slides of 3 animals: the tests compare 3 pooled animal percentages, not 6 slides
    _write_tables(tmp_path)
    animal = {0: "c1", 1: "c1", 2: "c2", 3: "t1", 4: "t1", 5: "t2"}
    rows = ["slide,group,animal"] + [f"slide{i},{'treated' if i >= 3 else 'control'},{animal[i]}"
                                     for i in range(6)]
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    slides, scores = read_scores([tmp_path / "scores.csv", tmp_path / "more.csv"])
    by_slide = group_analysis(slides, scores, read_groups(tmp_path / "groups.csv"), 1.0)
    pct = {p["slide"]: p["percent_above"] for p in by_slide["per_slide"]}
    assert by_slide["unit"] == "slide" and by_slide["per_animal"] is None

    res = group_analysis(slides, scores, read_groups(tmp_path / "groups.csv"), 1.0,
                         slide_animals=read_animals(tmp_path / "groups.csv"))
    assert res["unit"] == "animal"
    # 20 patches per slide: an animal's pooled % is the mean of its slides' %
    assert res["groups"]["control"] == pytest.approx([(pct["slide0"] + pct["slide1"]) / 2,
                                                      pct["slide2"]])
    assert res["groups"]["treated"] == pytest.approx([(pct["slide3"] + pct["slide4"]) / 2,
                                                      pct["slide5"]])
    assert [a["animal"] for a in res["per_animal"]] == ["c1", "c2", "t1", "t2"]
    assert res["per_animal"][0]["n_patches"] == 40 and res["per_slide"][0]["animal"] == "c1"
    assert res["comparisons"]["treated"]["n_control"] == 2

    Threshold(value=1.0, method="iqr", n=100).save(tmp_path / "thr.json")
    capsys.readouterr()
    assert main(["groups", "--scores", str(tmp_path / "scores.csv"), str(tmp_path / "more.csv"),
                 "--groups", str(tmp_path / "groups.csv"), "--threshold-file",
                 str(tmp_path / "thr.json"), "--out", str(tmp_path / "out")]) == 0
    assert "unit of analysis: animal" in capsys.readouterr().out
    lines = (tmp_path / "out" / "per_animal.csv").read_text().splitlines()
    assert lines[0].startswith("animal,group,n_patches") and len(lines) == 5
    assert (tmp_path / "out" / "per_slide.csv").read_text().startswith("slide,group,animal,")

    (tmp_path / "bad.csv").write_text("slide,group,animal\nslide0,control,a\nslide3,treated,a\n")
    with pytest.raises(DataError, match="animal 'a' is in two groups"):
        read_animals(tmp_path / "bad.csv")


def test_an_animal_pools_its_patches_not_its_slide_percentages() -> None:
    """Slides of unequal size: animal c1 has a 10-patch slide with 5 above the threshold and a
    30-patch slide with 3 above, so 8 of its 40 patches (20 %), not the mean of 50 % and 10 %;
    its mean score is over its 40 patches, not the mean of the two slides' means."""
    rng = np.random.default_rng(0)
    layout = {"cA": (10, 5), "cB": (30, 3), "cC": (10, 0), "tA": (20, 10), "tB": (20, 12)}
    animal = {"cA": "c1", "cB": "c1", "cC": "c2", "tA": "t1", "tB": "t2"}
    groups = {s: "control" if s.startswith("c") else "treated" for s in layout}
    slides: list[str] = []
    scores: list[float] = []
    for slide, (n, above) in layout.items():
        slides += [slide] * n
        scores += list(1.5 + rng.random(above)) + list(0.9 * rng.random(n - above))
    res = group_analysis(slides, scores, groups, 1.0, slide_animals=animal)
    assert res["unit"] == "animal"
    assert res["groups"]["control"] == pytest.approx([20.0, 0.0])
    assert res["groups"]["treated"] == pytest.approx([50.0, 60.0])
    c1 = np.asarray(scores)[np.isin(slides, ["cA", "cB"])]
    first = res["per_animal"][0]
    assert first["animal"] == "c1" and (first["n_patches"], first["n_above"]) == (40, 8)
    assert first["percent_above"] == pytest.approx(20.0)
    assert first["mean_score"] == pytest.approx(c1.mean(), rel=1e-12)
    assert first["max_score"] == c1.max()


@pytest.mark.parametrize(("control", "treated", "exact_p"), [
    ([0, 0, 0], [100, 100, 100], 0.1),  # the smallest p 3 vs 3 animals can give
    ([1, 1, 2, 2], [2, 3, 3, 3], 6 / 70),
    ([0, 0, 0, 0], [3, 3, 3, 3], 2 / 70),
])
def test_mann_whitney_is_exact_with_ties_in_small_groups(control: list[float],
                                                          treated: list[float],
                                                          exact_p: float) -> None:
    """Tied values (controls at 0 %) made scipy's default use the normal approximation:
    p = 0.047 for 3 vs 3, below what any exact test of 3 vs 3 can reach. Reference: the share
    of all group assignments whose |U - n m / 2| is at least the observed one."""
    from itertools import combinations

    from gen_ad.metrics.stats import compare_groups

    r = compare_groups(control, treated)
    assert r["mannwhitney_p"] == pytest.approx(exact_p)
    assert r["mannwhitney_method"] == "exact permutation"
    values = np.array(control + treated, dtype=float)
    n, m = len(treated), len(control)

    def u_of(idx: tuple[int, ...]) -> float:
        t = values[list(idx)]
        c = np.delete(values, list(idx))
        return float((np.sign(t[:, None] - c[None, :]) + 1).sum() / 2)

    u_obs = u_of(tuple(range(m, m + n)))
    us = [u_of(idx) for idx in combinations(range(n + m), n)]
    brute = np.mean([abs(u - n * m / 2) >= abs(u_obs - n * m / 2) - 1e-9 for u in us])
    assert r["mannwhitney_p"] == pytest.approx(brute)


def test_welch_is_undefined_for_two_constant_groups() -> None:
    from gen_ad.metrics.stats import compare_groups

    r = compare_groups([0, 0, 0], [100, 100, 100])
    assert r["welch_t"] is None and r["welch_p"] is None  # was p = 0.0, fed to Holm
