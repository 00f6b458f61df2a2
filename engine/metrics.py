"""Detection metrics in NumPy, scored the way picai_eval (PANORAMA) scores them.

Case level (``y`` in {0, 1}, ``score`` = ``pdac_probability``; a case is flagged when
``score >= threshold``): AUROC (Mann-Whitney, ties counted one half), average precision (step
interpolation, as scikit-learn), sensitivity and specificity at a threshold and at stated
specificities, each with counts. Confidence intervals are percentile bootstraps over cases,
resampled within each class (so both classes are always present) with a seeded RNG; the operating
point "at 95% specificity" is chosen again inside each resample.

Lesion level: candidates (score, is true positive) per case, from either

* :func:`match_by_centre` (no label maps): a predicted lesion is a hit when its centre lies within
  the true lesion's radius (``diameter / 2``) plus ``tolerance_mm``. This is an *approximation* of
  picai_eval's criterion, usable when only centres and diameters are known; or
* :func:`match_by_mask` (label maps): components with 26-connectivity, a hit when IoU >= 0.1.

Several candidates on one true lesion count one true positive (the highest score) and no false
positive. FROC: lesion sensitivity against false positives per case.

All weights-based functions take integer case weights so that one vectorised pass scores every
bootstrap resample at once (``weights`` shape ``(B, n)``).

Lead time and federated evaluation (``flows/leadtime.py``, ``flows/federated.py``) add: a bootstrap
that resamples patients (:func:`cluster_bootstrap_weights`) with weighted AUROC, rates and medians;
AUROC, DeLong variance and bounds from binned counts (:func:`auroc_from_counts`,
:func:`auroc_variance_from_counts`, :func:`auroc_bounds_from_cells`); Cochran's Q / I^2 with
DerSimonian-Laird pooling (:func:`heterogeneity`).  The functions above them are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Estimate",
    "Rate",
    "OperatingPoint",
    "CaseMetrics",
    "Candidates",
    "LesionMetrics",
    "roc_auc",
    "average_precision",
    "roc_curve",
    "confusion_at",
    "threshold_at_specificity",
    "case_metrics",
    "match_by_centre",
    "match_by_mask",
    "froc",
    "lesion_metrics",
    "sensitivity_by_band",
    "Heterogeneity",
    "cluster_bootstrap_weights",
    "weighted_auroc",
    "weighted_rate",
    "weighted_median",
    "percentile_interval",
    "auroc_from_counts",
    "auroc_variance_from_counts",
    "auroc_interval",
    "auroc_bounds_from_cells",
    "heterogeneity",
]

FP_LEVELS = (0.125, 0.25, 0.5, 1.0, 2.0)
_MAX_BLOCK = 2_000_000  # elements of one (B, n) block of bootstrap weights


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95% interval (NaN when undefined)."""

    value: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Rate:
    """A proportion ``numerator / denominator`` with its bootstrap 95% interval."""

    value: float
    ci_low: float
    ci_high: float
    numerator: int
    denominator: int


@dataclass(frozen=True)
class OperatingPoint:
    """Sensitivity and specificity when flagging ``score >= threshold``.

    ``target_specificity`` is set for points chosen to reach a stated specificity.
    """

    threshold: float
    sensitivity: Rate
    specificity: Rate
    target_specificity: float | None = None


@dataclass(frozen=True)
class CaseMetrics:
    n: int
    n_positive: int
    n_negative: int
    auroc: Estimate
    average_precision: Estimate
    at_threshold: OperatingPoint
    at_specificity: tuple[OperatingPoint, ...]


# ---------------------------------------------------------------------- core (weighted, batched)
def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape or y.ndim != 1:
        raise ValueError(f"y and score must be 1-D of one length, got {y.shape} and {score.shape}")
    if not np.all(np.isfinite(score)):
        raise ValueError("score must be finite (drop cases without a score first)")
    return y, score


