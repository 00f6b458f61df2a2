"""Lead-time evaluation: how long before diagnosis does the model flag a patient's CT?

``pdacscreen evaluate STORE --diagnoses dx.csv`` links findings to later diagnoses.  Two forms of
``dx.csv`` (CSV or Parquet) are read:

* **patient form** (``patient_key``, ``diagnosis_date``): a registry linkage.  Every study of a
  listed patient dated on or before ``diagnosis_date`` is a *positive* with the interval
  ``diagnosis_date - study_date``; studies of patients not listed, or listed with an empty
  ``diagnosis_date``, are *negatives* (never diagnosed).
* **study form** (``study_instance_uid``, ``label``, ``diagnosis_date``; optional ``study_date``):
  ``label`` 1 with a ``diagnosis_date`` is a positive, ``label`` 0 a negative; studies missing from
  the file are excluded (``no_label``).  Without ``label``, a non-empty ``diagnosis_date`` means 1.

Studies dated **after** the diagnosis are excluded (``after_diagnosis``: they show a known cancer
and are not screening); a study on the diagnosis date has interval 0.  A diagnosed patient's study
without a ``study_date`` is excluded (``no_study_date``), as is a study without ``patient_key`` in
the patient form (``no_patient_key``).  Studies that would be positives or negatives but were not
assessed (status not ``ok`` or no probability) are counted by role, status and error code
(``not_assessed``) and never scored as negatives.

Reported (all intervals are percentile bootstraps that **resample patients**, within the strata
"later diagnosed" / "never diagnosed", so a patient's studies stay together):

* AUROC and sensitivity at the operating threshold overall and by interval before diagnosis
  (0-3, 3-6, 6-12, 12-24, >24 months; a band's positives against **all** negatives);
* the patient-level detection rate (a flag on any pre-diagnostic study) and the **median lead time
  of true flags**: per detected patient the lead time of the earliest flagged study, median over
  patients;
* per 10,000 screened (assessed) studies: flags, true flags (studies of later-diagnosed patients)
  and the positive predictive value (true flags / flags).  Real-world comparison: PANDA's
  deployment reported about 1,400 flags in about 180,000 CTs (about 78 per 10,000).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pdacscreen.engine import metrics as M
from pdacscreen.io.errors import InputError

__all__ = [
    "BAND_EDGES_MONTHS",
    "BAND_NAMES",
    "DAYS_PER_MONTH",
    "PANDA_FLAGS_PER_10K",
    "LeadTime",
    "LeadTimeEvaluation",
    "evaluate_lead_time",
    "lead_time_cases",
    "lead_time_metrics",
    "load_diagnoses",
    "write",
]

log = logging.getLogger(__name__)

BAND_EDGES_MONTHS = (3.0, 6.0, 12.0, 24.0)
BAND_NAMES = ("0-3", "3-6", "6-12", "12-24", ">24")
DAYS_PER_MONTH = 365.25 / 12.0
PANDA_FLAGS_PER_10K = 1_400 / 180_000 * 10_000
PANDA_NOTE = (
    "real-world comparison: PANDA's deployment reported about 1,400 flags in about 180,000 CTs "
    f"(about {PANDA_FLAGS_PER_10K:.0f} per 10,000)"
)
_MAX_BLOCK = 2_000_000  # elements of one (B, n) block of bootstrap weights


@dataclass(frozen=True)
class LeadTime:
    """Cases for the lead-time evaluation.

    ``cases``: one row per assessed, included study with ``patient_key`` (cluster), ``score``,
    ``y`` (later diagnosed), ``interval_months`` (NaN for negatives), ``band`` and the subgroup
    columns; ``excluded``: one row per study left out, with ``reason``, ``role``, ``status`` and
    ``error_code``; ``form``: ``patient`` or ``study``; ``diagnosed_without_studies``: listed
    patients with no study in the store (patient form).
    """

    cases: pd.DataFrame
    excluded: pd.DataFrame
    form: str
    diagnosed_without_studies: int = 0


def load_diagnoses(path: Path) -> tuple[pd.DataFrame, str]:
    """Read ``dx`` (CSV or Parquet) and tell its form (``patient`` or ``study``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"--diagnoses must be an existing .csv or .parquet file, got {str(path)!r}"
        )
    if path.suffix.lower() == ".csv":
        df = pd.read_csv(path, dtype={"patient_key": str, "study_instance_uid": str})
    elif path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        raise InputError(f"--diagnoses must end in .csv or .parquet, got {path.name!r}")
    if "diagnosis_date" not in df.columns:
        raise InputError(f"diagnoses file {path} lacks diagnosis_date; has {list(df.columns)}")
    key = "study_instance_uid" if "study_instance_uid" in df.columns else "patient_key"
    if key not in df.columns:
        raise InputError(
            f"diagnoses file {path} needs patient_key (patient form) or study_instance_uid "
            f"(study form); has {list(df.columns)}"
        )
    df[key] = df[key].astype(str)
    dup = df[key][df[key].duplicated()]
    if len(dup):
        raise InputError(f"diagnoses file {path}: one {key} appears twice (row {dup.index[0]})")
    dates = pd.to_datetime(df["diagnosis_date"], errors="coerce")
    bad = df["diagnosis_date"].notna() & dates.isna()
    if bad.any():
        raise InputError(
            f"diagnoses file {path}: diagnosis_date must be a date (YYYY-MM-DD), got "
            f"{df.loc[bad, 'diagnosis_date'].iloc[0]!r}"
        )
    df["diagnosis_date"] = dates
    if key == "study_instance_uid":
        if "label" in df.columns:
            lab = pd.to_numeric(df["label"], errors="coerce")
            if not lab.dropna().isin([0, 1]).all() or lab.isna().any():
                raise InputError(f"diagnoses file {path}: label must be 0 or 1 in every row")
            df["label"] = lab.astype(int)
        else:
            df["label"] = df["diagnosis_date"].notna().astype(int)
        if "study_date" in df.columns:
            df["study_date"] = pd.to_datetime(df["study_date"], errors="coerce")
        return df, "study"
    return df, "patient"


