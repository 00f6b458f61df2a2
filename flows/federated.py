"""Federated evaluation: per-site aggregates that hold no study rows, pooled into a network ROC.

**Export** (``pdacscreen evaluate ... --export-aggregate site.json``): the assessed, labelled
studies' scores are counted in ``bins`` fixed bins on ``[low, high)`` (default 1000 on [0, 1]; a
score is clipped into the range, 1.0 falls in the last bin), per label (``positive`` /
``negative``) and per subgroup (``manufacturer`` and ``thickness`` from the findings, ``sex`` and
``age`` when the labels or diagnoses carry ``sex``/``patient_sex`` and ``age``/``patient_age``,
``lead_time`` bands for the positives of a ``--diagnoses`` evaluation).  The file holds counts,
bin edges, the threshold and the model's name and version: no study rows, no keys, no dates.

**Suppression** (``k``, default 10): no published cell holds a count between 1 and k - 1.

1. Within a subgroup, groups holding fewer than k studies of a label are merged into one group
   ``other`` (and more groups, smallest first, while ``other`` is still below k), so that the
   groups always sum to the overall table and none can be recovered by subtraction; a label with
   fewer than k studies overall is not published at all.
2. Bins are merged, never dropped: adjacent bins of the fixed grid are merged, lowest score
   first, into cells ``[lo, hi)`` until every table of the family (the overall table alone; or all
   groups of one subgroup dimension together) holds 0 or >= k studies of the label in the cell (a
   remainder at the top joins the cell below; a cell spans its first to its last occupied bin).
   The groups of a dimension share one partition, so subtracting published tables (the overall
   minus the other groups) gives only sums of published cells, and every study is still counted.  Cell edges lie on the fixed grid; an edge says that a
   bin beside it is not empty, not how many studies it holds or whose they are.  Cross-tabulations
   of two dimensions are never published.

Merging keeps the ROC honest: each cell is an interval, so the pooled AUROC is reported with
**bounds** (pairs in overlapping cells counted 0 for the lower and 1 for the upper bound,
:func:`pdacscreen.engine.metrics.auroc_bounds_from_cells`) besides the point estimate that spreads
each cell evenly over its bins.  Without merging the bounds are the usual binning error: at most
half the share of positive-negative pairs that fall in one bin (the bounds are that share wide).

**Network** (``pdacscreen evaluate-network site1.json site2.json ...``): the sites' counts are
summed bin by bin into a pooled ROC and AUROC with a **DeLong** 95% interval computed from the
counts (:func:`pdacscreen.engine.metrics.auroc_variance_from_counts`, logit scale; counts carry no
patients, so studies are taken as independent and the interval is narrower than a patient-clustered
one), per-site tables, a DerSimonian-Laird random-effects pooled AUROC and the between-site
heterogeneity of the per-site AUROCs (Cochran's Q, I^2, tau^2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pdacscreen.engine import metrics as M
from pdacscreen.io.errors import InputError

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_K",
    "SCHEMA",
    "SUBGROUP_DIMS",
    "build_aggregate",
    "load_aggregate",
    "network",
    "site_summary",
    "subgroup_values",
    "write_aggregate",
]

SCHEMA = "pdacscreen.aggregate/1"
NETWORK_SCHEMA = "pdacscreen.network/1"
DEFAULT_BINS, DEFAULT_K = 1000, 10
SUBGROUP_DIMS = ("manufacturer", "thickness", "sex", "age")
AGE_EDGES = (50, 60, 70, 80)
AGE_NAMES = ("< 50", "50-59", "60-69", "70-79", ">= 80")
LABELS = ("positive", "negative")
REFERENCE_NOTE = (
    "Numbers from the shipped reference model describe synthetic phantoms (it is trained on "
    "synthetic phantoms, not a clinical device)."
)


# ---------------------------------------------------------------------- subgroups
def _first_column(df: pd.DataFrame, names: tuple[str, ...]) -> pd.Series | None:
    for n in names:
        for c in (f"{n}__label", n):
            if c in df.columns and df[c].notna().any():
                return df[c]
    return None


def subgroup_values(
    df: pd.DataFrame, dims: tuple[str, ...] = SUBGROUP_DIMS
) -> dict[str, np.ndarray]:
    """Per-study group names for each available subgroup dimension ("unknown" where missing)."""
    from pdacscreen.flows.evaluate import _thickness_bin

    bad = [d for d in dims if d not in SUBGROUP_DIMS]
    if bad:
        raise InputError(
            f"--aggregate-by has unknown subgroup(s) {bad}; allowed: {list(SUBGROUP_DIMS)}"
        )
    out: dict[str, np.ndarray] = {}
    for dim in dims:
        if dim == "manufacturer":
            col = _first_column(df, ("manufacturer",))
            if col is not None:
                out[dim] = col.fillna("unknown").astype(str).str.strip().to_numpy(object)
        elif dim == "thickness":
            col = _first_column(df, ("slice_thickness_mm",))
            if col is not None:
                v = pd.to_numeric(col, errors="coerce")
                out[dim] = np.array([_thickness_bin(t) for t in v], object)
        elif dim == "sex":
            col = _first_column(df, ("sex", "patient_sex"))
            if col is not None:
                s = col.astype("string").str.upper().str[:1]
                out[dim] = np.where(s.isin(["M", "F"]).fillna(False), s, "unknown").astype(object)
        elif dim == "age":
            col = _first_column(df, ("age", "patient_age"))
            if col is not None:
                a = pd.to_numeric(col.astype("string").str.extract(r"(\d+)")[0], errors="coerce")
                idx = np.searchsorted(np.asarray(AGE_EDGES), a.to_numpy(float), side="right")
                names = np.asarray(AGE_NAMES + ("unknown",), object)
                out[dim] = names[np.where(a.isna(), len(AGE_NAMES), idx)]
    return out


# ---------------------------------------------------------------------- export
def _bin_index(score: np.ndarray, bins: int, low: float, high: float) -> np.ndarray:
    b = np.floor((np.asarray(score, float) - low) / (high - low) * bins).astype(np.int64)
    return np.clip(b, 0, bins - 1)


def _merge_small_groups(names: np.ndarray, k: int) -> np.ndarray:
    """Groups under k merged into ``other`` (then the smallest others while ``other`` < k)."""
    names = names.astype(object).copy()
    counts = pd.Series(names).value_counts()
    small = set(counts[counts < k].index)
    names[np.isin(names, list(small))] = "other"
    while True:
        counts = pd.Series(names).value_counts()
        if "other" not in counts or counts["other"] >= k or len(counts) == 1:
            return names
        smallest = counts.drop("other").sort_values(kind="stable").index[0]
        names[names == smallest] = "other"


def _partition(tables: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Disjoint cells ``[lo, hi)``, each holding 0 or >= k studies in every table.

    Bins are merged left to right into a run until every table's count in the run is 0 or >= k;
    a trailing run that never gets there joins the cells before it (as many as needed); each cell
    is trimmed to its first and last occupied bin (empty bins between cells hold no study).
    """
    n = tables.shape[1]
    cum = np.concatenate([np.zeros((tables.shape[0], 1)), np.cumsum(tables, axis=1)], axis=1)

    def fine(lo: int, hi: int) -> bool:
        c = cum[:, hi] - cum[:, lo]
        return bool(np.all((c == 0) | (c >= k)))

    cuts, lo = [0], 0
    for hi in range(1, n + 1):
        if fine(lo, hi) and np.any(cum[:, hi] > cum[:, lo]):
            cuts.append(hi)
            lo = hi
    if cuts[-1] != n:  # trailing bins join the last cell, merging back until it is valid
        while len(cuts) > 1 and not fine(cuts[-2], n):
            cuts.pop()
        if len(cuts) == 1:
            cuts.append(n)
        else:
            cuts[-1] = n
    occupied = np.flatnonzero(tables.sum(axis=0) > 0)
    cells = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):  # trimmed to their occupied bins
        inside = occupied[(occupied >= a) & (occupied < b)]
        if inside.size:
            cells.append((int(inside[0]), int(inside[-1]) + 1))
    return cells


