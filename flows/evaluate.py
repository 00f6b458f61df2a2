"""``pdacscreen evaluate STORE --labels FILE``: findings against reference labels, with intervals.

Steps: pick the model (``--model-version``, else the most recently used one) and each study's latest
row for it; join to the labels by ``study_instance_uid``; list every study that cannot be scored
(failed, skipped, not processed, no label, label missing or invalid) with its reason; score the rest
with :mod:`pdacscreen.engine.metrics` (case level, lesion level, subgroups); write ``metrics.json``,
``exclusions.csv``, PNG plots and ``report.html`` (:mod:`pdacscreen.flows.report`).

Subgroups (``--by``): ``size`` (reference lesion diameter < 20 mm / >= 20 mm) and ``location``
(head / body / tail) group the *positive* cases and keep every negative in each group (so
specificity is the overall one); ``vendor``, ``thickness`` and ``site`` group all cases.
Beside them, ``sensitivity_by_band`` gives the positives' sensitivity at the operating threshold by
reference diameter (< 20 / >= 20 mm) and, when the labels have ``lesion_dprime`` (the phantom truth
table's ideal-observer detectability, :mod:`pdacscreen.io.phantom.observer`), by d' (< 2, 2-4, >= 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pdacscreen.engine import metrics as M
from pdacscreen.io.errors import InputError
from pdacscreen.io.store import FindingsStore

__all__ = ["SUBGROUPS", "Evaluation", "evaluate", "load_labels", "write"]

log = logging.getLogger(__name__)

SUBGROUPS = ("size", "location", "vendor", "thickness", "site")
PRED_MASK_NAMES = ("lesion_mask.nii.gz", "lesion_mask.npy")
HIT_CRITERIA = {
    "centre_distance": "a predicted lesion is a hit when its centre lies within the reference "
    "lesion's radius (diameter / 2) plus {tol:g} mm: an approximation of picai_eval's IoU >= 0.1 "
    "criterion, used because label maps were not given",
    "mask_iou": "a predicted component (26-connectivity) is a hit when its IoU with a reference "
    "lesion is >= 0.1 (picai_eval); several candidates on one lesion count one true positive",
}


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` found: JSON-ready metrics, curves for plots and the exclusions."""

    metrics: dict
    roc: tuple[np.ndarray, np.ndarray]
    exclusions: pd.DataFrame
    froc: tuple[np.ndarray, np.ndarray] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    cases: pd.DataFrame | None = None  # the evaluated cases (for --export-aggregate), never written


def load_labels(path: Path) -> pd.DataFrame:
    """Read a labels file (Parquet or CSV) with at least ``study_instance_uid`` and ``label``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--labels must be an existing .parquet or .csv file, got {str(path)!r}")
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, dtype={"study_instance_uid": str})
    elif path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        raise InputError(f"--labels must end in .parquet or .csv, got {path.name!r}")
    missing = [c for c in ("study_instance_uid", "label") if c not in df.columns]
    if missing:
        raise InputError(f"labels file {path} lacks column(s) {missing}; has {list(df.columns)}")
    df["study_instance_uid"] = df["study_instance_uid"].astype(str)
    dup = df["study_instance_uid"][df["study_instance_uid"].duplicated()]
    if len(dup):
        raise InputError(f"labels file {path}: study_instance_uid {dup.iloc[0]!r} appears twice")
    return df


def _select_model(findings: pd.DataFrame, model_version: str | None) -> tuple[pd.DataFrame, str]:
    versions = sorted(findings["model_version"].dropna().unique())
    if model_version is not None:
        if model_version not in versions:
            raise InputError(f"--model-version {model_version!r} not in the store; has {versions}")
        chosen, how = model_version, "--model-version"
    else:
        latest = findings.sort_values("processed_at").iloc[-1]
        chosen, how = str(latest["model_version"]), "most recently used in the store"
        if len(versions) > 1:
            log.warning("store holds model versions %s; evaluating %s", versions, chosen)
    rows = findings[findings["model_version"] == chosen].sort_values(["processed_at", "sweep_id"])
    return rows.drop_duplicates("study_instance_uid", keep="last"), f"{chosen} ({how})"


def _join(findings: pd.DataFrame, labels: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evaluable rows, exclusions with reasons)."""
    lab = labels.rename(
        columns={c: f"{c}__label" for c in labels.columns if c != "study_instance_uid"}
    )
    df = findings.merge(lab, on="study_instance_uid", how="outer", indicator=True)
    raw = df["label__label"]
    y = pd.to_numeric(raw.astype("object").replace({True: 1, False: 0}), errors="coerce")
    reason = pd.Series(pd.NA, index=df.index, dtype="object")
    reason[df["_merge"] == "right_only"] = "not_processed"
    reason[(df["_merge"] == "left_only") & reason.isna()] = "no_label"
    status = df["status"].fillna("")
    reason[reason.isna() & (status == "failed")] = "failed"
    reason[reason.isna() & (status == "skipped")] = "skipped"
    reason[reason.isna() & raw.isna()] = "label_missing"
    reason[reason.isna() & ~y.isin([0, 1])] = "label_invalid"
    reason[reason.isna() & df["pdac_probability"].isna()] = "no_score"
    df["y"] = y
    excl = df.loc[reason.notna(), ["study_instance_uid", "status", "error_code"]].copy()
    excl.insert(1, "reason", reason[reason.notna()])
    excl["detail"] = [
        _detail(r, c) for r, c in zip(excl["reason"], excl["error_code"], strict=True)
    ]
    good = df[reason.isna()].reset_index(drop=True)
    return good, excl.sort_values(["reason", "study_instance_uid"]).reset_index(drop=True)