def lead_time_cases(rows: pd.DataFrame, dx: pd.DataFrame, form: str) -> LeadTime:
    """Classify a model's latest findings rows (one per study) against the diagnoses."""
    df = rows.copy()
    df["study_date"] = pd.to_datetime(df["study_date"], errors="coerce")
    reason = pd.Series(pd.NA, index=df.index, dtype="object")
    without = 0
    if form == "patient":
        dx_dates = dx.set_index("patient_key")["diagnosis_date"]
        no_key = df["patient_key"].isna()
        reason[no_key] = "no_patient_key"
        df["diagnosis_date"] = df["patient_key"].map(dx_dates)
        without = int(
            dx_dates.notna().sum() - dx_dates.index[dx_dates.notna()].isin(df["patient_key"]).sum()
        )
    else:
        d = dx.set_index("study_instance_uid")
        listed = df["study_instance_uid"].isin(d.index)
        reason[~listed] = "no_label"
        df["label"] = df["study_instance_uid"].map(d["label"])
        df["diagnosis_date"] = df["study_instance_uid"].map(d["diagnosis_date"])
        if "study_date" in d.columns:  # the file's study date wins over the store's
            given = df["study_instance_uid"].map(d["study_date"])
            df["study_date"] = given.where(given.notna(), df["study_date"])
        reason[reason.isna() & (df["label"] == 1) & df["diagnosis_date"].isna()] = (
            "no_diagnosis_date"
        )
        df.loc[df["label"] == 0, "diagnosis_date"] = pd.NaT
    key = "patient_key" if form == "patient" else "study_instance_uid"
    for col in ("sex", "patient_sex", "age", "patient_age"):  # optional subgroup columns
        if col in dx.columns and col not in df.columns:
            df[col] = df[key].map(dx.set_index(key)[col])
    diagnosed = df["diagnosis_date"].notna()
    reason[reason.isna() & diagnosed & df["study_date"].isna()] = "no_study_date"
    after = diagnosed & (df["study_date"] > df["diagnosis_date"])
    reason[reason.isna() & after] = "after_diagnosis"
    assessed = (df["status"] == "ok") & df["pdac_probability"].notna()
    reason[reason.isna() & ~assessed] = "not_assessed"
    df["y"] = diagnosed
    unknown = reason.isin(["no_patient_key", "no_label"]).to_numpy()
    role = np.where(unknown, "unknown", np.where(diagnosed, "positive", "negative"))
    excl = df.loc[reason.notna(), ["study_instance_uid", "status", "error_code"]].copy()
    excl.insert(1, "reason", reason[reason.notna()])
    excl.insert(2, "role", role[reason.notna().to_numpy()])
    good = df[reason.isna()].copy()
    days = (good["diagnosis_date"] - good["study_date"]).dt.days.astype(float)
    good["interval_months"] = np.where(good["y"], days / DAYS_PER_MONTH, np.nan)
    band = np.searchsorted(np.asarray(BAND_EDGES_MONTHS), good["interval_months"], side="right")
    good["band"] = np.where(good["y"], np.asarray(BAND_NAMES, object)[np.minimum(band, 4)], None)
    # Patients are the bootstrap clusters; a study without a key is its own cluster.
    good["cluster"] = good["patient_key"].where(
        good["patient_key"].notna(), "study:" + good["study_instance_uid"].astype(str)
    )
    good["score"] = good["pdac_probability"].astype(float)
    return LeadTime(
        cases=good.reset_index(drop=True),
        excluded=excl.sort_values(["reason", "study_instance_uid"]).reset_index(drop=True),
        form=form,
        diagnosed_without_studies=max(0, without),
    )


