"""A self-contained HTML report of a benchmark (one file: figures embedded as PNG data URIs).

:func:`render_report` takes the ``results.json`` content written by
:mod:`gen_ad.app.benchmark` and the folder holding its figures, and returns the HTML text.
Every value shown is escaped; every image is a ``data:image/png;base64,...`` URI, so the file
opens anywhere without its folder.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gen_ad.errors import DataError
from gen_ad.report.shortcut import shortcut_section

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;
background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:24px 28px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:30px 0 10px;border-bottom:1px solid #dde;
padding-bottom:4px}h3{font-size:16px;margin:22px 0 6px}
.meta{color:#5a6570;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 4px;width:100%}
th,td{border:1px solid #d8dde3;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.warn{background:#fff4e0;border-left:4px solid #e0a030;padding:6px 10px;margin:6px 0;font-size:13px}
.note{color:#5a6570;font-size:12px}
.figs{display:flex;flex-wrap:wrap;gap:14px}
.figs{align-items:flex-start}
.figs figure{margin:0;flex:1 1 420px;max-width:560px}
figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
.figs figure.hist{flex:0 1 420px}
.figs figure.wide{flex:1 1 560px;max-width:100%}
figcaption{font-size:12px;color:#5a6570;margin-top:3px}
code{background:#f0f2f5;padding:1px 4px;border-radius:3px;font-size:12px}
"""