def build_aggregate(
    score,
    positive,
    *,
    subgroups: dict[str, np.ndarray],
    positive_subgroups: dict[str, np.ndarray] | None = None,
    threshold: float,
    site: str,
    model: dict,
    bins: int = DEFAULT_BINS,
    low: float = 0.0,
    high: float = 1.0,
    k: int = DEFAULT_K,
    counts: dict[str, int] | None = None,
) -> dict:
    """The aggregate export of one site (see the module docstring for binning and suppression).

    Args:
        score: assessed studies' scores, shape ``(n,)``.
        positive: their labels (True = positive), shape ``(n,)``.
        subgroups: dimension -> per-study group names (both labels).
        positive_subgroups: dimensions of the positives only (e.g. ``lead_time`` bands), per study.
        counts: other study counts to publish (e.g. not assessed); values below k are suppressed.
    """
    if not isinstance(bins, int) or bins < 2:
        raise InputError(f"--bins must be an integer >= 2, got {bins!r}")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"--min-cell must be an integer >= 1, got {k!r}")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"bin range must be finite with low < high, got [{low}, {high})")
    s = np.asarray(score, float)
    y = np.asarray(positive, bool)
    if s.shape != y.shape or s.ndim != 1 or not np.all(np.isfinite(s)):
        raise InputError("scores must be finite and match the labels' shape")
    b = _bin_index(s, bins, low, high)
    tables, suppressed, merged = [], [], {}
    for label, member in (("positive", y), ("negative", ~y)):
        dims = dict(subgroups)
        if label == "positive":
            dims.update(positive_subgroups or {})
        if member.sum() < k:
            suppressed.append({"label": label, "why": f"fewer than k={k} studies"})
            continue
        families = [[("all", "all", member)]]
        for dim, names in dims.items():
            names = _merge_small_groups(np.asarray(names, object)[member], k)
            merged.setdefault(dim, {})[label] = bool(np.any(names == "other"))
            full = np.full(s.size, None, object)
            full[member] = names
            families.append([(dim, g, member & (full == g)) for g in sorted(set(names))])
        for specs in families:  # one partition per subgroup dimension, shared by its groups
            counts_by_table = np.stack([np.bincount(b[m], minlength=bins) for *_, m in specs])
            cells = _partition(counts_by_table, k)
            for (dim, group, _), row in zip(specs, counts_by_table, strict=True):
                out = [[lo, hi, int(row[lo:hi].sum())] for lo, hi in cells if row[lo:hi].sum()]
                tables.append(
                    {
                        "subgroup": dim,
                        "group": str(group),
                        "label": label,
                        "n": int(row.sum()),
                        "cells": out,
                    }
                )
    agg = {
        "schema": SCHEMA,
        "site": str(site),
        "model": {kk: model.get(kk) for kk in ("name", "version")},
        "threshold": float(threshold),
        "bins": {"n": bins, "low": float(low), "high": float(high)},
        "k": k,
        "suppression": "adjacent bins merged into cells until every table of a subgroup dimension "
        "holds 0 or >= k studies per cell; groups under k merged into 'other'; a label under k "
        "not published",
        "tables": tables,
        "suppressed": suppressed,
        "other_groups": merged,
        "counts": {
            n: (int(v) if v >= k or v == 0 else f"< {k}") for n, v in (counts or {}).items()
        },
        "note": REFERENCE_NOTE,
    }
    _check_export(agg)
    return agg


