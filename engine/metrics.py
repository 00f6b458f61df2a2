"""Case-level detection metrics (as picai_eval reports them), NumPy only.

``scores``: case scores (higher = more likely PDAC); ``labels``: 1 PDAC, 0 not.
"""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "sensitivity_at", "specificity_at", "threshold_for_specificity", "bootstrap_ci"]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); NaN with one class."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv), float)
    ranks_sorted = np.arange(1, len(allv) + 1, dtype=float)
    # average ranks over ties
    _, first, counts = np.unique(allv, return_index=True, return_counts=True)
    for f, c in zip(first, counts, strict=True):
        ranks_sorted[f : f + c] = ranks_sorted[f : f + c].mean()
    ranks[order] = ranks_sorted
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def sensitivity_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    return float((s[y] >= threshold).mean()) if y.any() else float("nan")


def specificity_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    return float((s[~y] < threshold).mean()) if (~y).any() else float("nan")


def threshold_for_specificity(scores: np.ndarray, labels: np.ndarray, specificity: float) -> float:
    """Lowest threshold whose specificity on these negatives is >= ``specificity``."""
    neg = np.sort(np.asarray(scores, float)[~np.asarray(labels).astype(bool)])
    if len(neg) == 0:
        return float("nan")
    k = int(np.ceil(specificity * len(neg))) - 1
    return float(np.nextafter(neg[min(max(k, 0), len(neg) - 1)], np.inf))


def bootstrap_ci(
    scores: np.ndarray, labels: np.ndarray, fn, *, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``fn(scores, labels)`` (cases resampled)."""
    s, y = np.asarray(scores, float), np.asarray(labels)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(s), len(s))
        v = fn(s[idx], y[idx])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))
