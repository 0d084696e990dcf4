"""Several dose groups against one control: multiplicity, dose-response trend, effect-size CIs.

A toxicology study has a control and usually several dose groups, a handful of animals each. On
top of the pairwise tests of :mod:`gen_ad.metrics.stats` this module gives what a study
statistician asks for next:

- **Multiplicity**: Holm's step-down adjustment (Holm 1979; valid under any dependence) of the
  many-to-one p-values, and Dunnett's many-to-one test (Dunnett 1955; normal, equal variances;
  ``scipy.stats.dunnett``) with simultaneous confidence intervals of the mean differences.
- **Trend**: the Jonckheere-Terpstra test for an ordered alternative (groups in dose order;
  Jonckheere 1954, Terpstra 1952): ``J = sum over group pairs a < b of #(x_b > x_a) + #ties / 2``.
  Its p-value is exact (every distinct assignment of the values to the groups) when there are at
  most ``exact_limit`` assignments, else from ``n_perm`` seeded random permutations; the normal
  approximation with the tie-corrected variance (Hollander, Wolfe & Chicken, *Nonparametric
  Statistical Methods*, 3rd ed., Sec. 6.2) is reported beside it. Small groups make the exact
  value the one to read.
- **Effect sizes with intervals**: Welch's confidence interval of the mean difference, and
  percentile-bootstrap intervals (each group resampled on its own, seeded) of the median
  difference, Hedges' g and Cliff's delta. With 3-5 animals per group a percentile bootstrap
  covers less than its nominal level: read those intervals as a lower bound on the uncertainty.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from gen_ad.errors import DataError
from gen_ad.metrics.curves import percentile_interval

_PAIR_CELLS = 20_000_000  # bootstrap Cliff's delta works on [chunk, nb, na] of at most this


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (``None`` stays ``None`` and is not counted)."""
    valid = sorted((float(p), i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        out[i] = running
    return out


def jt_statistic(samples: Sequence[np.ndarray]) -> float:
    """Jonckheere-Terpstra ``J``: over ordered group pairs, later-group values above earlier ones
    (ties count one half)."""
    j = 0.0
    for a, b in itertools.combinations(range(len(samples)), 2):
        d = np.asarray(samples[b], float)[:, None] - np.asarray(samples[a], float)[None, :]
        j += float((d > 0).sum()) + 0.5 * float((d == 0).sum())
    return j


def jt_null_moments(sizes: Sequence[int], values: np.ndarray) -> tuple[float, float]:
    """Mean and variance of ``J`` under the null, ties corrected (Hollander, Wolfe & Chicken)."""
    n = np.asarray(sizes, dtype=np.float64)
    t = np.unique(values, return_counts=True)[1].astype(np.float64)
    big = float(n.sum())
    mean = (big ** 2 - float((n ** 2).sum())) / 4.0
    var = (big * (big - 1) * (2 * big + 5) - float((n * (n - 1) * (2 * n + 5)).sum())
           - float((t * (t - 1) * (2 * t + 5)).sum())) / 72.0
    if big > 2:
        var += (float((n * (n - 1) * (n - 2)).sum()) * float((t * (t - 1) * (t - 2)).sum())
                / (36.0 * big * (big - 1) * (big - 2)))
    var += (float((n * (n - 1)).sum()) * float((t * (t - 1)).sum())) / (8.0 * big * (big - 1))
    return mean, var


def _n_assignments(sizes: Sequence[int]) -> int:
    out, left = 1, sum(sizes)
    for s in sizes:
        out *= math.comb(left, s)
        left -= s
    return out


def _all_assignments(sizes: Sequence[int]) -> Iterator[np.ndarray]:
    """Every distinct way to give ``sizes[g]`` of the positions to group ``g`` (labels ``[N]``)."""
    total = sum(sizes)

    def rec(free: tuple[int, ...], g: int, labels: np.ndarray) -> Iterator[np.ndarray]:
        if g == len(sizes) - 1:
            out = labels.copy()
            out[list(free)] = g
            yield out
            return
        for pick in itertools.combinations(free, sizes[g]):
            labels[list(pick)] = g
            rest = tuple(p for p in free if p not in pick)
            yield from rec(rest, g + 1, labels)

    yield from rec(tuple(range(total)), 0, np.zeros(total, dtype=np.int64))


def _jt_of_labels(values: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """``J`` of each row of ``labels`` (``[B, N]`` group of each value) at once."""
    d = values[None, :] - values[:, None]  # d[i, j] = x_j - x_i
    h = (d > 0).astype(np.float64) + 0.5 * (d == 0)
    onehot = np.eye(n_groups)[labels]  # [B, N, G]
    pair = np.einsum("bia,ij,bjc->bac", onehot, h, onehot)  # group a's values below group c's
    return np.triu(pair, k=1).sum(axis=(1, 2))


def _permutation_labels(sizes: Sequence[int], n_perm: int, exact_limit: int,
                        seed: int) -> tuple[np.ndarray, str]:
    count = _n_assignments(sizes)
    if count <= exact_limit:
        return np.stack(list(_all_assignments(sizes))), f"exact ({count} assignments)"
    base = np.repeat(np.arange(len(sizes)), sizes)
    rng = np.random.default_rng(seed)
    return rng.permuted(np.tile(base, (n_perm, 1)), axis=1), (
        f"Monte-Carlo ({n_perm} permutations, seed {seed})")


def jonckheere_terpstra(samples: Sequence[Any], n_perm: int = 20000, exact_limit: int = 20000,
                        seed: int = 0, chunk: int = 4096) -> dict[str, Any]:
    """Jonckheere-Terpstra trend test of groups given in their (dose) order.

    Args:
        samples: per group, its values (at least 2 groups, each non-empty).
        n_perm: random permutations when the exact distribution is too large.
        exact_limit: at most this many distinct assignments are enumerated exactly.
        seed: seed of the permutations.
        chunk: permutations scored per vectorised block.
    Returns:
        ``{"j", "null_mean", "null_sd", "z", "p_normal_two_sided", "p_normal_increasing",
        "p_two_sided", "p_increasing", "p_decreasing", "method"}``: ``p_*`` without ``normal``
        are the permutation (exact or Monte-Carlo) values; *increasing* = values rise with the
        order.
    """
    groups = [np.asarray(s, dtype=np.float64).reshape(-1) for s in samples]
    if len(groups) < 2 or any(g.size == 0 for g in groups):
        raise DataError("the trend test needs at least 2 non-empty groups")
    sizes = [g.size for g in groups]
    values = np.concatenate(groups)
    j = jt_statistic(groups)
    mean, var = jt_null_moments(sizes, values)
    sd = math.sqrt(var) if var > 0 else math.nan
    z = (j - mean) / sd if sd > 0 else math.nan
    labels, method = _permutation_labels(sizes, n_perm, exact_limit, seed)
    perm = np.concatenate([_jt_of_labels(values, labels[i:i + chunk], len(groups))
                           for i in range(0, labels.shape[0], chunk)])
    exact = method.startswith("exact")
    eps = 1e-9  # J is a multiple of 1/2: exact in float64

    def p_of(hits: np.ndarray) -> float:
        k = int(hits.sum())
        return k / hits.size if exact else (k + 1) / (hits.size + 1)

    return {"j": j, "null_mean": mean, "null_sd": sd, "z": z,
            "p_normal_two_sided": float(2 * sps.norm.sf(abs(z))) if sd > 0 else None,
            "p_normal_increasing": float(sps.norm.sf(z)) if sd > 0 else None,
            "p_two_sided": p_of(np.abs(perm - mean) >= abs(j - mean) - eps),
            "p_increasing": p_of(perm >= j - eps), "p_decreasing": p_of(perm <= j + eps),
            "method": method}


_QMC_RESOLUTION = 1e-3  # scipy's Dunnett p = 1 - (a quasi-Monte Carlo integral): no finer


def _dunnett(control: np.ndarray, treated: Sequence[np.ndarray], ci: float,
             seed: int) -> tuple[list[float], list[list[float]], str]:
    """Dunnett p-values and simultaneous CIs of ``mean(treated) - mean(control)``, and how the
    p-values were obtained.

    scipy computes each p as one minus a multivariate-t integral estimated by quasi-Monte Carlo,
    so a small p comes out as 0 (scipy 1.17: 0.0 for 3 vs 3 animals where the pooled t-test
    gives 3.2e-7). The exact bounds ``p_t <= p <= min(1, k p_t)`` (``p_t``: the pooled-variance
    t-test of that comparison, ``k`` comparisons; Bonferroni) hold for every comparison: with one
    treated group they coincide (Dunnett's test *is* that t-test), and below the integral's
    resolution the upper, conservative bound is reported (tight in the tail)."""
    key = "rng" if "rng" in inspect.signature(sps.dunnett).parameters else "random_state"
    res = sps.dunnett(*treated, control=control, **{key: np.random.default_rng(seed)})
    interval = res.confidence_interval(confidence_level=ci)
    k = len(treated)
    df = control.size + sum(b.size for b in treated) - (k + 1)
    p_t = 2.0 * sps.t.sf(np.abs(np.asarray(res.statistic, dtype=np.float64)), df)
    upper = np.minimum(1.0, k * p_t)
    qmc = np.asarray(res.pvalue, dtype=np.float64)
    coarse = qmc < _QMC_RESOLUTION
    p = np.where(coarse, upper, np.clip(qmc, p_t, upper))
    method = ("exact (one comparison: the pooled-variance t-test)" if k == 1 else
              "scipy (quasi-Monte Carlo)" + (f"; Bonferroni bound where below {_QMC_RESOLUTION}"
                                             if coarse.any() else ""))
    return ([float(v) for v in p],
            [[float(lo), float(hi)] for lo, hi in zip(interval.low, interval.high)], method)


def many_to_one(control: Any, treated: Sequence[Any], ci: float = 0.95,
                seed: int = 0) -> dict[str, Any]:
    """Dunnett's test of every treated group against the control (p-values, simultaneous CIs).

    Returns:
        ``{"dunnett_p": [...], "dunnett_ci": [[low, high], ...], "dunnett_p_method": str}`` in
        the order of ``treated`` (see :func:`_dunnett` for how small p-values are obtained);
        ``None`` entries when the test is undefined (e.g. no variance in any group).
    """
    a = np.asarray(control, dtype=np.float64)
    bs = [np.asarray(t, dtype=np.float64) for t in treated]
    spread = float(a.var()) + sum(float(b.var()) for b in bs)
    if spread == 0.0:
        return {"dunnett_p": [None] * len(bs), "dunnett_ci": [None] * len(bs),
                "dunnett_p_method": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p, intervals, method = _dunnett(a, bs, ci, seed)
    return {"dunnett_p": p, "dunnett_ci": intervals, "dunnett_p_method": method}


def _hedges_g(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hedges' g of rows ``b`` vs rows ``a`` (``[B, n]`` each)."""
    na, nb = a.shape[1], b.shape[1]
    sp = np.sqrt(((na - 1) * a.var(axis=1, ddof=1) + (nb - 1) * b.var(axis=1, ddof=1))
                 / (na + nb - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sp > 0, (b.mean(axis=1) - a.mean(axis=1)) / sp, np.nan)
    return d * (1.0 - 3.0 / (4.0 * (na + nb) - 9.0))


def _cliffs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    step = max(1, _PAIR_CELLS // (a.shape[1] * b.shape[1]))
    parts = [np.sign(b[i:i + step, :, None] - a[i:i + step, None, :]).mean(axis=(1, 2))
             for i in range(0, a.shape[0], step)]
    return np.concatenate(parts)


def effect_intervals(control: Any, treated: Any, n_boot: int = 2000, seed: int = 0,
                     ci: float = 0.95) -> dict[str, Any]:
    """Confidence intervals of the effect sizes of ``treated`` vs ``control``.

    Returns:
        ``{"mean_diff": [low, high]`` (Welch t), ``"median_diff", "hedges_g", "cliffs_delta"``
        (percentile bootstrap, each group resampled on its own) and the settings; ``None``
        where undefined.
    """
    a = np.asarray(control, dtype=np.float64).reshape(-1)
    b = np.asarray(treated, dtype=np.float64).reshape(-1)
    out: dict[str, Any] = {"ci": ci, "n_boot": n_boot, "seed": seed,
                           "mean_diff_method": "Welch t", "bootstrap": "percentile, per group"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w = sps.ttest_ind(b, a, equal_var=False).confidence_interval(confidence_level=ci)
    defined = a.var() + b.var() > 0 and math.isfinite(w.low) and math.isfinite(w.high)
    out["mean_diff"] = [float(w.low), float(w.high)] if defined else None
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, size=(n_boot, a.size))]
    rb = b[rng.integers(0, b.size, size=(n_boot, b.size))]
    draws = {"median_diff": np.median(rb, axis=1) - np.median(ra, axis=1),
             "hedges_g": _hedges_g(ra, rb), "cliffs_delta": _cliffs(ra, rb)}
    for name, values in draws.items():
        lo, hi, n_ok = percentile_interval(values, ci)
        out[name] = [lo, hi] if n_ok else None
    return out


def kruskal_wallis(samples: Sequence[Any]) -> dict[str, Any]:
    """Kruskal-Wallis H test across all groups (``None`` p when every value is equal)."""
    groups = [np.asarray(s, dtype=np.float64) for s in samples]
    if np.unique(np.concatenate(groups)).size < 2:
        return {"kruskal_h": None, "kruskal_p": None}
    res = sps.kruskal(*groups)
    return {"kruskal_h": float(res.statistic), "kruskal_p": float(res.pvalue)}