def _detail(reason: str, code: object) -> str:
    return {
        "not_processed": "labelled, but no findings row for this model version",
        "no_label": "processed, but absent from the labels file",
        "failed": f"processing failed ({code})",
        "skipped": f"skipped by the sweep ({code})",
        "label_missing": "label is empty",
        "label_invalid": "label is not 0 or 1",
        "no_score": "status ok but no pdac_probability",
    }.get(reason, reason)


def _column(df: pd.DataFrame, name: str) -> pd.Series | None:
    """A case attribute, preferring the labels' value over the findings'."""
    for c in (f"{name}__label", name):
        if c in df.columns and df[c].notna().any():
            return df[c]
    return None


def _thickness_bin(t: float) -> str:
    if t is None or not math.isfinite(t):
        return "unknown"
    return "<= 1.5 mm" if t <= 1.5 else "1.5-3 mm" if t <= 3.0 else "> 3 mm"


def _groups(df: pd.DataFrame, by: str) -> tuple[dict[str, np.ndarray], str | None]:
    """Subgroup name -> boolean case mask, or a note why the subgroup is not available."""
    pos = df["y"].to_numpy() == 1
    if by == "size":
        d = df.get("lesion_diameter_mm__label")  # the reference size, never the predicted one
        if d is None or d.notna().sum() == 0:
            return {}, "labels have no lesion_diameter_mm"
        d = pd.to_numeric(d, errors="coerce").to_numpy()
        keys = np.where(np.isnan(d), "size unknown", np.where(d < 20.0, "< 2 cm", ">= 2 cm"))
        return {
            k: ~pos | (pos & (keys == k))
            for k in ("< 2 cm", ">= 2 cm", "size unknown")
            if np.any(pos & (keys == k))
        }, None
    if by == "location":
        loc = df.get("lesion_location__label")
        if loc is None or loc.notna().sum() == 0:
            return {}, "labels have no lesion_location"
        keys = loc.fillna("unknown").astype(str).str.lower().to_numpy()
        order = [k for k in ("head", "body", "tail") if k in keys] + sorted(
            set(keys[pos]) - {"head", "body", "tail"}
        )
        return {k: ~pos | (pos & (keys == k)) for k in order if np.any(pos & (keys == k))}, None
    source = {"vendor": "manufacturer", "thickness": "slice_thickness_mm", "site": "site"}[by]
    col = _column(df, source)
    if col is None:
        return {}, f"neither labels nor findings have {source}"
    if by == "thickness":
        keys = np.array([_thickness_bin(v) for v in pd.to_numeric(col, errors="coerce")])
        order = [k for k in ("<= 1.5 mm", "1.5-3 mm", "> 3 mm", "unknown") if k in keys]
    else:
        keys = col.fillna("unknown").astype(str).to_numpy()
        order = sorted(set(keys))
    return {k: keys == k for k in order}, None


def _candidates(
    df, *, tolerance_mm, label_maps, lesion_label, store
) -> tuple[M.Candidates | None, str, str]:
    """Lesion candidates of the evaluable cases: (candidates, method, note)."""
    if label_maps is not None:
        return _mask_candidates(
            df, label_maps=Path(label_maps), lesion_label=lesion_label, store=store
        )
    cols = [f"lesion_center_{a}_mm__label" for a in "xyz"] + ["lesion_diameter_mm__label"]
    if not all(c in df.columns for c in cols):
        return (
            None,
            "",
            "labels have no lesion centres/diameters and no --label-maps: no lesion level",
        )
    has_pred = df["lesion_count"].fillna(0).to_numpy() > 0
    pred = np.array(df[[f"lesion_center_{a}_mm" for a in "xyz"]].to_numpy(float))
    pred[~has_pred] = np.nan
    truth = np.array(df[cols[:3]].apply(pd.to_numeric, errors="coerce").to_numpy(float))
    truth[df["y"].to_numpy() != 1] = np.nan
    c = M.match_by_centre(
        pred_center=pred,
        pred_score=df["pdac_probability"].to_numpy(float),
        true_center=truth,
        true_diameter=pd.to_numeric(df[cols[3]], errors="coerce").to_numpy(float),
        tolerance_mm=tolerance_mm,
    )
    no_centre = int(np.sum((df["y"].to_numpy() == 1) & np.any(np.isnan(truth), axis=1)))
    note = (
        f"{no_centre} positive case(s) without a reference centre count as missed"
        if no_centre
        else ""
    )
    return c, "centre_distance", note