def _check_export(agg: dict) -> None:
    """Refuse to write an export with a cell under k (a guard; the partition already ensures it)."""
    k = agg["k"]
    for t in agg["tables"]:
        for lo, hi, c in t["cells"]:
            if not (c >= k and 0 <= lo < hi <= agg["bins"]["n"]):
                raise InputError(
                    f"aggregate cell [{lo}, {hi}) of {t['subgroup']}/{t['group']} holds {c} < k"
                )


def write_aggregate(agg: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(agg, indent=1, allow_nan=False) + "\n")
    return path


def load_aggregate(path: Path) -> dict:
    """Read and check one site's export."""
    path = Path(path)
    try:
        agg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read aggregate {str(path)!r}: {e}") from e
    if not isinstance(agg, dict) or agg.get("schema") != SCHEMA:
        raise InputError(f"{path} is not a pdacscreen aggregate (schema {SCHEMA!r} expected)")
    for key in ("site", "bins", "threshold", "tables", "k"):
        if key not in agg:
            raise InputError(f"aggregate {path} lacks {key!r}")
    _check_export(agg)
    return agg


# ---------------------------------------------------------------------- metrics from cells
def _spread(cells: list, bins: int) -> np.ndarray:
    """Counts per bin, each cell's count spread evenly over its bins."""
    out = np.zeros(bins)
    for lo, hi, c in cells:
        out[lo:hi] += c / (hi - lo)
    return out