def _strata(cases: pd.DataFrame) -> np.ndarray:
    """Per case: 1 if its cluster (patient) holds a positive study (is later diagnosed)."""
    diagnosed = set(cases.loc[cases["y"], "cluster"])
    return cases["cluster"].isin(diagnosed).to_numpy().astype(np.int64)


def lead_time_metrics(lt: LeadTime, *, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Band-wise AUROC and sensitivity, lead time of true flags and screening yield (module doc)."""
    c = lt.cases
    y, s = c["y"].to_numpy(bool), c["score"].to_numpy(float)
    flag = s >= float(threshold)
    months = c["interval_months"].to_numpy(float)
    band = c["band"].to_numpy(object)
    # Per diagnosed patient: the earliest flagged pre-diagnostic study (largest interval).
    pos = c[y].assign(flag=flag[y])
    first = (
        pos[pos["flag"]].sort_values("interval_months", ascending=False).drop_duplicates("cluster")
    )
    first_idx = first.index.to_numpy()
    pos_patients = pos["cluster"].unique()
    groups = [("all", y)] + [(b, y & (band == b)) for b in BAND_NAMES]
    # One entry per statistic: a function of a (B, n) weight matrix -> (B,) values.
    stats = {}
    for name, members in groups:
        keep = members | ~y
        stats[f"auroc:{name}"] = lambda w, k=keep: M.weighted_auroc(y[k], s[k], w[:, k])
        stats[f"sens:{name}"] = lambda w, m=members: M.weighted_rate(flag, m, w)
    stats["spec"] = lambda w: M.weighted_rate(~flag, ~y, w)
    stats["lead"] = lambda w: M.weighted_median(months[first_idx], w[:, first_idx])
    stats["detect"] = _patient_detection(c, y, flag)
    stats["flags"] = lambda w: 1e4 * M.weighted_rate(flag, np.ones_like(flag), w)
    stats["true_flags"] = lambda w: 1e4 * M.weighted_rate(flag & y, np.ones_like(flag), w)
    stats["ppv"] = lambda w: M.weighted_rate(y, flag, w)
    point = {k: float(f(np.ones((1, len(c))))[0]) for k, f in stats.items()}
    boot: dict[str, list[np.ndarray]] = {k: [] for k in stats}
    if n_boot > 0 and len(c):
        rng = np.random.default_rng(seed)
        strata, clusters = _strata(c), c["cluster"].to_numpy(str)
        block = max(1, _MAX_BLOCK // max(1, len(c)))
        for start in range(0, n_boot, block):
            w = M.cluster_bootstrap_weights(
                clusters, min(block, n_boot - start), rng, strata=strata
            )
            for k, f in stats.items():
                boot[k].append(f(w))
    ci = {
        k: M.percentile_interval(np.concatenate(v)) if v else (np.nan, np.nan)
        for k, v in boot.items()
    }

    def est(key: str) -> dict:
        return {"value": point[key], "ci_low": ci[key][0], "ci_high": ci[key][1]}

    def rate(key: str, num: int, den: int) -> dict:
        return {**est(key), "numerator": int(num), "denominator": int(den)}

    n_neg = int((~y).sum())
    bands = []
    for name, members in groups:
        bands.append(
            {
                "band_months": name,
                "positive_studies": int(members.sum()),
                "positive_patients": int(c.loc[members, "cluster"].nunique()),
                "negative_studies": n_neg,
                "auroc": est(f"auroc:{name}"),
                "sensitivity": rate(f"sens:{name}", (flag & members).sum(), members.sum()),
            }
        )
    n_flags, n_true = int(flag.sum()), int((flag & y).sum())
    return {
        "bands": bands,
        "specificity": rate("spec", (~flag & ~y).sum(), n_neg),
        "patients": {
            "diagnosed_with_assessed_studies": int(len(pos_patients)),
            "never_diagnosed": int(c.loc[~y, "cluster"].nunique()),
            "detected_before_diagnosis": rate("detect", len(first), len(pos_patients)),
            "median_lead_time_months_of_true_flags": est("lead"),
            "lead_time_definition": "per detected patient the interval from the earliest flagged "
            "study to diagnosis; median over patients",
        },
        "screening_yield": {
            "screened_studies": int(len(c)),
            "flags": n_flags,
            "true_flags": n_true,
            "flags_per_10000": est("flags"),
            "true_flags_per_10000": est("true_flags"),
            "ppv": rate("ppv", n_true, n_flags),
            "comparison": PANDA_NOTE,
        },
    }


def _patient_detection(c: pd.DataFrame, y: np.ndarray, flag: np.ndarray):
    """Statistic: share of diagnosed patients with a flag on any pre-diagnostic study."""
    pos = np.flatnonzero(y)
    first_study = c.iloc[pos].drop_duplicates("cluster").index.to_numpy()
    detected = set(c.loc[y & flag, "cluster"])
    hit = np.zeros(len(c), bool)
    hit[first_study] = c.loc[first_study, "cluster"].isin(detected).to_numpy()
    one = np.zeros(len(c), bool)
    one[first_study] = True
    return lambda w: M.weighted_rate(hit, one, w)


# ---------------------------------------------------------------------- store -> report
@dataclass(frozen=True)
class LeadTimeEvaluation:
    """What :func:`evaluate_lead_time` found: JSON-ready metrics and the classified cases."""

    metrics: dict
    lead: LeadTime
    threshold: float


def evaluate_lead_time(
    store: Path,
    diagnoses: Path,
    *,
    model_version: str | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LeadTimeEvaluation:
    """Lead-time evaluation of a store's findings against ``diagnoses`` (see the module doc)."""
    from pdacscreen.flows.evaluate import _clean, _range, _select_model
    from pdacscreen.io.store import FindingsStore

    st = FindingsStore(store)
    findings = st.read_findings()
    if findings.empty:
        raise InputError(f"no findings in {st.findings_dir}: run a sweep first")
    rows, model_note = _select_model(findings, model_version)
    dx, form = load_diagnoses(diagnoses)
    lead = lead_time_cases(rows, dx, form)
    c = lead.cases
    if c.empty or not c["y"].any() or c["y"].all():
        raise InputError(
            f"lead-time evaluation needs assessed studies of both diagnosed and never-diagnosed "
            f"patients; got {int(c['y'].sum())} positive and {int((~c['y']).sum())} negative "
            f"({len(lead.excluded)} excluded)"
        )
    notes = []
    if threshold is not None:
        thr, src = float(threshold), "--threshold on the command line"
    else:
        values = c["operating_threshold"].dropna()
        if values.empty:
            raise InputError("findings carry no operating_threshold; give --threshold")
        thr, src = float(values.mode().iloc[0]), "findings.operating_threshold"
        if values.nunique() > 1:
            notes.append(f"rows carry several operating thresholds; used {thr}")
    if form == "patient":
        notes.append("patients absent from the diagnoses file are taken as never diagnosed")
    if c["patient_key"].isna().any():
        notes.append("studies without patient_key are their own bootstrap cluster")
    ex = lead.excluded
    na = ex[ex["reason"] == "not_assessed"]
    metrics = lead_time_metrics(lead, threshold=thr, n_boot=n_boot, seed=seed)
    out = {
        "schema": "pdacscreen.leadtime/1",
        "data": {
            "store": str(st.root),
            "diagnoses": str(diagnoses),
            "form": form,
            "study_dates": _range(c["study_date"].dt.date.astype(str)),
        },
        "model": {
            "name": sorted(c["model_name"].dropna().unique().tolist()),
            "version": model_note,
        },
        "threshold": {"value": thr, "source": src},
        "settings": {
            "bands_months": list(BAND_NAMES),
            "days_per_month": DAYS_PER_MONTH,
            "bootstrap": {
                "n": n_boot,
                "seed": seed,
                "method": "percentile; resamples patients (all their studies together) within "
                "later-diagnosed / never-diagnosed strata",
            },
            "after_diagnosis": "studies dated after the diagnosis are excluded",
        },
        "counts": {
            "findings_rows_for_model": len(rows),
            "evaluated_studies": len(c),
            "positive_studies": int(c["y"].sum()),
            "negative_studies": int((~c["y"]).sum()),
            "excluded_by_reason": ex["reason"].value_counts().to_dict(),
            "not_assessed_by_role": na["role"].value_counts().to_dict(),
            "not_assessed_by_status": na["status"].fillna("none").value_counts().to_dict(),
            "not_assessed_by_error_code": na["error_code"].dropna().value_counts().to_dict(),
            "diagnosed_patients_without_studies": lead.diagnosed_without_studies,
        },
        **metrics,
        "notes": notes
        + [
            "Reference model numbers describe synthetic phantoms (trained on synthetic phantoms, "
            "not a clinical device)."
        ],
    }
    return LeadTimeEvaluation(_clean(out), lead, thr)


def write(result: LeadTimeEvaluation, out: Path) -> dict[str, Path]:
    """``leadtime.json`` and ``leadtime_exclusions.csv`` (study uid, reason, role) in ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"leadtime": out / "leadtime.json", "exclusions": out / "leadtime_exclusions.csv"}
    paths["leadtime"].write_text(json.dumps(result.metrics, indent=2, allow_nan=False) + "\n")
    result.lead.excluded.to_csv(paths["exclusions"], index=False)
    return paths
