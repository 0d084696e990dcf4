"""Group statistics for toxicology studies: per-slide % of anomalous patches, control vs treated.

Each slide gets the percentage of its patches whose score is above a saved label-free threshold
(Juturu et al. 2025). Slides are assigned to groups (``slide,group`` table); every non-control
group is compared with the control group by the Mann-Whitney U test (two-sided) and Welch's t-test,
with effect sizes: the difference of means and medians, Hedges' g (bias-corrected standardised
mean difference, pooled SD) and Cliff's delta (``P(treated > control) - P(treated < control)``).
With several dose groups, :mod:`gen_ad.metrics.dose_response` adds Holm-adjusted p-values,
Dunnett's many-to-one test, the Kruskal-Wallis omnibus test, the Jonckheere-Terpstra trend test
over the dose order, and confidence intervals of every effect size.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from gen_ad.errors import DataError
from gen_ad.metrics.curves import json_safe
from gen_ad.metrics.dose_response import (
    effect_intervals,
    holm,
    jonckheere_terpstra,
    kruskal_wallis,
    many_to_one,
)

_TILE_NAME = re.compile(r"^(?P<slide>.+?)_x-?\d+_y-?\d+")


def slide_from_path(path: str) -> str:
    """The slide id of a tile file named ``<slide>_x<X>_y<Y>[...].png``.

    Raises:
        DataError: the name does not follow that pattern.
    """
    m = _TILE_NAME.match(Path(path).stem)
    if m is None:
        raise DataError(f"cannot derive the slide from '{path}': add a 'slide' column or name "
                        "tiles <slide>_x<X>_y<Y>.png")
    return m.group("slide")


def _read_csv(path: str | os.PathLike[str], required: Sequence[str]) -> list[dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file not found: {p}")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in cols]
        if missing:
            raise DataError(f"{p}: missing column(s) {', '.join(missing)} (has: "
                            f"{', '.join(cols) or 'none'})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise DataError(f"{p}: no rows")
    return rows


def read_scores(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], np.ndarray]:
    """Read ``path,score[,slide]`` CSVs (concatenated).

    Returns:
        ``(slides [N], scores [N])``; the slide comes from the ``slide`` column when present, else
        from the tile file name.
    """
    slides: list[str] = []
    scores: list[float] = []
    for path in paths:
        rows = _read_csv(path, ["path", "score"])
        for i, r in enumerate(rows, start=2):
            try:
                s = float(r["score"])
            except ValueError as e:
                raise DataError(f"{path}:{i}: score '{r['score']}' is not a number") from e
            if not math.isfinite(s):
                raise DataError(f"{path}:{i}: score is not finite")
            slides.append(r["slide"] if r.get("slide") else slide_from_path(r["path"]))
            scores.append(s)
    return slides, np.asarray(scores, dtype=np.float64)


def read_groups(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``slide,group`` CSV into ``{slide: group}`` (a slide listed twice must agree)."""
    out: dict[str, str] = {}
    for i, r in enumerate(_read_csv(path, ["slide", "group"]), start=2):
        slide, group = r["slide"], r["group"]
        if not slide or not group:
            raise DataError(f"{path}:{i}: empty slide or group")
        if out.get(slide, group) != group:
            raise DataError(f"{path}:{i}: slide '{slide}' is in two groups")
        out[slide] = group
    return out


