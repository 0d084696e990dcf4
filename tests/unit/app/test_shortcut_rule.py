"""The shortcut check's rule: a method is flagged only when colour separates the split, and the
colour baseline's k comes from its bank size (an explicit ``shortcut.k`` is used exactly)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gen_ad.app.benchmark import BenchmarkConfig, SplitCache
from gen_ad.app.shortcut import COLOUR_BASELINE, shortcut_methods, shortcut_report
from gen_ad.config import from_dict
from gen_ad.report.shortcut import shortcut_section


def _cfg(root: Path, **shortcut: object) -> BenchmarkConfig:
    return from_dict(BenchmarkConfig, {
        "out": str(root / "out"), "data": {"test": str(root / "test"), "val": str(root / "val"),
                                           "size": 16, "classes": ["normal", "anomalous"]},
        "methods": [{"run": "r"}], "device": "cpu", "fid": {"enabled": False},
        "shortcut": {"stain_shift": False, **shortcut}})


def _outcome(name: str, auc: float, low: float | None, high: float | None) -> Any:
    method = SimpleNamespace(name=name, scorer=SimpleNamespace(k=17), fit_root="bank", size=16,
                             fit_limit=None, resize="resize")
    return SimpleNamespace(method=method,
                           metrics={"auroc": {"value": auc, "low": low, "high": high}})


def _report(tmp_path: Path, colour: tuple[float, float | None, float | None],
            methods: dict[str, float]) -> dict[str, Any]:
    outcomes = [_outcome(n, a, a - 0.1, a + 0.1) for n, a in methods.items()]
    outcomes.append(_outcome(COLOUR_BASELINE, *colour))
    split = SimpleNamespace(normal=lambda *a: [None] * 300)  # a 300-patch bank
    return shortcut_report(_cfg(tmp_path), outcomes, split, "cpu",  # type: ignore[arg-type]
                           progress=False)


def test_a_below_chance_colour_baseline_flags_nothing(tmp_path: Path) -> None:
    """The walkthrough's numbers: colour 0.206 [0.065, 0.373] was said to 'reach' methods at
    0.165, 0.338 and 0.284; it separates nothing in the direction of an anomaly score."""
    sc = _report(tmp_path, (0.206, 0.065, 0.373),
                 {"fanogan": 0.338, "stylegan2": 0.165, "autoddpm": 0.284, "knn": 0.709})
    assert sc["warnings"] == []
    assert [m["flagged"] for m in sc["methods"].values()] == [False, False, False, False, None]
    assert sc["methods"]["stylegan2"]["colour_reaches"] is True  # the bare comparison, kept
    base = sc["colour_baseline"]
    assert base["separates"] is False and base["k"] == 17 and base["n_bank"] == 300
    assert "colour does not separate this split (AUROC 0.206 [0.065, 0.373]" in base["note"]
    html = shortcut_section({"shortcut": sc})
    assert "reached by colour" not in html and "beats colour" not in html
    assert html.count("colour does not separate this split") == 1  # once, not per method
    assert "k = 17 (chosen from the bank size: min(200, round(sqrt(300)))), bank of 300 " \
        "patches" in html  # the k and how it was chosen, once
    assert "stain-shift subset" not in html  # no empty stain-shift columns (n=None) when off


def test_an_interval_containing_chance_flags_nothing(tmp_path: Path) -> None:
    sc = _report(tmp_path, (0.607, 0.413, 0.787), {"fanogan": 0.338})
    assert sc["warnings"] == [] and sc["methods"]["fanogan"]["flagged"] is False
    assert "interval contains 0.5" in sc["colour_baseline"]["note"]


def test_an_above_chance_colour_baseline_flags_the_methods_it_reaches(tmp_path: Path) -> None:
    sc = _report(tmp_path, (0.702, 0.628, 0.774),
                 {"anoddpm": 0.604, "tie": 0.702, "knn": 0.713})
    flagged = {n: r["flagged"] for n, r in sc["methods"].items()}
    assert flagged == {"anoddpm": True, "tie": True, "knn": False, COLOUR_BASELINE: None}
    assert len(sc["warnings"]) == 2 and sc["colour_baseline"]["note"] is None
    assert "'anoddpm'" in sc["warnings"][0] and "AUROC 0.702 [0.628, 0.774]" in sc["warnings"][0]
    html = shortcut_section({"shortcut": sc})
    assert html.count("<b>reached by colour</b>") == 2 and html.count("beats colour") == 1
    assert "No shortcut evidence" not in html


def test_without_a_bootstrap_interval_the_point_estimate_decides(tmp_path: Path) -> None:
    """``n_boot: 0``: no interval; above 0.5 counts as separating (the check stays on)."""
    assert _report(tmp_path, (0.70, None, None), {"a": 0.6})["methods"]["a"]["flagged"] is True
    low = _report(tmp_path, (0.45, None, None), {"a": 0.3})
    assert low["methods"]["a"]["flagged"] is False and "no bootstrap interval" in \
        low["colour_baseline"]["note"]


def test_results_of_an_earlier_gen_ad_render_as_they_were() -> None:
    sc = {"colour_baseline": {"name": COLOUR_BASELINE, "auroc": 0.8},
          "methods": {"a": {"auroc": 0.6, "colour_auroc": 0.8, "colour_reaches": True}},
          "warnings": ["shortcut: ..."]}
    assert "<b>reached by colour</b>" in shortcut_section({"shortcut": sc})


@pytest.fixture
def val16(tmp_path: Path) -> Path:
    """16 normal validation patches (the colour baseline's bank without a KNN method)."""
    rng = np.random.default_rng(0)
    for folder, n in (("val/normal", 16), ("test/normal", 4), ("test/anomalous", 4)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    return tmp_path


def _colour_method(root: Path, **shortcut: object) -> tuple[Any, list[str]]:
    cfg = _cfg(root, **shortcut)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        (pm,) = shortcut_methods(cfg, [], SplitCache(cfg.data), "cpu")
    return pm, [str(w.message) for w in got if "shortcut" in str(w.message)]


def test_the_default_k_comes_from_the_bank_size(val16: Path) -> None:
    """No KNN method: the bank is data.val (16 patches); k = round(sqrt(16)) = 4, not the
    paper's 200 silently cut to 15 (an average over the whole bank)."""
    pm, said = _colour_method(val16)
    assert pm.scorer.k == 4 and said == []
    assert "k=4, chosen from the bank size: min(200, round(sqrt(16)))" in pm.description
    assert "(16 patches)" in pm.description


def test_an_explicit_k_is_honoured_and_a_clipped_one_said_once(val16: Path) -> None:
    pm, said = _colour_method(val16, k=3)
    assert pm.scorer.k == 3 and said == [] and "k=3, shortcut.k;" in pm.description
    pm, said = _colour_method(val16, k=200)
    assert pm.scorer.k == 15 and len(said) == 1
    assert "k = 200" in said[0] and "its bank holds 16: k = 15 is used" in said[0]
    assert "\n" not in said[0] and any("k = 15 is used" in n for n in pm.notes)


def test_colour_k_rule() -> None:
    from gen_ad.app.shortcut import colour_k

    assert [colour_k(None, n)[0] for n in (2, 3, 64, 300, 1000, 2000, 40_000, 10**6)] == \
        [1, 2, 8, 17, 32, 45, 200, 200]
    assert colour_k(50, 10**6) == (50, "shortcut.k", None)
    assert colour_k(None, 300)[2] is None and colour_k(500, 300)[0] == 299