class _Groups:
    """Cases grouped by distinct score (ascending) to score many weightings at once."""

    def __init__(self, y: np.ndarray, score: np.ndarray) -> None:
        self.y, self.score = _check(y, score)
        self.order = np.argsort(self.score, kind="stable")
        s = self.score[self.order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.array([], int)
        self.values = s[self.starts]
        self.pos_sorted = self.y[self.order]

    def split(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative weight per score group: two ``(B, G)`` arrays."""
        w = np.atleast_2d(weights)[:, self.order].astype(np.float64)
        pos = np.add.reduceat(w * self.pos_sorted, self.starts, axis=1)
        neg = np.add.reduceat(w * ~self.pos_sorted, self.starts, axis=1)
        return pos, neg


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    below = np.cumsum(neg, axis=1) - neg
    num = np.sum(pos * (below + 0.5 * neg), axis=1)
    return _div(num, pos.sum(1) * neg.sum(1))


def _ap(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    tps = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]  # flagged at each group's score
    fps = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    prec = _div(tps, tps + fps)
    return _div(np.nansum(pos * np.nan_to_num(prec), axis=1), pos.sum(1))


def _at_threshold(g: _Groups, pos, neg, threshold: float):
    """Sensitivity/specificity numerators and denominators for ``score >= threshold``."""
    k = np.searchsorted(g.values, threshold, side="left")  # groups >= threshold are flagged
    tp, tn = pos[:, k:].sum(1), neg[:, :k].sum(1)
    return tp, pos.sum(1), tn, neg.sum(1)


def _at_specificity(g: _Groups, pos, neg, target: float):
    """Smallest threshold reaching ``target`` specificity: (group index, tp, P, tn, N)."""
    n_neg = neg.sum(1, keepdims=True)
    below = np.cumsum(neg, axis=1) - neg  # negatives under each group's score
    spec = np.concatenate([_div(below, n_neg), np.ones((pos.shape[0], 1))], axis=1)
    k = np.argmax(spec >= target - 1e-12, axis=1)
    pos_ext = np.concatenate([np.cumsum(pos, axis=1) - pos, pos.sum(1, keepdims=True)], axis=1)
    neg_ext = np.concatenate([below, n_neg], axis=1)
    rows = np.arange(pos.shape[0])
    tp = pos.sum(1) - pos_ext[rows, k]
    return k, tp, pos.sum(1), neg_ext[rows, k], n_neg[:, 0]


def _bootstrap_weights(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` case counts of stratified resamples (each class resampled to its size)."""
    n = y.size
    w = np.zeros((n_boot, n), dtype=np.float64)
    for cls in (np.flatnonzero(y), np.flatnonzero(~y)):
        if cls.size == 0:
            continue
        draw = cls[rng.integers(0, cls.size, (n_boot, cls.size))]
        flat = (draw + (np.arange(n_boot) * n)[:, None]).ravel()
        w += np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n)
    return w


def _ci(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------------- public single-shot metrics
def roc_auc(y, score, sample_weight=None) -> float:
    """Area under the ROC curve (ties count 1/2); NaN when a class is absent."""
    g = _Groups(y, score)
    w = np.ones(g.y.size) if sample_weight is None else np.asarray(sample_weight, float)
    return float(_auroc(*g.split(w))[0])


def average_precision(y, score, sample_weight=None) -> float:
    """Average precision: sum over distinct thresholds of (recall step) x precision."""
    g = _Groups(y, score)
    w = np.ones(g.y.size) if sample_weight is None else np.asarray(sample_weight, float)
    return float(_ap(*g.split(w))[0])


def roc_curve(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending from +inf, one point per distinct score."""
    g = _Groups(y, score)
    pos, neg = g.split(np.ones(g.y.size))
    tps = np.r_[0.0, np.cumsum(pos[0, ::-1])]
    fps = np.r_[0.0, np.cumsum(neg[0, ::-1])]
    thr = np.r_[np.inf, g.values[::-1]]
    return _div(fps, np.array(fps[-1])), _div(tps, np.array(tps[-1])), thr


def confusion_at(y, score, threshold: float) -> tuple[int, int, int, int]:
    """(tp, fn, tn, fp) when flagging ``score >= threshold``."""
    y, score = _check(y, score)
    flag = score >= threshold
    return (
        int(np.sum(flag & y)),
        int(np.sum(~flag & y)),
        int(np.sum(~flag & ~y)),
        int(np.sum(flag & ~y)),
    )


def threshold_at_specificity(y, score, target: float) -> float:
    """The smallest threshold whose specificity is >= ``target`` (+inf if only flagging none)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target specificity must be in (0, 1], got {target}")
    g = _Groups(y, score)
    k = _at_specificity(g, *g.split(np.ones(g.y.size)), target)[0][0]
    return float(g.values[k]) if k < g.values.size else float("inf")


# ---------------------------------------------------------------------- case metrics with CIs
def case_metrics(
    y,
    score,
    *,
    threshold: float,
    specificities: Sequence[float] = (0.95, 0.99),
    n_boot: int = 1000,
    seed: int = 0,
) -> CaseMetrics:
    """Case-level metrics with stratified percentile-bootstrap 95% intervals.

    Args:
        y: reference labels, 1 = PDAC, shape ``(n,)``.
        score: case scores (``pdac_probability``), shape ``(n,)``.
        threshold: the model's operating threshold (flag when ``score >= threshold``).
        specificities: stated specificities at which to report sensitivity.
        n_boot: bootstrap resamples (0: no intervals).
        seed: seed of the resampling RNG (same inputs and seed -> same intervals).
    """
    g = _Groups(y, score)
    pos, neg = g.split(np.ones(g.y.size))
    rng = np.random.default_rng(seed)
    targets = tuple(float(t) for t in specificities)
    boot: dict[str, list[np.ndarray]] = {}
    if n_boot > 0 and g.y.size:
        block = max(1, _MAX_BLOCK // max(1, g.y.size))
        for start in range(0, n_boot, block):
            bp, bn = g.split(_bootstrap_weights(g.y, min(block, n_boot - start), rng))
            tp, p, tn, n = _at_threshold(g, bp, bn, threshold)
            parts = {
                "auroc": _auroc(bp, bn),
                "ap": _ap(bp, bn),
                "sens": _div(tp, p),
                "spec": _div(tn, n),
            }
            for t in targets:
                _, tp, p, tn, n = _at_specificity(g, bp, bn, t)
                parts[f"sens@{t}"], parts[f"spec@{t}"] = _div(tp, p), _div(tn, n)
            for k, v in parts.items():
                boot.setdefault(k, []).append(v)
    ci = {k: _ci(np.concatenate(v)) for k, v in boot.items()}
    nan2 = (float("nan"), float("nan"))

    def est(key: str, value: float) -> Estimate:
        return Estimate(float(value), *ci.get(key, nan2))

    def rate(key: str, num: float, den: float) -> Rate:
        value = float(num / den) if den > 0 else float("nan")
        return Rate(value, *ci.get(key, nan2), numerator=int(num), denominator=int(den))

    tp, p, tn, n = (float(v[0]) for v in _at_threshold(g, pos, neg, threshold))
    at_thr = OperatingPoint(float(threshold), rate("sens", tp, p), rate("spec", tn, n))
    points = []
    for t in targets:
        k, tp_, p_, tn_, n_ = (v[0] for v in _at_specificity(g, pos, neg, t))
        thr = float(g.values[k]) if k < g.values.size else float("inf")
        points.append(
            OperatingPoint(thr, rate(f"sens@{t}", tp_, p_), rate(f"spec@{t}", tn_, n_), t)
        )
    return CaseMetrics(
        n=int(g.y.size),
        n_positive=int(g.y.sum()),
        n_negative=int((~g.y).sum()),
        auroc=est("auroc", _auroc(pos, neg)[0]),
        average_precision=est("ap", _ap(pos, neg)[0]),
        at_threshold=at_thr,
        at_specificity=tuple(points),
    )


# ---------------------------------------------------------------------- lesion level
@dataclass(frozen=True)
class Candidates:
    """Lesion candidates of a set of cases, after matching to the reference lesions.

    ``score[i]``, ``is_tp[i]``, ``case[i]`` describe candidate ``i``; ``lesions_per_case[c]`` counts
    the reference lesions of case ``c`` (true positives are at most one per reference lesion).
    """

    score: np.ndarray
    is_tp: np.ndarray
    case: np.ndarray
    lesions_per_case: np.ndarray

    @property
    def n_cases(self) -> int:
        return int(self.lesions_per_case.size)

    @property
    def n_lesions(self) -> int:
        return int(self.lesions_per_case.sum())


def match_by_centre(
    *,
    pred_center: np.ndarray,
    pred_score: np.ndarray,
    true_center: np.ndarray,
    true_diameter: np.ndarray,
    tolerance_mm: float = 5.0,
) -> Candidates:
    """Match one predicted lesion per case to at most one reference lesion per case, by centre.

    Args:
        pred_center: ``(n, 3)`` predicted lesion centres (patient LPS, mm); NaN rows = none.
        pred_score: ``(n,)`` candidate scores (the case probability).
        true_center: ``(n, 3)`` reference centres (mm); NaN rows = no lesion.
        true_diameter: ``(n,)`` reference diameters (mm).
        tolerance_mm: added to the reference radius.

    A hit: ``|pred - true| <= true_diameter / 2 + tolerance_mm`` (an approximation of IoU >= 0.1).
    """
    pc_ = np.asarray(pred_center, float).reshape(-1, 3)
    tc = np.asarray(true_center, float).reshape(-1, 3)
    diam = np.asarray(true_diameter, float)
    has_pred = np.all(np.isfinite(pc_), axis=1)
    has_true = np.all(np.isfinite(tc), axis=1) & np.isfinite(diam)
    with np.errstate(invalid="ignore"):
        dist = np.linalg.norm(pc_ - tc, axis=1)
        hit = has_pred & has_true & (dist <= diam / 2.0 + tolerance_mm)
    cases = np.flatnonzero(has_pred)
    return Candidates(
        score=np.asarray(pred_score, float)[cases],
        is_tp=hit[cases],
        case=cases,
        lesions_per_case=has_true.astype(np.int64),
    )


def match_by_mask(
    pred: np.ndarray, truth: np.ndarray, *, case_score: float, min_iou: float = 0.1
) -> tuple[list[float], list[bool], int]:
    """Match predicted components to reference lesions in one case by IoU (26-connectivity).

    Args:
        pred: ``(z, y, x)`` predicted lesion mask (bool/int) or detection map (float, 0 = none;
            a component's score is its maximum).
        truth: ``(z, y, x)`` reference lesion mask on the same grid.
        case_score: score of components of a binary ``pred``.

    Returns:
        (candidate scores, candidate is-TP flags, number of reference lesions).
    """
    from scipy import ndimage

    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth grids differ: {pred.shape} vs {truth.shape}")
    structure = np.ones((3, 3, 3), bool)
    true_lab, n_true = ndimage.label(truth > 0, structure=structure)
    pred_lab, n_pred = ndimage.label(pred > 0, structure=structure)
    if n_pred == 0:
        return [], [], int(n_true)
    idx = np.arange(1, n_pred + 1)
    if (
        np.issubdtype(pred.dtype, np.floating)
        and pred.max() <= 1.0
        and np.any((pred > 0) & (pred < 1))
    ):
        scores = np.asarray(ndimage.maximum(pred, pred_lab, idx), float)
    else:
        scores = np.full(n_pred, float(case_score))
    inter = np.bincount(
        pred_lab.ravel() * (n_true + 1) + true_lab.ravel(), minlength=(n_pred + 1) * (n_true + 1)
    ).reshape(n_pred + 1, n_true + 1)[1:, 1:]
    size_p = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]
    size_t = np.bincount(true_lab.ravel(), minlength=n_true + 1)[1:]
    iou = inter / (size_p[:, None] + size_t[None, :] - inter)
    match = iou >= min_iou
    out_s, out_tp = [], []
    for t in range(n_true):  # one TP per reference lesion, at the best matching score
        if match[:, t].any():
            out_s.append(float(scores[match[:, t]].max()))
            out_tp.append(True)
    for p in np.flatnonzero(~match.any(axis=1)):  # unmatched components: false positives
        out_s.append(float(scores[p]))
        out_tp.append(False)
    return out_s, out_tp, int(n_true)


def froc(c: Candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives per case, lesion sensitivity, thresholds), thresholds descending."""
    if c.score.size == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    order = np.argsort(-c.score, kind="stable")
    s, tp = c.score[order], c.is_tp[order]
    last = np.r_[s[1:] != s[:-1], True]  # last candidate of each distinct score
    tps, fps = np.cumsum(tp)[last], np.cumsum(~tp)[last]
    sens = tps / c.n_lesions if c.n_lesions else np.full(tps.shape, np.nan)
    return np.r_[0.0, fps / max(c.n_cases, 1)], np.r_[0.0, sens], np.r_[np.inf, s[last]]


@dataclass(frozen=True)
class LesionMetrics:
    """Lesion-level results: hit rate at the threshold, lesion AP, FROC points."""

    method: str
    n_cases: int
    n_lesions: int
    hit_rate: Rate
    false_positives_per_case: float
    lesion_average_precision: float
    sensitivity_at_fp: dict[str, float]
    froc_fp_per_case: tuple[float, ...]
    froc_sensitivity: tuple[float, ...]


def lesion_metrics(
    c: Candidates, *, threshold: float, method: str, n_boot: int = 1000, seed: int = 0
) -> LesionMetrics:
    """Hit rate (reference lesions hit by a candidate scoring >= threshold) with a case bootstrap
    interval, FP per case at the threshold, lesion AP (recall over all reference lesions) and FROC.
    """
    hits = np.bincount(c.case[c.is_tp & (c.score >= threshold)], minlength=c.n_cases)[: c.n_cases]
    fp = int(np.sum(~c.is_tp & (c.score >= threshold)))
    lo = hi = float("nan")
    if n_boot > 0 and c.n_lesions:
        rng = np.random.default_rng(seed)
        w = _bootstrap_weights(np.zeros(c.n_cases, bool), n_boot, rng)
        lo, hi = _ci(_div(w @ hits, w @ c.lesions_per_case))
    hit = Rate(
        float(hits.sum() / c.n_lesions) if c.n_lesions else float("nan"),
        lo,
        hi,
        numerator=int(hits.sum()),
        denominator=c.n_lesions,
    )
    fps, sens, _ = froc(c)
    # Curve corners only (last point before each new FP, first after), at most ~2000 points.
    corner = np.r_[True, fps[1:] != fps[:-1]] | np.r_[fps[1:] != fps[:-1], True]
    keep = np.flatnonzero(corner)
    keep = keep[np.unique(np.linspace(0, keep.size - 1, min(keep.size, 2000)).astype(int))]
    at_fp = {
        str(level): float(np.max(sens[fps <= level])) if np.any(fps <= level) else float("nan")
        for level in FP_LEVELS
    }
    # Lesion AP: precision over candidates, recall over all reference lesions (missed ones count).
    ap = float("nan")
    if c.n_lesions and c.score.size:
        order = np.argsort(-c.score, kind="stable")
        s, tp = c.score[order], c.is_tp[order]
        last = np.r_[s[1:] != s[:-1], True]
        tps, fps_ = np.cumsum(tp)[last], np.cumsum(~tp)[last]
        ap = float(np.sum(np.diff(np.r_[0, tps]) / c.n_lesions * tps / (tps + fps_)))
    return LesionMetrics(
        method=method,
        n_cases=c.n_cases,
        n_lesions=c.n_lesions,
        hit_rate=hit,
        false_positives_per_case=fp / c.n_cases if c.n_cases else float("nan"),
        lesion_average_precision=ap,
        sensitivity_at_fp=at_fp,
        froc_fp_per_case=tuple(float(v) for v in fps[keep]),
        froc_sensitivity=tuple(float(v) for v in sens[keep]),
    )


def _band_names(edges: Sequence[float]) -> list[str]:
    e = [f"{v:g}" for v in edges]
    return (
        [f"< {e[0]}"] + [f"{a}-{b}" for a, b in zip(e[:-1], e[1:], strict=True)] + [f">= {e[-1]}"]
    )


def sensitivity_by_band(
    scores,
    labels,
    values,
    *,
    threshold: float,
    edges: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Rate]:
    """Sensitivity at ``threshold`` of the positive cases, grouped by a per-case value.

    Bands are ``< e0``, ``e0-e1``, ..., ``>= e_last`` over ascending ``edges`` (a value equal to an
    edge falls in the upper band), e.g. ``edges=(2, 4)`` on lesion d' gives ``< 2``, ``2-4``,
    ``>= 4``; positives with a NaN value form an ``unknown`` band.  Negatives are ignored and a NaN
    score counts as not flagged.  Only bands holding positives are returned, in order; each
    :class:`Rate` carries a percentile bootstrap 95% interval over that band's positives (seeded).
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, float)
    v = np.asarray(values, float)
    e = np.asarray(edges, float)
    if not (y.shape == s.shape == v.shape and y.ndim == 1):
        raise ValueError(
            f"scores, labels and values must be 1-D of one length, got {s.shape}, {y.shape}, "
            f"{v.shape}"
        )
    if e.ndim != 1 or e.size == 0 or np.any(np.diff(e) <= 0) or not np.all(np.isfinite(e)):
        raise ValueError(f"edges must be finite and strictly ascending, got {list(edges)!r}")
    flagged = s >= float(threshold)
    band = np.searchsorted(e, v, side="right")
    names = _band_names(e)
    rng = np.random.default_rng(seed)
    out: dict[str, Rate] = {}
    groups = [(names[i], y & (band == i) & ~np.isnan(v)) for i in range(len(names))]
    for name, mask in groups + [("unknown", y & np.isnan(v))]:
        n = int(mask.sum())
        if n == 0:
            continue
        k = int(flagged[mask].sum())
        lo = hi = float("nan")
        if n_boot > 0:
            lo, hi = _ci(rng.binomial(n, k / n, size=n_boot) / n)
        out[name] = Rate(k / n, lo, hi, numerator=k, denominator=n)
    return out


# ---------------------------------------------------------------------- patient-clustered bootstrap
def cluster_bootstrap_weights(
    clusters, n_boot: int, rng: np.random.Generator, *, strata=None
) -> np.ndarray:
    """``(n_boot, n)`` case weights of a bootstrap that resamples *clusters* (patients), not cases.

    Each resample draws, within each stratum, as many clusters as the stratum holds, with
    replacement; a case's weight is the number of times its cluster was drawn, so all studies of a
    patient enter or leave a resample together.  ``strata`` (per case, constant within a cluster,
    e.g. "patient is later diagnosed") keeps both classes present in every resample.
    """
    cl = np.asarray(clusters).astype(str)
    if cl.ndim != 1:
        raise ValueError(f"clusters must be 1-D, got shape {cl.shape}")
    codes, inv = np.unique(cl, return_inverse=True)
    st = np.zeros(cl.size, np.int64) if strata is None else np.asarray(strata)
    if st.shape != cl.shape:
        raise ValueError(f"strata must match clusters' shape {cl.shape}, got {st.shape}")
    cluster_stratum = np.zeros(codes.size, dtype=st.dtype)
    cluster_stratum[inv] = st
    if np.any(cluster_stratum[inv] != st):
        raise ValueError("strata must be constant within each cluster")
    counts = np.zeros((n_boot, codes.size), np.float64)
    for s in np.unique(cluster_stratum):
        members = np.flatnonzero(cluster_stratum == s)
        draw = members[rng.integers(0, members.size, (n_boot, members.size))]
        flat = (draw + (np.arange(n_boot) * codes.size)[:, None]).ravel()
        counts += np.bincount(flat, minlength=n_boot * codes.size).reshape(n_boot, codes.size)
    return counts[:, inv]


def weighted_auroc(y, score, weights) -> np.ndarray:
    """AUROC under each row of case weights: ``weights`` ``(B, n)`` or ``(n,)`` -> ``(B,)``."""
    g = _Groups(y, score)
    return _auroc(*g.split(np.atleast_2d(np.asarray(weights, float))))


def weighted_rate(event, at_risk, weights) -> np.ndarray:
    """``sum(w * event * at_risk) / sum(w * at_risk)`` per row of ``weights`` (NaN when empty)."""
    w = np.atleast_2d(np.asarray(weights, float))
    e, r = np.asarray(event, bool), np.asarray(at_risk, bool)
    return _div(w @ (e & r).astype(float), w @ r.astype(float))


def weighted_median(values, weights) -> np.ndarray:
    """The median of ``values`` repeated ``weights`` times (integer weights), per row -> ``(B,)``.

    Equals ``np.median(np.repeat(values, w))``: the mean of the two middle values of an even count.
    """
    v = np.asarray(values, float)
    w = np.atleast_2d(np.asarray(weights, float))
    if v.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(w[:, order], axis=1)
    total = cum[:, -1]
    lo_q, hi_q = np.floor((total - 1) / 2), np.floor(total / 2)
    lo = np.argmax(cum > lo_q[:, None], axis=1)
    hi = np.argmax(cum > hi_q[:, None], axis=1)
    return np.where(total > 0, (v[lo] + v[hi]) / 2.0, np.nan)


def percentile_interval(samples) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the finite ``samples`` (NaN, NaN when none)."""
    return _ci(np.asarray(samples, float))


# ---------------------------------------------------------------------- metrics from binned counts
def auroc_from_counts(pos, neg) -> float:
    """AUROC from counts per score bin (bins ascending); cases in one bin count as ties (1/2)."""
    p, n = np.atleast_2d(np.asarray(pos, float)), np.atleast_2d(np.asarray(neg, float))
    return float(_auroc(p, n)[0])


def auroc_variance_from_counts(pos, neg) -> float:
    """DeLong's variance of the AUROC from counts per score bin (bins ascending, ties 1/2).

    Structural components: a positive in bin g scores ``V10_g = (N below g + N in g / 2) / N``, a
    negative ``V01_g = (P above g + P in g / 2) / P``; ``var = S10 / P + S01 / N`` with S the
    weighted sample variances.  Cases are taken as independent (counts carry no patient).
    """
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    P, N = p.sum(), n.sum()
    if P < 2 or N < 2:
        return float("nan")
    v10 = (np.cumsum(n) - n + 0.5 * n) / N
    v01 = (P - np.cumsum(p) + 0.5 * p) / P
    a = float(np.sum(p * v10) / P)
    s10 = np.sum(p * (v10 - a) ** 2) / (P - 1)
    s01 = np.sum(n * (v01 - a) ** 2) / (N - 1)
    return float(s10 / P + s01 / N)


def auroc_interval(auroc: float, variance: float, z: float = 1.959964) -> tuple[float, float]:
    """A 95% interval for an AUROC from its variance, on the logit scale (stays inside (0, 1))."""
    if not (np.isfinite(auroc) and np.isfinite(variance)) or not 0.0 < auroc < 1.0:
        return float("nan"), float("nan")
    lg = np.log(auroc / (1.0 - auroc))
    half = z * np.sqrt(variance) / (auroc * (1.0 - auroc))
    return float(1.0 / (1.0 + np.exp(-(lg - half)))), float(1.0 / (1.0 + np.exp(-(lg + half))))


def auroc_bounds_from_cells(pos_cells, neg_cells) -> tuple[float, float]:
    """Bounds on the AUROC of cases known only as counts in score intervals ``[lo, hi)``.

    ``pos_cells`` / ``neg_cells``: ``(m, 3)`` rows ``(lo, hi, count)``.  A positive-negative pair
    is ordered when the cells do not overlap (``neg.hi <= pos.lo``: the positive is higher); pairs
    in overlapping cells (or one bin) are unordered and count 0 for the lower bound, 1 for the
    upper.  The AUROC of the underlying cases (ties 1/2) lies between the two.
    """
    pc, nc = (
        np.asarray(pos_cells, float).reshape(-1, 3),
        np.asarray(neg_cells, float).reshape(-1, 3),
    )
    P, N = pc[:, 2].sum(), nc[:, 2].sum()
    if P == 0 or N == 0:
        return float("nan"), float("nan")
    by_hi, by_lo = np.argsort(nc[:, 1]), np.argsort(nc[:, 0])
    cum_hi = np.r_[0.0, np.cumsum(nc[by_hi, 2])]
    cum_lo = np.r_[0.0, np.cumsum(nc[by_lo, 2])]
    below = cum_hi[np.searchsorted(nc[by_hi, 1], pc[:, 0], side="right")]  # neg.hi <= pos.lo
    above = N - cum_lo[np.searchsorted(nc[by_lo, 0], pc[:, 1], side="left")]  # neg.lo >= pos.hi
    lo = float(np.sum(pc[:, 2] * below) / (P * N))
    hi = float(1.0 - np.sum(pc[:, 2] * above) / (P * N))
    return lo, hi


@dataclass(frozen=True)
class Heterogeneity:
    """Between-study heterogeneity of estimates with known variances (inverse-variance weights).

    ``q``: Cochran's Q; ``i2``: Higgins' I^2 = max(0, (Q - df) / Q); ``tau2``: DerSimonian-Laird
    between-site variance; ``fixed`` / ``random``: the fixed- and random-effects pooled estimates
    with normal 95% intervals.
    """

    q: float
    df: int
    p_value: float
    i2: float
    tau2: float
    fixed: Estimate
    random: Estimate


def heterogeneity(estimates, variances) -> Heterogeneity:
    """Cochran's Q, I^2 and DerSimonian-Laird pooling of per-site estimates (e.g. AUROCs)."""
    from scipy.stats import chi2

    e, v = np.asarray(estimates, float), np.asarray(variances, float)
    if e.shape != v.shape or e.ndim != 1:
        raise ValueError(
            f"estimates and variances must be 1-D of one length, got {e.shape}, {v.shape}"
        )
    ok = np.isfinite(e) & np.isfinite(v) & (v > 0)
    e, v = e[ok], v[ok]
    nan = float("nan")
    if e.size == 0:
        return Heterogeneity(
            nan, 0, nan, nan, nan, Estimate(nan, nan, nan), Estimate(nan, nan, nan)
        )
    w = 1.0 / v
    fixed = float(np.sum(w * e) / w.sum())
    df = int(e.size - 1)
    q = float(np.sum(w * (e - fixed) ** 2))
    c = float(w.sum() - np.sum(w**2) / w.sum())
    tau2 = max(0.0, (q - df) / c) if df > 0 and c > 0 else 0.0
    wr = 1.0 / (v + tau2)
    rand = float(np.sum(wr * e) / wr.sum())
    z = 1.959964
    se_f, se_r = float(np.sqrt(1.0 / w.sum())), float(np.sqrt(1.0 / wr.sum()))
    return Heterogeneity(
        q=q,
        df=df,
        p_value=float(chi2.sf(q, df)) if df > 0 else nan,
        i2=max(0.0, (q - df) / q) if df > 0 and q > 0 else 0.0,
        tau2=float(tau2),
        fixed=Estimate(fixed, fixed - z * se_f, fixed + z * se_f),
        random=Estimate(rand, rand - z * se_r, rand + z * se_r),
    )