def _load_mask(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def _mask_candidates(df, *, label_maps: Path, lesion_label: int | None, store: FindingsStore):
    """Candidates from label maps ``<label_maps>/<study uid or series uid>.nii.gz`` (or ``.npy``;
    a phantom archive's ``labels/`` folder is named by series uid) on the grid of the evidence's
    ``lesion_mask.nii.gz``. Reference lesions count for PDAC cases only (``y == 1``); a map's
    lesion voxels are ``== lesion_label`` (2 in a phantom's 0/1/2 map), else ``> 0``."""
    scores, tps, cases, lesions, skipped = [], [], [], [], 0
    for i, row in enumerate(df.itertuples(index=False)):
        uid = row.study_instance_uid
        series = getattr(row, "series_instance_uid", None)
        names = [uid] + ([series] if isinstance(series, str) and series else [])
        candidates = [label_maps / f"{n}{ext}" for n in names for ext in (".nii.gz", ".npy")]
        truth_path = next((p for p in candidates if p.is_file()), None)
        if truth_path is None:
            skipped += 1
            lesions.append(0)
            continue
        labels = _load_mask(truth_path)
        truth = (labels == lesion_label) if lesion_label is not None else (labels > 0)
        if row.y != 1:
            truth = np.zeros(truth.shape, bool)  # cysts etc. of non-PDAC cases are not targets
        pred = np.zeros(truth.shape, bool)
        if isinstance(row.evidence_path, str) and row.evidence_path:
            folder = Path(row.evidence_path)
            folder = folder if folder.is_absolute() else store.root / folder
            found = next((folder / n for n in PRED_MASK_NAMES if (folder / n).is_file()), None)
            pred = _load_mask(found) if found is not None else pred
        if pred.shape != truth.shape:
            skipped += 1
            lesions.append(0)
            continue
        s, t, n = M.match_by_mask(pred, truth, case_score=float(row.pdac_probability))
        scores += s
        tps += t
        cases += [i] * len(s)
        lesions.append(n)
    c = M.Candidates(
        np.asarray(scores, float),
        np.asarray(tps, bool),
        np.asarray(cases, int),
        np.asarray(lesions),
    )
    note = (
        f"{skipped} case(s) without a usable label map (missing or other grid) count no lesions"
        if skipped
        else ""
    )
    return c, "mask_iou", note


def _subset(c: M.Candidates, mask: np.ndarray) -> M.Candidates:
    new_index = np.cumsum(mask) - 1
    keep = mask[c.case]
    return M.Candidates(
        c.score[keep], c.is_tp[keep], new_index[c.case[keep]], c.lesions_per_case[mask]
    )


def _clean(obj):
    """JSON-ready: dataclasses to dicts, NaN/inf to None, numpy scalars to Python."""
    if hasattr(obj, "__dataclass_fields__"):
        return _clean(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate(
    store: Path,
    labels: Path,
    *,
    by: tuple[str, ...] = SUBGROUPS,
    model_version: str | None = None,
    threshold: float | None = None,
    label_maps: Path | None = None,
    lesion_label: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    tolerance_mm: float = 5.0,
    specificities: tuple[float, ...] = (0.95, 0.99),
) -> Evaluation:
    """Evaluate a store's findings against ``labels`` (see the module docstring)."""
    bad = [b for b in by if b not in SUBGROUPS]
    if bad:
        raise InputError(f"--by has unknown subgroup(s) {bad}; allowed: {list(SUBGROUPS)}")
    st = FindingsStore(store)
    findings = st.read_findings()
    if findings.empty:
        raise InputError(f"no findings in {st.findings_dir}: run a sweep first")
    rows, model_note = _select_model(findings, model_version)
    label_table = load_labels(labels)
    df, excl = _join(rows, label_table)
    if df.empty:
        raise InputError(
            f"no study is both labelled and scored ({len(excl)} excluded, see reasons)"
        )
    notes = []
    thr_values = df["operating_threshold"].dropna()
    if threshold is not None:
        thr, thr_src = float(threshold), "--threshold on the command line"
    elif len(thr_values):
        thr = float(thr_values.mode().iloc[0])
        thr_src = "findings.operating_threshold (set by the model package at sweep time)"
        if thr_values.nunique() > 1:
            notes.append(
                f"rows carry several operating thresholds {sorted(thr_values.unique())}; used {thr}"
            )
    else:
        raise InputError("findings carry no operating_threshold; give --threshold")
    y, score = df["y"].to_numpy() == 1, df["pdac_probability"].to_numpy(float)
    kw = {"threshold": thr, "specificities": specificities, "n_boot": n_boot, "seed": seed}
    overall = M.case_metrics(y, score, **kw)
    cands, method, note = _candidates(
        df, tolerance_mm=tolerance_mm, label_maps=label_maps, lesion_label=lesion_label, store=st
    )
    notes += [note] if note else []
    lesion = (
        M.lesion_metrics(cands, threshold=thr, method=method, n_boot=n_boot, seed=seed)
        if cands
        else None
    )
    bands = {}
    for name, col, edges in (
        ("dprime", "lesion_dprime__label", (2.0, 4.0)),
        ("size_mm", "lesion_diameter_mm__label", (20.0,)),
    ):
        if col in df.columns and df[col].notna().any():
            values = pd.to_numeric(df[col], errors="coerce").to_numpy(float)
            bands[name] = M.sensitivity_by_band(
                score, y, values, threshold=thr, edges=edges, n_boot=n_boot, seed=seed
            )
    subgroups, sub_notes = {}, {}
    for b in by:
        groups, why = _groups(df, b)
        if why:
            sub_notes[b] = why
        subgroups[b] = [
            {
                "group": name,
                "case": M.case_metrics(y[m], score[m], **kw),
                "lesion": M.lesion_metrics(
                    _subset(cands, m), threshold=thr, method=method, n_boot=n_boot, seed=seed
                )
                if cands
                else None,
            }
            for name, m in groups.items()
        ]
    meta = st.metadata()
    counts = excl["reason"].value_counts().to_dict()
    metrics = _clean(
        {
            "schema": "pdacscreen.metrics/1",
            "data": {
                "store": str(st.root),
                "labels": str(labels),
                "labels_sha256": hashlib.sha256(Path(labels).read_bytes()).hexdigest(),
                "study_dates": _range(df.get("study_date")),
                "sweep_dates": _range(df.get("sweep_date")),
                "sweep_ids": sorted(df["sweep_id"].dropna().unique().tolist()),
            },
            "model": {
                "name": sorted(df["model_name"].dropna().unique().tolist()),
                "version": model_note,
                "config_hashes": sorted(df["config_hash"].dropna().unique().tolist()),
                "sha256": meta.get("model_sha256", []),
                "selection_rule": meta.get("selection_rule", []),
                "preprocessing": meta.get("preprocessing", []),
                "schema_version": meta.get("schema_version", []),
            },
            "threshold": {
                "value": thr,
                "source": thr_src,
                "store_note": meta.get("threshold_source", []),
            },
            "settings": {
                "bootstrap": {
                    "n": n_boot,
                    "seed": seed,
                    "method": "percentile, resampled within each class",
                },
                "specificities": list(specificities),
                "hit_criterion": HIT_CRITERIA.get(method, "").format(tol=tolerance_mm)
                if cands
                else None,
            },
            "counts": {
                "findings_rows_for_model": len(rows),
                "labels_rows": len(label_table),
                "evaluated": len(df),
                "excluded": int(len(excl)),
                "excluded_by_reason": counts,
                "excluded_by_error_code": excl["error_code"].dropna().value_counts().to_dict(),
            },
            "case_level": overall,
            "lesion_level": lesion,
            "subgroups": subgroups,
            "subgroup_notes": sub_notes,
            "sensitivity_by_band": bands,
            "notes": notes,
            "exclusions": excl.to_dict("records"),
        }
    )
    fpr, tpr, _ = M.roc_curve(y, score)
    froc = (
        (np.asarray(lesion.froc_fp_per_case), np.asarray(lesion.froc_sensitivity))
        if lesion
        else None
    )
    return Evaluation(metrics, (fpr, tpr), excl, froc, tuple(notes), cases=df)


def _range(col: pd.Series | None) -> list[str] | None:
    if col is None or col.dropna().empty:
        return None
    values = col.dropna().astype(str)
    return [values.min(), values.max()]


def write(result: Evaluation, out: Path) -> dict[str, Path]:
    """Write metrics.json, exclusions.csv, plots and report.html into ``out``."""
    from pdacscreen.flows import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "exclusions": out / "exclusions.csv"}
    paths["metrics"].write_text(json.dumps(result.metrics, indent=2, allow_nan=False) + "\n")
    result.exclusions.to_csv(paths["exclusions"], index=False)
    plots, plot_note = report.write_plots(result, out)
    paths.update(plots)
    paths["report"] = report.write_html(result, out, plots=plots, plot_note=plot_note)
    return paths
