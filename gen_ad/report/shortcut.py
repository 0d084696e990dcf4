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
    "10/50/90% quantiles of R, G, B) and uses the same KNN scoring and threshold rule, with k "
    "chosen from its bank size alone. A method is flagged only when colour separates the "
    "classes (the baseline's AUROC interval lies above 0.5) and reaches that method's AUROC: "
    "then colour alone separates this split as well as the method does, the normal and "
    "anomalous sets may differ in stain, scanner or compression, and the method's AUROC is no "
    "evidence that it learned tissue. A baseline at or below chance is no evidence either way. "
    "The stain shift re-scores a test subset after stain normalisation to the normal set's "
    "reference and under random HED jitter; a large AUROC drop means the score follows stain.")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _drop(rec: dict[str, Any], key: str) -> str:
    """The shifted AUROC and its signed change from the clean subset's (``drop_*`` in the
    results is clean - shifted, so a fall prints as ``(−0.172)``)."""
    if rec.get(f"{key}_error"):
        return f"<span class='note'>{_e(rec[f'{key}_error'])}</span>"
    auc, drop = rec.get(f"auroc_{key}"), rec.get(f"drop_{key}")
    if auc is None:
        return "–"
    change = -(drop or 0.0)
    return f"{auc:.3f} ({'−' if change < 0 else '+'}{abs(change):.3f})"


def _flag(rec: dict[str, Any], separates: bool | None) -> str:
    """The shortcut flag cell (``–`` for the baseline's own row, and for every row when the
    baseline does not separate the classes: said once above the table). Results of an earlier
    gen_ad have no ``flagged``: their ``colour_reaches`` is shown as it was."""
    flagged = rec.get("flagged", rec.get("colour_reaches"))
    if flagged is None or separates is False:
        return "–"
    return "<b>reached by colour</b>" if flagged else "beats colour"


def _baseline_lines(sc: dict[str, Any]) -> list[str]:
    """What the colour-only baseline says of this split, once: its k, and either that it does
    not separate the classes (so nothing is flagged) or that every method beats it."""
    base = sc.get("colour_baseline")
    if not base:
        return []
    out = []
    if base.get("k") is not None:
        bank = f", bank of {base['n_bank']} patches" if base.get("n_bank") else ""
        rule = f" ({base['k_rule']})" if base.get("k_rule") else ""
        out.append(f"<p class='note'>colour-only baseline: k = {_e(base['k'])}{_e(rule)}"
                   f"{_e(bank)}</p>")
    if base.get("note"):
        out.append(f"<p><b>No shortcut evidence</b>: {_e(base['note'])}.</p>")
    elif not sc.get("warnings") and base.get("auroc") is not None:
        out.append("<p>Colour separates this split, and every method beats the colour-only "
                   "baseline.</p>")
    return out


def shortcut_section(results: dict[str, Any]) -> str:
    """HTML of the shortcut check, or ``""`` when the results have none."""
    sc = results.get("shortcut")
    if not sc or not sc.get("methods"):
        return ""
    parts = ["<h2>Shortcut check</h2>", f"<p class='note'>{_e(_HOW_TO_READ)}</p>"]
    parts += [f"<div class='warn'><b>Warning</b>: {_e(w)}</div>" for w in sc.get("warnings", [])]
    parts += _baseline_lines(sc)
    separates = (sc.get("colour_baseline") or {}).get("separates")
    shifted = any(rec.get("stain_shift") for rec in sc["methods"].values())
    rows, shift_n, jitter = [], None, None
    for name, rec in sc["methods"].items():
        st = rec.get("stain_shift") or {}
        shift_n, jitter = st.get("n", shift_n), st.get("jitter", jitter)
        cells = [f"<td><b>{_e(name)}</b></td><td class='num'>{_f(rec.get('auroc'))}</td>"
                 f"<td class='num'>{_f(rec.get('colour_auroc'))}</td>"
                 f"<td>{_flag(rec, separates)}</td>"]
        if shifted:
            cells += [f"<td class='num'>{_f(st.get('auroc'))}</td>",
                      f"<td class='num'>{_drop(st, 'normalised')}</td>",
                      f"<td class='num'>{_drop(st, 'jitter')}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = ["method", "AUROC", "colour-only AUROC", "shortcut flag"]
    if shifted:  # no stain-shift columns when it was off (shortcut.stain_shift: false)
        head += [f"AUROC on the stain-shift subset (n={_e(shift_n)})",
                 "after stain normalisation (change)", f"under HED jitter {_e(jitter)} (change)"]
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
                 + "".join(rows) + "</table>")
    return "\n".join(parts)
