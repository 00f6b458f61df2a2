"""Plots (PNG, matplotlib Agg) and ``report.html`` of an evaluation.

The report opens from disk (images by relative path, no scripts, no network) and carries a reporting
section in the spirit of CLAIM (Radiology: AI) and TRIPOD+AI (BMJ 2024): data source and dates,
series selection rule, preprocessing, model name/version/hash, config hash, threshold provenance,
exclusions with reasons, metrics with 95% intervals, subgroup tables. matplotlib is optional: without
it the plots are skipped and the report says so.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

__all__ = ["write_html", "write_plots"]

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:0.25em 0.6em;text-align:left;vertical-align:top}
th{background:#eee} .num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#8a4b00} img{max-width:32em;margin:0.5em 1em 0.5em 0;border:1px solid #ddd}
"""


def write_plots(result, out: Path) -> tuple[dict[str, Path], str]:
    """ROC, FROC and size-stratified sensitivity as PNG. Returns (name -> path, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note = "plots skipped: matplotlib is not installed (pip install matplotlib)"
        log.warning(note)
        return {}, note
    m = result.metrics
    paths: dict[str, Path] = {}
    auc = m["case_level"]["auroc"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(*result.roc, lw=2, label=f"AUROC {_est(auc)}")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    op = m["case_level"]["at_threshold"]
    if op["sensitivity"]["value"] is not None and op["specificity"]["value"] is not None:
        ax.plot(
            1 - op["specificity"]["value"],
            op["sensitivity"]["value"],
            "o",
            c="C3",
            label=f"threshold {op['threshold']:.3g}",
        )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (case level)")
    ax.legend(loc="lower right")
    paths["roc_png"] = _save(fig, out / "roc.png", plt)
    if result.froc is not None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        ax.plot(*result.froc, lw=2)
        ax.set(
            xlabel="false positives per case",
            ylabel="lesion sensitivity",
            title="FROC",
            ylim=(0, 1.02),
        )
        paths["froc_png"] = _save(fig, out / "froc.png", plt)
    size = m["subgroups"].get("size") or []
    if size:
        names = [g["group"] for g in size]
        sens = [g["case"]["at_threshold"]["sensitivity"] for g in size]
        vals = [s["value"] or 0.0 for s in sens]
        err = [
            [
                max(0.0, v - (s["ci_low"] if s["ci_low"] is not None else v))
                for v, s in zip(vals, sens, strict=True)
            ],
            [
                max(0.0, (s["ci_high"] if s["ci_high"] is not None else v) - v)
                for v, s in zip(vals, sens, strict=True)
            ],
        ]
        fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=100)
        ax.bar(names, vals, yerr=err, capsize=6, color="C0")
        for i, s in enumerate(sens):
            ax.text(i, 0.02, f"{s['numerator']}/{s['denominator']}", ha="center", color="white")
        ax.set(
            ylabel="sensitivity at threshold", ylim=(0, 1.05), title="Sensitivity by lesion size"
        )
        paths["size_png"] = _save(fig, out / "sensitivity_by_size.png", plt)
    return paths, ""


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no timestamps: same input -> same bytes
    plt.close(fig)
    return path


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _est(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    ci = "" if e.get("ci_low") is None else f" (95% CI {e['ci_low']:.3f}-{e['ci_high']:.3f})"
    return f"{e['value']:.3f}{ci}"


def _rate(r: dict | None) -> str:
    if not r:
        return "n/a"
    return f"{_est(r)} [{r['numerator']}/{r['denominator']}]"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _or_missing(values) -> str:
    if not values:
        return "not recorded in the store's metadata"
    return "; ".join(map(str, values)) if isinstance(values, list) else str(values)


def _case_rows(c: dict) -> list[list[str]]:
    rows = [["AUROC", _est(c["auroc"])], ["average precision", _est(c["average_precision"])]]
    points = [(f"threshold {c['at_threshold']['threshold']:.4g}", c["at_threshold"])]
    points += [
        (f"{p['target_specificity']:.0%} specificity (threshold {p['threshold']:.4g})", p)
        for p in c["at_specificity"]
    ]
    for label, p in points:
        rows.append([f"sensitivity at {label}", _rate(p["sensitivity"])])
        rows.append([f"specificity at {label}", _rate(p["specificity"])])
    return rows


def write_html(result, out: Path, *, plots: dict[str, Path], plot_note: str = "") -> Path:
    """Write ``out/report.html`` and return its path."""
    m = result.metrics
    d, mo, cnt, th = m["data"], m["model"], m["counts"], m["threshold"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>pdacscreen evaluation</title><style>" + _CSS + "</style></head><body>",
        "<h1>pdacscreen evaluation report</h1>",
        "<p class='note'>Research software, not a clinical device.</p>",
        "<h2>Reporting checklist (CLAIM / TRIPOD+AI)</h2>",
    ]
    checklist = [
        ["Data source", f"findings store {d['store']}"],
        ["Reference standard", f"labels file {d['labels']} (sha256 {d['labels_sha256'][:16]}...)"],
        ["Study dates", " to ".join(d["study_dates"] or ["unknown"])],
        [
            "Sweep dates / runs",
            f"{' to '.join(d['sweep_dates'] or ['unknown'])}; {', '.join(d['sweep_ids'])}",
        ],
        ["Series selection rule", _or_missing(mo["selection_rule"])],
        ["Preprocessing", _or_missing(mo["preprocessing"])],
        ["Model name, version", f"{', '.join(mo['name']) or 'unknown'} {mo['version']}"],
        ["Model hash (sha256)", _or_missing(mo["sha256"])],
        ["Config hash", ", ".join(mo["config_hashes"])],
        [
            "Operating threshold",
            f"{th['value']:.4g}: {th['source']}"
            + (f"; store notes: {_or_missing(th['store_note'])}" if th["store_note"] else ""),
        ],
        [
            "Cases",
            f"{cnt['evaluated']} evaluated of {cnt['labels_rows']} labelled; "
            f"{cnt['findings_rows_for_model']} findings rows for the model",
        ],
        [
            "Exclusions and missing data",
            ", ".join(f"{k}: {v}" for k, v in cnt["excluded_by_reason"].items()) or "none",
        ],
        [
            "Statistical methods",
            f"bootstrap 95% CIs ({m['settings']['bootstrap']['method']}, "
            f"{m['settings']['bootstrap']['n']} resamples, seed {m['settings']['bootstrap']['seed']})",
        ],
        ["Lesion hit criterion", m["settings"]["hit_criterion"] or "no lesion-level evaluation"],
    ]
    parts.append(_table(["item", "value"], checklist))
    c = m["case_level"]
    parts.append(
        f"<h2>Case level</h2><p>{c['n']} cases: {c['n_positive']} PDAC, {c['n_negative']} "
        "without PDAC. Counts in brackets.</p>"
    )
    parts.append(_table(["metric", "value"], _case_rows(c)))
    les = m["lesion_level"]
    if les:
        parts.append("<h2>Lesion level</h2>")
        rows = [
            ["method", les["method"]],
            ["reference lesions / cases", f"{les['n_lesions']} / {les['n_cases']}"],
            ["hit rate at threshold", _rate(les["hit_rate"])],
            ["false positives per case at threshold", _num(les["false_positives_per_case"])],
            ["lesion average precision", _num(les["lesion_average_precision"])],
        ] + [
            [f"FROC sensitivity at {k} FP/case", _num(v)]
            for k, v in les["sensitivity_at_fp"].items()
        ]
        parts.append(_table(["metric", "value"], rows))
    parts.append("<h2>Plots</h2>")
    if plot_note:
        parts.append(f"<p class='note'>{_e(plot_note)}</p>")
    for name, path in plots.items():
        parts.append(f"<img alt='{_e(name)}' src='{_e(Path(path).name)}'>")
    parts.append("<h2>Subgroups</h2>")
    for by, groups in m["subgroups"].items():
        parts.append(f"<h3>{_e(by)}</h3>")
        if by in m["subgroup_notes"]:
            parts.append(f"<p class='note'>not available: {_e(m['subgroup_notes'][by])}</p>")
        if by in ("size", "location"):
            parts.append("<p>Positives of the group against all negatives.</p>")
        rows = [
            [
                g["group"],
                g["case"]["n_positive"],
                g["case"]["n_negative"],
                _est(g["case"]["auroc"]),
                _est(g["case"]["average_precision"]),
                _rate(g["case"]["at_threshold"]["sensitivity"]),
                _rate(g["case"]["at_threshold"]["specificity"]),
                _rate(g["lesion"]["hit_rate"]) if g.get("lesion") else "n/a",
            ]
            for g in groups
        ]
        head = [
            "group",
            "PDAC",
            "no PDAC",
            "AUROC",
            "AP",
            "sensitivity",
            "specificity",
            "lesion hit rate",
        ]
        parts.append(_table(head, rows))
    ex = m["exclusions"]
    parts.append(
        f"<h2>Excluded studies ({len(ex)})</h2><p>All are in exclusions.csv and metrics.json.</p>"
    )
    parts.append(
        _table(
            ["study_instance_uid", "reason", "detail"],
            [[r["study_instance_uid"], r["reason"], r["detail"]] for r in ex[:500]],
        )
    )
    if m["notes"]:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in m["notes"]) + "</ul>"
        )
    parts.append("</body></html>")
    path = Path(out) / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