def read_animals(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """``{slide: animal}`` from an optional ``animal`` column of the groups table (``None``
    without one). Every slide needs an animal, and one animal's slides one group."""
    rows = _read_csv(path, ["slide", "group"])
    if "animal" not in rows[0]:
        return None
    out: dict[str, str] = {}
    group_of: dict[str, str] = {}
    for i, r in enumerate(rows, start=2):
        animal = r["animal"]
        if not animal:
            raise DataError(f"{path}:{i}: empty animal (fill the column for every slide, or "
                            "drop it to count slides as independent)")
        if group_of.setdefault(animal, r["group"]) != r["group"]:
            raise DataError(f"{path}:{i}: animal '{animal}' is in two groups "
                            f"({group_of[animal]} and {r['group']})")
        if out.setdefault(r["slide"], animal) != animal:
            raise DataError(f"{path}:{i}: slide '{r['slide']}' has two animals")
    return out


def read_group_order(path: str | os.PathLike[str]) -> list[str] | None:
    """The groups in dose order from an optional numeric ``dose`` column (``None`` without one).

    Every row of a group must give the same dose, and two groups may not share one.
    """
    rows = _read_csv(path, ["slide", "group"])
    if "dose" not in rows[0]:
        return None
    doses: dict[str, float] = {}
    for i, r in enumerate(rows, start=2):
        try:
            dose = float(r["dose"])
        except ValueError as e:
            raise DataError(f"{path}:{i}: dose '{r['dose']}' is not a number") from e
        if doses.setdefault(r["group"], dose) != dose:
            raise DataError(f"{path}:{i}: group '{r['group']}' has two doses "
                            f"({doses[r['group']]:g} and {dose:g})")
    shared = len(set(doses.values())) < len(doses)
    if shared:
        raise DataError(f"{path}: two groups share a dose; the trend test needs one order")
    return sorted(doses, key=lambda g: doses[g])


@dataclass
class SlideStat:
    """Per-slide summary."""

    slide: str
    n_patches: int
    n_above: int
    percent_above: float
    mean_score: float
    max_score: float


def per_slide_percent(slides: Sequence[str], scores: Any, threshold: float) -> list[SlideStat]:
    """Percentage of each slide's patches with ``score > threshold`` (slides in sorted order)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(slides) != s.size or s.size == 0:
        raise DataError(f"need equal, non-zero numbers of slides and scores ({len(slides)} vs "
                        f"{s.size})")
    names, inv = np.unique(np.asarray(slides, dtype=str), return_inverse=True)
    n = np.bincount(inv, minlength=names.size)
    above = np.bincount(inv, weights=(s > threshold).astype(np.float64), minlength=names.size)
    total = np.bincount(inv, weights=s, minlength=names.size)
    mx = np.full(names.size, -np.inf)
    np.maximum.at(mx, inv, s)
    return [SlideStat(str(names[i]), int(n[i]), int(above[i]), float(100.0 * above[i] / n[i]),
                      float(total[i] / n[i]), float(mx[i])) for i in range(names.size)]


def compare_groups(control: Any, treated: Any) -> dict[str, Any]:
    """Two-sided Mann-Whitney U and Welch's t-test of ``treated`` vs ``control``, effect sizes.

    Args:
        control: values of the control group (>= 2).
        treated: values of the treated group (>= 2).
    Returns:
        dict with ``n_*, mean_*, median_*, mean_diff, median_diff, mannwhitney_u,
        mannwhitney_p, mannwhitney_method, welch_t, welch_df, welch_p, hedges_g, cliffs_delta``
        (NaN → ``None`` when a test is undefined, e.g. both groups constant).
    """
    a = np.asarray(control, dtype=np.float64).reshape(-1)
    b = np.asarray(treated, dtype=np.float64).reshape(-1)
    if a.size < 2 or b.size < 2:
        raise DataError(f"each group needs at least 2 slides (got {a.size} and {b.size})")
    mw, mw_method = _mannwhitney(b, a)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # a constant group (e.g. 0 % everywhere in controls) is legitimate data, not a problem
        warnings.simplefilter("ignore", RuntimeWarning)
        wt = sps.ttest_ind(b, a, equal_var=False)
        va, vb = a.var(ddof=1), b.var(ddof=1)
        na, nb = a.size, b.size
        sp = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
        d = (b.mean() - a.mean()) / sp if sp > 0 else math.nan
        g = d * (1.0 - 3.0 / (4.0 * (na + nb) - 9.0))
        df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
        t, t_p = (math.nan, math.nan) if va == vb == 0 else (wt.statistic, wt.pvalue)
    cliff = float(np.sign(b[:, None] - a[None, :]).mean())
    out = {"n_control": int(na), "n_treated": int(nb), "mean_control": float(a.mean()),
           "mean_treated": float(b.mean()), "median_control": float(np.median(a)),
           "median_treated": float(np.median(b)), "mean_diff": float(b.mean() - a.mean()),
           "median_diff": float(np.median(b) - np.median(a)),
           "mannwhitney_u": float(mw.statistic), "mannwhitney_p": float(mw.pvalue),
           "mannwhitney_method": mw_method,
           "welch_t": float(t), "welch_df": float(df), "welch_p": float(t_p),
           "hedges_g": float(g), "cliffs_delta": cliff}
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in out.items()}


_EXACT_MW_SPLITS = 200_000  # up to this many group assignments, Mann-Whitney is enumerated


def _mannwhitney(treated: np.ndarray, control: np.ndarray) -> tuple[Any, str]:
    """Two-sided Mann-Whitney U of ``treated`` vs ``control`` and how its p was computed.

    Small groups (at most :data:`_EXACT_MW_SPLITS` assignments of the values to the groups) get
    the exact permutation p, ties included: scipy's default falls back to the normal
    approximation as soon as two values tie (several controls at 0 %, the usual case), which
    gave p = 0.047 for 3 vs 3 animals, below the smallest p any exact test reaches (0.1).
    """
    if math.comb(treated.size + control.size, control.size) <= _EXACT_MW_SPLITS:
        method = sps.PermutationMethod(n_resamples=np.inf)
        return sps.mannwhitneyu(treated, control, alternative="two-sided",
                                method=method), "exact permutation"
    return sps.mannwhitneyu(treated, control, alternative="two-sided"), "asymptotic"


def pick_control(groups: Sequence[str], control: str | None = None) -> str:
    """The reference group: ``control`` if given, else one named 'control' (any case), else the
    alphabetically first."""
    names = sorted(set(groups))
    if control is not None:
        if control not in names:
            raise DataError(f"control group '{control}' not found (groups: {', '.join(names)})")
        return control
    for n in names:
        if n.lower() == "control":
            return n
    return names[0]


@dataclass
class GroupSettings:
    """How the groups are compared.

    Attributes:
        control: name of the reference group (see :func:`pick_control`).
        order: every group in dose order, for the trend test (``None``: no trend test).
        n_boot: bootstrap resamples of the median-difference interval.
        n_perm: random permutations of the trend test when it cannot be exact.
        seed: seed of the bootstrap, the permutations and Dunnett's integration.
        ci: coverage of every interval.
    """

    control: str | None = None
    order: Sequence[str] | None = None
    n_boot: int = 2000
    n_perm: int = 20000
    seed: int = 0
    ci: float = 0.95


def per_animal_percent(per_slide: Sequence[SlideStat],
                       slide_animals: Mapping[str, str]) -> list[SlideStat]:
    """Pool each animal's slides: % of all its patches above the threshold (its ``slide``
    field holds the animal id; mean and max over all its patches), animals in sorted order."""
    pooled: dict[str, list[SlideStat]] = {}
    for p in per_slide:
        pooled.setdefault(slide_animals[p.slide], []).append(p)
    out = []
    for animal in sorted(pooled):
        ps = pooled[animal]
        n, above = sum(p.n_patches for p in ps), sum(p.n_above for p in ps)
        out.append(SlideStat(animal, n, above, 100.0 * above / n,
                             sum(p.mean_score * p.n_patches for p in ps) / n,
                             max(p.max_score for p in ps)))
    return out


def _grouped(slides: Sequence[str], scores: Any, slide_groups: Mapping[str, str],
             threshold: float, slide_animals: Mapping[str, str] | None = None,
             ) -> tuple[list[SlideStat], list[SlideStat], dict[str, list[float]]]:
    """Per-slide stats, the units compared (slides, or animals when ``slide_animals`` is
    given) and their % above threshold by group."""
    per = per_slide_percent(slides, scores, threshold)
    assigned = [p for p in per if p.slide in slide_groups]
    unit, unit_group = "slide", dict(slide_groups)
    if slide_animals is not None:
        unit = "animal"
        unit_group = {slide_animals[s]: g for s, g in slide_groups.items()}
        assigned = per_animal_percent(assigned, slide_animals)
    by_group: dict[str, list[float]] = {}
    for p in assigned:
        by_group.setdefault(unit_group[p.slide], []).append(p.percent_above)
    if len(by_group) < 2:
        raise DataError(f"need at least 2 groups with scored slides, found {len(by_group)} "
                        f"({', '.join(sorted(by_group)) or 'none'}); check that slide ids match")
    small = [f"{g} ({len(v)})" for g, v in sorted(by_group.items()) if len(v) < 2]
    if small:
        raise DataError(f"each group needs at least 2 scored {unit}s: {', '.join(small)}")
    return per, assigned, {g: by_group[g] for g in sorted(by_group)}


def _comparisons(by_group: Mapping[str, list[float]], ref: str,
                 st: GroupSettings) -> dict[str, dict[str, Any]]:
    """Each group vs the control: the pairwise tests, Holm, Dunnett and effect-size intervals."""
    treated = [g for g in by_group if g != ref]
    out = {g: compare_groups(by_group[ref], by_group[g]) for g in treated}
    dunnett = many_to_one(by_group[ref], [by_group[g] for g in treated], st.ci, st.seed)
    for key in ("mannwhitney_p", "welch_p"):
        for g, adj in zip(treated, holm([out[g][key] for g in treated])):
            out[g][f"{key}_holm"] = adj
    for i, g in enumerate(treated):
        out[g]["dunnett_p"] = dunnett["dunnett_p"][i]
        out[g]["dunnett_ci"] = dunnett["dunnett_ci"][i]
        out[g]["dunnett_p_method"] = dunnett["dunnett_p_method"]
        out[g]["ci"] = effect_intervals(by_group[ref], by_group[g], st.n_boot, st.seed, st.ci)
    return out


def _trend(by_group: Mapping[str, list[float]], st: GroupSettings) -> dict[str, Any]:
    if st.order is None:
        return {"order": None, "note": "no dose order given (--order or a dose column in the "
                                       "groups table): no trend test"}
    order = list(st.order)
    unknown = sorted(set(order) - set(by_group))
    missing = sorted(set(by_group) - set(order))
    if unknown or missing or len(order) != len(set(order)):
        raise DataError(f"the dose order must name every group with scored slides once "
                        f"(groups: {', '.join(by_group)}; unknown: {', '.join(unknown) or '-'}; "
                        f"missing: {', '.join(missing) or '-'})")
    jt = jonckheere_terpstra([by_group[g] for g in order], n_perm=st.n_perm, seed=st.seed)
    return {"order": order, "test": "Jonckheere-Terpstra", **jt}


def group_analysis(slides: Sequence[str], scores: Any, slide_groups: Mapping[str, str],
                   threshold: float, settings: GroupSettings | None = None,
                   slide_animals: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per-slide % above threshold, grouped, every other group compared with the control.

    With ``slide_animals`` the unit of analysis is the animal (the experimental unit of a
    toxicology study): each animal's slides are pooled into one percentage before any test,
    so several slides of one animal do not count as independent replicates.

    Args:
        slides: ``[N]`` slide id of each patch.
        scores: ``[N]`` patch scores.
        slide_groups: ``{slide: group}``.
        threshold: label-free threshold (a score ``>`` it is anomalous).
        settings: control, dose order and interval settings (:class:`GroupSettings`).
        slide_animals: ``{slide: animal}`` (optional).
    Returns:
        JSON-ready dict: ``threshold, unit (slide or animal), control, groups {name:
        [percent per unit...]}, per_slide [...], per_animal [...] (with animals),
        comparisons {group: compare_groups(...) + Holm, Dunnett, ci}, omnibus (Kruskal-Wallis,
        3+ groups), trend (Jonckheere-Terpstra over the order), settings, unassigned_slides,
        slides_without_scores``.
    """
    st = settings or GroupSettings()
    if slide_animals is not None:
        missing = sorted(set(slide_groups) - set(slide_animals))
        if missing:
            raise DataError(f"slides without an animal: {', '.join(missing[:5])}")
    per, units, by_group = _grouped(slides, scores, slide_groups, threshold, slide_animals)
    ref = pick_control(list(by_group), st.control)
    scored = {p.slide for p in per}
    assigned = [p for p in per if p.slide in slide_groups]
    animals = None
    if slide_animals is not None:
        group_of = {slide_animals[s]: g for s, g in slide_groups.items()}
        animals = [{"animal": p.slide, "group": group_of[p.slide],
                    **{k: v for k, v in asdict(p).items() if k != "slide"}} for p in units]
    return json_safe({
        "threshold": float(threshold), "unit": "animal" if animals else "slide",
        "control": ref, "groups": by_group,
        "per_slide": [{**asdict(p), "group": slide_groups[p.slide],
                       **({"animal": slide_animals[p.slide]} if slide_animals else {})}
                      for p in assigned],
        "per_animal": animals,
        "comparisons": _comparisons(by_group, ref, st),
        "omnibus": kruskal_wallis(list(by_group.values())) if len(by_group) > 2 else None,
        "trend": _trend(by_group, st),
        "settings": {**asdict(st), "order": None if st.order is None else list(st.order)},
        "unassigned_slides": sorted(p.slide for p in per if p.slide not in slide_groups),
        "slides_without_scores": sorted(s for s in slide_groups if s not in scored),
    })