def png_data_uri(path: str | os.PathLike[str]) -> str:
    """``data:image/png;base64,...`` of a PNG file (checked to be a PNG)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise DataError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return _e(v)


def ci_text(m: dict[str, Any] | None) -> str:
    """``0.912 [0.880, 0.940]`` from a MetricCI dict. A zero-width interval is marked: a
    percentile bootstrap cannot vary a perfectly separated set or a one-member class, so
    ``[1.000, 1.000]`` says nothing about certainty."""
    if not m or m.get("value") is None:
        return "–"
    if m.get("low") is None or m.get("high") is None:
        return f"{m['value']:.3f}"
    text = f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
    return text + " (zero-width CI)" if m["low"] == m["high"] else text


def pixel_cell(pixel: dict[str, Any] | None) -> str:
    """Pixel AUROC and AUPRO with their image-level CIs (or why there are none), escaped HTML."""
    if not pixel or pixel.get("auroc") is None:
        return "– (no anomalous pixels)" if pixel else "– (no masks)"
    ci = pixel.get("ci") or {}
    lines = []
    for key, name in (("auroc", "AUROC"), ("aupro", f"AUPRO@{pixel.get('aupro_fpr_limit')}")):
        low, high = ci.get(key) or (None, None)
        lines.append(f"{_e(name)} " + ci_text({"value": pixel.get(key), "low": low, "high": high}))
    regions = f"<span class='note'>{_e(pixel.get('n_regions'))} regions</span>"
    return "<br>".join([*lines, regions])


def _pct(fpr: Any) -> str:
    """``1%`` for 0.01 (``pixel`` when unknown: results of an older gen_ad)."""
    return f"{float(fpr) * 100:.4g}%" if isinstance(fpr, (int, float)) else "pixel"


def pixel_dice_cell(m: dict[str, Any]) -> str:
    """Dice at the label-free pixel threshold (or why there is none) over the best Dice, which
    uses the labels (an upper bound), escaped HTML."""
    mt = m["metrics"]
    pixel = mt.get("pixel")
    if not m["has_maps"] or not pixel:
        return "– (no maps)" if not m["has_maps"] else "– (no masks)"
    record, at = mt.get("pixel_threshold"), pixel.get("at_pixel_threshold")
    if not isinstance(record, dict):
        lead = "n/a (not recorded: computed by an older gen_ad)"
    elif record.get("status") != "ok" or not at:
        lead = f"n/a ({_e(record.get('reason', 'no masks'))})"
    else:
        lead = (f"{_fmt(at.get('dice'))}<br><span class='note'>precision "  # short lines:
                f"{_fmt(at.get('precision'))}, recall {_fmt(at.get('recall'))}<br>"  # no wrap
                f"mean per anomalous image {_fmt(at.get('dice_mean_anomalous_images'))}<br>"
                f"FPR on test normal images {_fmt(at.get('fpr_normal_images'), 4)}</span>")
    return f"{lead}<br>best {_fmt(pixel.get('best_dice'))} <span class='note'>(upper bound)</span>"


def pixel_threshold_text(m: dict[str, Any]) -> str:
    """The map threshold line of the methods table (empty for a method without maps)."""
    record = m["metrics"].get("pixel_threshold")
    if not m["has_maps"]:
        return ""
    if not isinstance(record, dict):
        return "<br>pixel: n/a (not recorded: computed by an older gen_ad)"
    if record.get("status") != "ok":
        return f"<br>pixel: n/a ({_e(record.get('reason'))})"
    return (f"<br>pixel: {record['value']:.4g} ({_pct(record['fpr'])} pixel FPR: the "
            f"{1 - record['fpr']:.4g} quantile of {record['n_pixels']:,} map pixels of "
            f"{_e(record['n_images'])} normal val images)")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], num_from: int = 1,
           num_to: int | None = None) -> str:
    """An HTML table of already-escaped cells; columns ``num_from:num_to`` are right-aligned."""
    h = "".join(f"<th>{c}</th>" for c in head)
    end = len(head) if num_to is None else num_to
    body = "".join("<tr>" + "".join(
        f"<td class='num'>{c}</td>" if num_from <= i < end else f"<td>{c}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _img(root: Path, rel: str | None, alt: str, caption: str, cls: str = "") -> str:
    if not rel:
        return ""
    cls = f" class='{cls}'" if cls else ""
    return (f"<figure{cls}><img src='{png_data_uri(root / rel)}' alt='{_e(alt)}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def generator_cell(gen: dict[str, Any] | None) -> str:
    """FID/KID (or why not) of a method's generator, escaped HTML."""
    if gen is None:
        return "– (not a generator)"
    if gen.get("status") != "ok":
        text = _e(gen.get("label", "n/a"))
        log = gen.get("training_log") or {}
        if log.get("fid") is not None:
            text += f"<br>training log: FID {log['fid']:.2f} (step {_e(log.get('step', '?'))})"
        return text
    key = next((k for k in gen if k == "fid" or k.startswith("fd_")), None)
    parts = []
    if key is not None:
        name = "FID" if key == "fid" else f"FD ({key[3:]})"
        parts.append(f"{name} {gen[key]:.2f}")
    kid = next((k for k in gen if k.endswith("_mean") and k.startswith(("kid", "kd_"))), None)
    if kid is not None:
        std = gen.get(kid.replace("_mean", "_std"))
        name = "KID" if kid.startswith("kid") else "KD"
        parts.append(f"{name} {gen[kid]:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
    text = _e(", ".join(parts)) + f"<br><span class='note'>n={_e(gen.get('n_fake'))} generated vs "
    text += f"{_e(gen.get('n_real'))} real</span>"
    extractor = str(gen.get("extractor"))
    if extractor.startswith("inception-v3-random"):
        text += "<br><b>random-init Inception: not FID</b>"
    elif extractor != "inception-v3-compat":
        text += f"<br><b>{_e(extractor)}: not FID</b>"
    return text


def _provenance_line(env: dict[str, Any]) -> str:
    """The code and libraries that made the numbers (results of an older gen_ad: nothing)."""
    if "gen_ad" not in env:
        return ""
    from gen_ad.utils.provenance import describe

    return f"<p class='meta'>{_e(describe(env))}</p>"


def _summary_table(methods: list[dict[str, Any]], pixel_fpr: Any = None) -> str:
    rows = []
    for m in methods:
        mt = m["metrics"]
        at = mt.get("at_threshold") or {}
        sens_spec = f"{_fmt(at.get('sensitivity'))} / {_fmt(at.get('specificity'))}"
        flag = any("RANDOM" in n for n in m["notes"])
        rows.append([f"<b>{_e(m['name'])}</b>" + ("<br><span class='note'>random-init weights "
                                                  "inside: see notes</span>" if flag else ""),
                     _e(m["kind"]), ci_text(mt.get("auroc")), ci_text(mt.get("aupr")),
                     pixel_cell(mt.get("pixel")) if m["has_maps"] else "– (no maps)",
                     pixel_dice_cell(m), sens_spec,
                     f"{m['ms_per_patch']:.1f}", generator_cell(m.get("generator"))])
    head = ["method", "kind", "AUROC [95% CI]", "AUPR [95% CI]",
            "pixel AUROC / AUPRO [95% CI, images resampled]",
            f"Dice @ {_pct(pixel_fpr)} pixel FPR (label-free) / best Dice (uses the labels: "
            "upper bound)",
            "sensitivity / specificity at threshold", "ms / patch", "generator FID / KID"]
    return _table(head, rows, num_from=2, num_to=len(head) - 1)


def _methods_table(methods: list[dict[str, Any]]) -> str:
    rows = []
    for m in methods:
        notes = "".join(f"<div class='warn'>{_e(n)}</div>" for n in m["notes"])
        th = m["threshold"]
        rule = "Q3 + 1.5 IQR" if th["method"] == "iqr" else f"FPR {th['params'].get('fpr')}"
        rows.append([f"<b>{_e(m['name'])}</b>", _e(m["description"]) + notes,
                     f"{th['value']:.4g} ({_e(rule)} of {_e(th['n'])} normal val scores)"
                     + pixel_threshold_text(m),
                     f"{_e(m['size'])} px"])
    return _table(["method", "what it is", "threshold", "input"], rows, num_from=4)


def _per_class_table(methods: list[dict[str, Any]]) -> str:
    classes = sorted({c for m in methods for c in (m["metrics"].get("per_class") or {})})
    if not classes:
        return ""
    rows = []
    for m in methods:
        pc = m["metrics"].get("per_class") or {}
        rows.append([_e(m["name"])] + [ci_text((pc.get(c) or {}).get("auroc")) for c in classes])
    head = ["method"] + [f"AUROC {_e(c)} (n={_e(_class_n(methods, c))})" for c in classes]
    return "<h3>Per anomaly class (each against all normals)</h3>" + _table(head, rows)


def _class_n(methods: list[dict[str, Any]], c: str) -> Any:
    for m in methods:
        pc = (m["metrics"].get("per_class") or {}).get(c)
        if pc:
            return pc.get("n")
    return "?"


def render_report(results: dict[str, Any], root: str | os.PathLike[str]) -> str:
    """The HTML text of a benchmark report.

    Args:
        results: the ``results.json`` content.
        root: folder the ``results["figures"]`` paths are relative to.
    Returns:
        A complete HTML document with every figure embedded.
    """
    r = Path(root)
    methods, test, env, figs = (results["methods"], results["test"], results["environment"],
                                results.get("figures", {}))
    boot = methods[0]["metrics"].get("bootstrap", {}) if methods else {}
    hw = env.get("gpu") or env.get("cpu")
    parts = [
        f"<h1>{_e(results['title'])}</h1>",
        f"<p class='meta'>created {_e(results['created'])} · device {_e(env.get('device'))} "
        f"({_e(hw)}, {_e(env.get('threads'))} threads) · torch {_e(env.get('torch'))}</p>",
        _provenance_line(env),
        f"<p>Test split <code>{_e(test['root'])}</code>: {_e(test['n'])} patches "
        f"({_e(test['n_normal'])} normal, {_e(test['n_anomalous'])} anomalous)"
        + (f", masks <code>{_e(test['masks'])}</code>" if test.get("masks") else "")
        + f". Normal validation folder <code>{_e(test['val'])}</code> (fitting, thresholds and "
        "the FID reference). Every method is scored on the same patches through the same "
        "<code>AnomalyScorer</code> interface.</p>",
        "<h2>Results</h2>",
        _summary_table(methods, (results.get("config") or {}).get("pixel_fpr")),
        f"<p class='note'>CIs: {_e(boot.get('n_boot'))} stratified bootstrap resamples, "
        f"{_e(boot.get('interval', 'percentile'))} interval. Thresholds are label-free (normal "
        "validation scores only). Dice @ pixel FPR: pixels whose map value exceeds the "
        "(1 - FPR) quantile of the normal validation images' map pixels (no labels); Dice "
        "pooled over all test pixels. Best Dice scans every map threshold with the labels: an "
        "upper bound, not an operating point. ms / patch: wall time of the scoring loop (data "
        "loading included) divided by the number of test patches, on the device above.</p>",
        _per_class_table(methods),
        shortcut_section(results),
        "<h2>Methods</h2>", _methods_table(methods),
        "<h2>Curves</h2><div class='figs'>",
        _img(r, figs.get("roc"), "ROC curves", "ROC curves of all methods on the test split"),
        _img(r, figs.get("pr"), "PR curves", "Precision-recall curves (dashed: prevalence)"),
        "</div>",
    ]
    for m in methods:
        n = m["name"]
        parts.append(f"<h2>{_e(n)}</h2>")
        if m.get("reused"):  # results read back from methods/<name>/, not computed by this run
            parts.append(f"<p class='note'>Reused: computed {_e(m.get('computed'))} by an "
                         "earlier run with the same settings (methods/"
                         f"{_e(n)}/method.json).</p>")
        parts.extend(f"<div class='warn'>{_e(x)}</div>" for x in m["notes"])
        parts.append("<div class='figs'>")
        parts.append(_img(r, figs.get(f"hist/{n}"), f"{n} score histogram",
                          "Test scores, normal vs anomalous; dashed line: threshold", "hist"))
        parts.append(_img(r, figs.get(f"examples/{n}"), f"{n} examples",
                          "Example test patches: input / reconstruction / anomaly map (where "
                          "the method has them); titles: true class and score", "wide"))
        parts.append("</div>")
    body = "\n".join(p for p in parts if p)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(results['title'])}</title><style>{_CSS}</style></head>"
            f"<body><main>\n{body}\n</main></body></html>\n")