def _cells_array(cells: list) -> np.ndarray:
    return np.asarray(cells, float).reshape(-1, 3)


def _table_metrics(pos: list, neg: list, *, bins: dict, threshold: float) -> dict:
    """AUROC (estimate, bounds, DeLong interval) and sensitivity/specificity at the threshold."""
    n = bins["n"]
    p, q = _spread(pos, n), _spread(neg, n)
    auc = M.auroc_from_counts(p, q)
    var = M.auroc_variance_from_counts(p, q)
    lo_b, hi_b = M.auroc_bounds_from_cells(_cells_array(pos), _cells_array(neg))
    t = (threshold - bins["low"]) / (bins["high"] - bins["low"]) * n  # threshold in bin units

    def flagged(cells: list) -> tuple[float, float, float]:
        """(estimate, low, high) of the count at or above the threshold."""
        est = sure = maybe = 0.0
        for lo, hi, c in cells:
            if lo >= t:
                sure += c
            elif hi > t:
                maybe += c
                est += c * (hi - t) / (hi - lo)
        return sure + est, sure, sure + maybe

    P, N = float(p.sum()), float(q.sum())
    fp, fn_ = flagged(pos), flagged(neg)

    def rate(v: tuple[float, float, float], den: float, flip: bool) -> dict:
        if den <= 0:
            return {"value": None, "bound_low": None, "bound_high": None, "denominator": 0}
        vals = [(den - x) / den if flip else x / den for x in v]
        lo_, hi_ = sorted(vals[1:])
        return {"value": vals[0], "bound_low": lo_, "bound_high": hi_, "denominator": int(den)}

    ci = M.auroc_interval(auc, var)
    return {
        "n_positive": int(P),
        "n_negative": int(N),
        "auroc": {"value": auc, "ci_low": ci[0], "ci_high": ci[1], "variance": var},
        "auroc_bounds": [lo_b, hi_b],
        "sensitivity": rate(fp, P, False),
        "specificity": rate(fn_, N, True),
    }


def _tables(agg: dict) -> dict[tuple[str, str, str], list]:
    return {(t["subgroup"], t["group"], t["label"]): t["cells"] for t in agg["tables"]}


def _pairs(tables: dict) -> list[tuple[str, str, list, list]]:
    """(subgroup, group, positive cells, negative cells); positive-only dimensions (lead time)
    are paired with the overall negatives."""
    out = []
    for (dim, group, label), cells in tables.items():
        if label != "positive":
            continue
        neg = tables.get((dim, group, "negative"))
        if neg is None and not any(d == dim and lab == "negative" for d, _, lab in tables):
            neg = tables.get(("all", "all", "negative"))
        if neg is not None:
            out.append((dim, group, cells, neg))
    return out


def site_summary(agg: dict) -> dict:
    """Metrics of one site's export: overall and per subgroup."""
    rows = [
        {
            "subgroup": d,
            "group": g,
            **_table_metrics(p, n, bins=agg["bins"], threshold=agg["threshold"]),
        }
        for d, g, p, n in _pairs(_tables(agg))
    ]
    return {
        "site": agg["site"],
        "model": agg.get("model"),
        "threshold": agg["threshold"],
        "tables": rows,
    }


