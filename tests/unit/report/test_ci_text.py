"""How a metric and its interval read in reports and summary lines."""

from __future__ import annotations

from gen_ad.metrics.detection import bootstrap_metrics
from gen_ad.report.html import ci_text


def test_ci_text_formats_and_marks_zero_width_intervals() -> None:
    assert ci_text({"value": 0.9123, "low": 0.88, "high": 0.94}) == "0.912 [0.880, 0.940]"
    assert ci_text({"value": 0.5, "low": None, "high": None}) == "0.500"
    assert ci_text(None) == "–" and ci_text({"value": None}) == "–"
    # perfectly separated classes: every resample has AUROC 1, the interval collapses
    m = bootstrap_metrics([0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1], n_boot=200)["auroc"]
    assert m.low == m.high == m.value == 1.0
    assert ci_text(m.to_dict()) == "1.000 [1.000, 1.000] (zero-width CI)"


def test_shortcut_table_prints_the_signed_change() -> None:
    """``drop_*`` is clean - shifted; the report's column said "(drop)" over ``(−0.172)``."""
    from gen_ad.report.shortcut import shortcut_section

    shift = {"n": 20, "jitter": 0.05, "auroc": 0.625, "auroc_normalised": 0.641,
             "drop_normalised": -0.016, "auroc_jitter": 0.453, "drop_jitter": 0.172}
    html = shortcut_section({"shortcut": {"methods": {"m": {"auroc": 0.6, "stain_shift": shift}}}})
    assert "0.641 (+0.016)" in html and "0.453 (−0.172)" in html
    assert "(change)" in html and "(drop)" not in html
