"""The "Shortcut check" section of the benchmark report (colour-only baseline, stain shift).

:func:`shortcut_section` renders ``results["shortcut"]`` (written by
:mod:`gen_ad.app.shortcut`) as HTML: the warnings, then one row per method with its AUROC, the
colour-only baseline's AUROC, and the AUROC after stain normalisation and under HED jitter.
"""

from __future__ import annotations

import html
from typing import Any

_HOW_TO_READ = (
    "The colour-only baseline sees nothing but 15 colour statistics per patch (mean, std and "
    "10/50/90% quantiles of R, G, B) and uses the same KNN scoring and threshold rule. Where it "
    "reaches a method's AUROC, colour alone separates this split as well as that method does: "
    "the normal and anomalous sets may differ in stain, scanner or compression, and the "
    "method's AUROC is no evidence that it learned tissue. The stain shift re-scores a test "
    "subset after stain normalisation to the normal set's reference and under random HED "
    "jitter; a large AUROC drop means the score follows stain.")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _drop(rec: dict[str, Any], key: str) -> str:
    if rec.get(f"{key}_error"):
        return f"<span class='note'>{_e(rec[f'{key}_error'])}</span>"
    """The shifted AUROC and its signed change from the clean subset's (``drop_*`` in the
    results is clean - shifted, so a fall prints as ``(−0.172)``)."""
    auc, drop = rec.get(f"auroc_{key}"), rec.get(f"drop_{key}")
    if auc is None:
        return "–"
    change = -(drop or 0.0)
    return f"{auc:.3f} ({'−' if change < 0 else '+'}{abs(change):.3f})"


def shortcut_section(results: dict[str, Any]) -> str:
    """HTML of the shortcut check, or ``""`` when the results have none."""
    sc = results.get("shortcut")
    if not sc or not sc.get("methods"):
        return ""
    parts = ["<h2>Shortcut check</h2>", f"<p class='note'>{_e(_HOW_TO_READ)}</p>"]
    parts += [f"<div class='warn'><b>Warning</b>: {_e(w)}</div>" for w in sc.get("warnings", [])]
    if not sc.get("warnings") and sc.get("colour_baseline"):
        parts.append("<p>No method is reached by the colour-only baseline.</p>")
    rows, shift_n, jitter = [], None, None
    for name, rec in sc["methods"].items():
        st = rec.get("stain_shift") or {}
        shift_n, jitter = st.get("n", shift_n), st.get("jitter", jitter)
        flag = {True: "<b>reached by colour</b>", False: "beats colour", None: "–"}[
            rec.get("colour_reaches")]
        rows.append(f"<tr><td><b>{_e(name)}</b></td><td class='num'>{_f(rec.get('auroc'))}</td>"
                    f"<td class='num'>{_f(rec.get('colour_auroc'))}</td><td>{flag}</td>"
                    f"<td class='num'>{_f(st.get('auroc'))}</td>"
                    f"<td class='num'>{_drop(st, 'normalised')}</td>"
                    f"<td class='num'>{_drop(st, 'jitter')}</td></tr>")
    head = ["method", "AUROC", "colour-only AUROC", "shortcut flag",
            f"AUROC on the stain-shift subset (n={_e(shift_n)})",
            "after stain normalisation (change)", f"under HED jitter {_e(jitter)} (change)"]
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
                 + "".join(rows) + "</table>")
    return "\n".join(parts)