def network(aggs: list[dict]) -> dict:
    """Pool site exports: pooled ROC/AUROC (DeLong), per-site tables, heterogeneity (module doc)."""
    if len(aggs) < 1:
        raise InputError("evaluate-network needs at least one site aggregate")
    bins = aggs[0]["bins"]
    for a in aggs[1:]:
        if a["bins"] != bins:
            raise InputError(
                f"site {a['site']!r} uses bins {a['bins']}, site {aggs[0]['site']!r} {bins}: "
                "export every site with the same --bins"
            )
    names = [a["site"] for a in aggs]
    if len(set(names)) != len(names):
        raise InputError(f"site names must differ (--site-name at export), got {names}")
    notes = [REFERENCE_NOTE]
    thresholds = sorted({a["threshold"] for a in aggs})
    if len(thresholds) > 1:
        notes.append(
            f"sites used different thresholds {thresholds}; pooled rates use {thresholds[0]}"
        )
    versions = sorted({str((a.get("model") or {}).get("version")) for a in aggs})
    if len(versions) > 1:
        notes.append(f"sites ran different model versions {versions}")
    sites = [site_summary(a) for a in aggs]
    per_site = [{(d, g): (p, n) for d, g, p, n in _pairs(_tables(a))} for a in aggs]
    keys = sorted({key for t in per_site for key in t}, key=lambda x: (x[0] != "all", x))
    pooled = []
    for dim, group in keys:
        having = [t[(dim, group)] for t in per_site if (dim, group) in t]
        pos = [c for p, _ in having for c in p]
        neg = [c for _, n in having for c in n]
        m = _table_metrics(pos, neg, bins=bins, threshold=thresholds[0])
        pooled.append({"subgroup": dim, "group": group, "sites": len(having), **m})
    overall = [s for s in sites if s["tables"] and s["tables"][0]["subgroup"] == "all"]
    est = [s["tables"][0]["auroc"]["value"] for s in overall]
    var = [s["tables"][0]["auroc"]["variance"] for s in overall]
    het = M.heterogeneity(np.asarray(est, float), np.asarray(var, float))
    overall_cells = [t[("all", "all")] for t in per_site if ("all", "all") in t]
    all_pos = [c for p, _ in overall_cells for c in p]
    all_neg = [c for _, n in overall_cells for c in n]
    p, q = _spread(all_pos, bins["n"]), _spread(all_neg, bins["n"])
    tpr = np.r_[np.cumsum(p[::-1])[::-1], 0.0] / max(p.sum(), 1e-300)
    fpr = np.r_[np.cumsum(q[::-1])[::-1], 0.0] / max(q.sum(), 1e-300)
    edges = bins["low"] + (bins["high"] - bins["low"]) * np.arange(bins["n"] + 1) / bins["n"]
    return _finite(
        {
            "schema": NETWORK_SCHEMA,
            "sites": names,
            "bins": bins,
            "pooled": pooled,
            "per_site": sites,
            "random_effects_auroc": _clip(het.random),
            "fixed_effect_auroc": _clip(het.fixed),
            "heterogeneity": {
                "q": het.q,
                "df": het.df,
                "p_value": het.p_value,
                "i2": het.i2,
                "tau2": het.tau2,
                "of": "per-site overall AUROCs (inverse DeLong variance weights)",
            },
            "roc": {
                "threshold": edges.tolist(),
                "fpr": np.clip(fpr, 0.0, 1.0).tolist(),
                "tpr": np.clip(tpr, 0.0, 1.0).tolist(),
            },
            "interval_method": "DeLong variance from the pooled bin counts, 95% interval on the logit scale; studies taken as independent",
            "notes": notes,
        }
    )


def _clip(e: M.Estimate) -> dict:
    """A pooled AUROC with its normal interval clipped to [0, 1]."""
    return {
        "value": e.value,
        "ci_low": max(0.0, e.ci_low) if math.isfinite(e.ci_low) else None,
        "ci_high": min(1.0, e.ci_high) if math.isfinite(e.ci_high) else None,
        "method": "DerSimonian-Laird over per-site AUROCs, normal interval clipped to [0, 1]",
    }


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj
