"""Lead-time evaluation (flows/leadtime.py): a longitudinal findings store written directly.

Patients have 1-6 studies over six years; a tenth are diagnosed on a known date, and their studies'
scores rise as the diagnosis nears (a binormal model whose separation decays with the interval), so
sensitivity must fall with the interval.  Every figure is checked against an independent pandas /
scikit-learn computation; studies after diagnosis and unassessed studies are planted and counted.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn import metrics as skm

from pdacscreen.engine import metrics as M
from pdacscreen.flows.cli import main
from pdacscreen.flows.leadtime import (
    BAND_NAMES,
    DAYS_PER_MONTH,
    evaluate_lead_time,
    lead_time_cases,
    load_diagnoses,
)
from pdacscreen.io.errors import InputError
from pdacscreen.io.store import FindingsStore

THRESHOLD = 0.5
INDEX_DATE = dt.date(2025, 1, 1)


def longitudinal_store(root, *, n_patients=900, seed=0):
    """(store, diagnoses frame, planted counts): one findings file, one row per study."""
    rng = np.random.default_rng(seed)
    rows, dx = [], []
    planted = {"after": 0, "not_assessed_pos": 0, "not_assessed_neg": 0}
    uid = 0
    for p in range(n_patients):
        key = f"pk{p:05d}"
        diagnosed = p % 10 == 0
        dx_date = INDEX_DATE - dt.timedelta(days=int(rng.integers(0, 365)))
        n = int(rng.integers(1, 7))
        days_before = np.sort(rng.integers(0, 6 * 365, n))[::-1]
        extra = [-40] if diagnosed and p % 20 == 0 else []  # a study after the diagnosis
        for d in list(days_before) + extra:
            date = dx_date - dt.timedelta(days=int(d))
            months = d / DAYS_PER_MONTH
            shift = 3.5 * np.exp(-max(months, 0) / 10.0) if diagnosed else 0.0
            prob = float(1 / (1 + np.exp(-(rng.normal(-2.5, 1.0) + shift))))
            ok = rng.random() > 0.03
            if diagnosed and d < 0:
                planted["after"] += 1
            elif not ok:
                planted["not_assessed_pos" if diagnosed else "not_assessed_neg"] += 1
            rows.append(
                {
                    "study_instance_uid": f"2.25.{seed}.{uid}",
                    "patient_key": key,
                    "study_date": date,
                    "manufacturer": ("SIEMENS", "GE MEDICAL SYSTEMS")[uid % 2],
                    "slice_thickness_mm": 1.0,
                    "model_name": "pdacscreen-reference",
                    "pdac_probability": prob if ok else None,
                    "pdac_flag": prob >= THRESHOLD if ok else None,
                    "operating_threshold": THRESHOLD if ok else None,
                    "status": "ok" if ok else "failed",
                    "error_code": None if ok else "truncated",
                    "processed_at": dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.UTC),
                }
            )
            uid += 1
        if diagnosed:
            dx.append(
                {"patient_key": key, "diagnosis_date": dx_date.isoformat(), "sex": "MF"[p % 2]}
            )
    st = FindingsStore(root)
    table = pa.Table.from_pylist(rows)
    st.append_findings_table(
        table, sweep_id="sweep-lt", sweep_date=dt.date(2025, 3, 1), model_version="0.1.0",
        config_hash="cfg-lt",
    )  # fmt: skip
    return st, pd.DataFrame(dx), planted


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt")
    st, dx, planted = longitudinal_store(root / "store")
    dx.to_csv(root / "dx.csv", index=False)
    rc = main(["evaluate", str(st.root), "--diagnoses", str(root / "dx.csv"), "--out", str(root / "out"),
               "--bootstrap", "300", "--export-aggregate", str(root / "site.json"), "--min-cell", "5"])  # fmt: skip
    assert rc == 0
    return st, dx, planted, root, json.loads((root / "out" / "leadtime.json").read_text())


def _independent(st, dx):
    """The expected cases, computed with plain pandas."""
    f = st.read_findings()
    f["study_date"] = pd.to_datetime(f["study_date"])
    d = dx.assign(diagnosis_date=pd.to_datetime(dx["diagnosis_date"]))
    df = f.merge(d[["patient_key", "diagnosis_date"]], on="patient_key", how="left")
    df = df[~(df.diagnosis_date.notna() & (df.study_date > df.diagnosis_date))]
    df = df[(df.status == "ok") & df.pdac_probability.notna()].copy()
    df["y"] = df.diagnosis_date.notna()
    df["months"] = (df.diagnosis_date - df.study_date).dt.days / DAYS_PER_MONTH
    df["flag"] = df.pdac_probability >= THRESHOLD
    return df


def test_counts_and_exclusions_are_reported_not_scored(world):
    st, dx, planted, root, m = world
    c = m["counts"]
    assert c["excluded_by_reason"]["after_diagnosis"] == planted["after"] > 0
    assert c["not_assessed_by_role"] == {
        "positive": planted["not_assessed_pos"],
        "negative": planted["not_assessed_neg"],
    }
    assert c["not_assessed_by_status"] == {
        "failed": planted["not_assessed_pos"] + planted["not_assessed_neg"]
    }
    df = _independent(st, dx)
    assert c["evaluated_studies"] == len(df) and c["positive_studies"] == int(df.y.sum())
    assert c["evaluated_studies"] + sum(c["excluded_by_reason"].values()) == len(st.read_findings())
    excl = pd.read_csv(root / "out" / "leadtime_exclusions.csv")
    assert set(excl.reason) == {"after_diagnosis", "not_assessed"}
    assert "Reference model" in m["notes"][-1] and "synthetic phantoms" in m["notes"][-1]


def test_band_metrics_match_an_independent_computation(world):
    st, dx, planted, root, m = world
    df = _independent(st, dx)
    edges = [0, 3, 6, 12, 24, np.inf]
    bands = {b["band_months"]: b for b in m["bands"]}
    assert list(bands) == ["all", *BAND_NAMES]
    neg = df[~df.y]
    for i, name in enumerate(BAND_NAMES):
        pos = df[df.y & (df.months >= edges[i]) & (df.months < edges[i + 1])]
        both = pd.concat([pos, neg])
        b = bands[name]
        assert b["positive_studies"] == len(pos) and b["negative_studies"] == len(neg)
        assert b["positive_patients"] == pos.patient_key.nunique()
        assert b["auroc"]["value"] == pytest.approx(
            skm.roc_auc_score(both.y, both.pdac_probability), abs=1e-12
        )
        assert b["sensitivity"]["numerator"] == int(pos.flag.sum())
        assert b["auroc"]["ci_low"] <= b["auroc"]["value"] <= b["auroc"]["ci_high"]
    allb = bands["all"]
    assert allb["auroc"]["value"] == pytest.approx(
        skm.roc_auc_score(df.y, df.pdac_probability), abs=1e-12
    )
    # The planted signal decays with the interval: sensitivity falls from 0-3 to > 24 months.
    assert bands["0-3"]["sensitivity"]["value"] > bands[">24"]["sensitivity"]["value"] + 0.2
    assert m["specificity"]["numerator"] == int((~neg.flag).sum())


def test_lead_time_and_yield_match_an_independent_computation(world):
    st, dx, planted, root, m = world
    df = _independent(st, dx)
    tp = df[df.y & df.flag]
    lead = tp.groupby("patient_key").months.max()  # the earliest flagged study of each patient
    p = m["patients"]
    assert p["detected_before_diagnosis"]["numerator"] == len(lead)
    assert p["detected_before_diagnosis"]["denominator"] == df[df.y].patient_key.nunique()
    med = p["median_lead_time_months_of_true_flags"]
    assert med["value"] == pytest.approx(float(np.median(lead)), abs=1e-9)
    assert med["ci_low"] <= med["value"] <= med["ci_high"]
    y = m["screening_yield"]
    assert y["screened_studies"] == len(df) and y["flags"] == int(df.flag.sum())
    assert y["flags_per_10000"]["value"] == pytest.approx(1e4 * df.flag.mean())
    assert y["true_flags_per_10000"]["value"] == pytest.approx(1e4 * (df.flag & df.y).mean())
    assert y["ppv"]["value"] == pytest.approx(len(tp) / df.flag.sum())
    assert "1,400 flags in about 180,000 CTs" in y["comparison"]


def test_study_form_gives_the_same_figures(world, tmp_path):
    st, dx, planted, root, m = world
    f = st.read_findings()
    d = dict(zip(dx.patient_key, dx.diagnosis_date, strict=True))
    study = pd.DataFrame({"study_instance_uid": f.study_instance_uid,
                          "label": f.patient_key.isin(d).astype(int),
                          "diagnosis_date": f.patient_key.map(d)})  # fmt: skip
    study.to_csv(tmp_path / "dx_study.csv", index=False)
    res = evaluate_lead_time(st.root, tmp_path / "dx_study.csv", n_boot=300)
    assert res.metrics["data"]["form"] == "study"
    for key in ("bands", "specificity", "patients", "screening_yield"):
        assert res.metrics[key] == m[key], key


def test_bootstrap_resamples_patients_not_studies():
    rng = np.random.default_rng(1)
    clusters = np.repeat([f"p{i}" for i in range(40)], 5)
    strata = (np.arange(200) // 5 < 8).astype(int)  # 8 diagnosed patients
    w = M.cluster_bootstrap_weights(clusters, 200, rng, strata=strata)
    per = w.reshape(200, 40, 5)
    assert np.all(per == per[:, :, :1])  # all studies of a patient share one weight
    assert np.all(per[:, :8, 0].sum(1) == 8) and np.all(per[:, 8:, 0].sum(1) == 32)
    with pytest.raises(ValueError, match="constant within"):
        M.cluster_bootstrap_weights(["a", "a"], 2, rng, strata=[0, 1])
    # Five identical studies per patient: the clustered interval is about sqrt(5) times wider.
    y = np.repeat(rng.random(400) < 0.3, 5)
    s = np.repeat(rng.normal(size=400), 5) + 1.2 * y
    cl = np.repeat(np.arange(400), 5)
    wc = M.cluster_bootstrap_weights(cl, 400, np.random.default_rng(2), strata=y.astype(int))
    naive = M.case_metrics(y, s, threshold=0.5, n_boot=400, seed=2).auroc
    lo, hi = M.percentile_interval(M.weighted_auroc(y, s, wc))
    assert (hi - lo) > 1.7 * (naive.ci_high - naive.ci_low)


def test_weighted_median_equals_the_repeated_median():
    rng = np.random.default_rng(0)
    v = rng.normal(size=13)
    w = rng.integers(0, 4, (50, 13))
    w[w.sum(1) == 0, 0] = 1
    want = [np.median(np.repeat(v, row)) for row in w]
    np.testing.assert_allclose(M.weighted_median(v, w), want)


def test_exclusion_rules_on_a_hand_made_case():
    rows = pd.DataFrame({
        "study_instance_uid": ["a", "b", "c", "d", "e", "f"],
        "patient_key": ["P", "P", "P", "Q", None, "P"],
        "study_date": pd.to_datetime(["2024-01-01", "2024-06-01", "2024-08-01", "2024-01-01", "2024-01-01", None]),
        "status": ["ok", "ok", "ok", "failed", "ok", "ok"],
        "error_code": [None, None, None, "truncated", None, None],
        "pdac_probability": [0.2, 0.9, 0.9, None, 0.1, 0.5],
    })  # fmt: skip
    dx = pd.DataFrame({"patient_key": ["P"], "diagnosis_date": pd.to_datetime(["2024-06-01"])})
    lt = lead_time_cases(rows, dx, "patient")
    reasons = dict(zip(lt.excluded.study_instance_uid, lt.excluded.reason, strict=True))
    assert reasons == {
        "c": "after_diagnosis",
        "d": "not_assessed",
        "e": "no_patient_key",
        "f": "no_study_date",
    }
    cases = lt.cases.set_index("study_instance_uid")
    assert cases.loc["b", "interval_months"] == 0 and cases.loc["b", "band"] == "0-3"
    assert cases.loc["a", "band"] == "3-6"  # 152 days = 5.0 months
    assert cases.loc[["a", "b"], "y"].all() and lt.form == "patient"
    roles = dict(zip(lt.excluded.study_instance_uid, lt.excluded.role, strict=True))
    assert roles == {"c": "positive", "d": "negative", "e": "unknown", "f": "positive"}


def test_bad_diagnoses_files_are_typed_errors(world, tmp_path):
    st, *_ = world
    (tmp_path / "a.csv").write_text("patient_key,date\nP,2024-01-01\n")
    with pytest.raises(InputError, match="diagnosis_date"):
        load_diagnoses(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("patient_key,diagnosis_date\nP,not-a-date\n")
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        load_diagnoses(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("patient_key,diagnosis_date\nP,2024-01-01\nP,2024-02-01\n")
    with pytest.raises(InputError, match="twice"):
        load_diagnoses(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("patient_key,diagnosis_date\nnobody,2024-01-01\n")
    with pytest.raises(InputError, match="both diagnosed and never-diagnosed"):
        evaluate_lead_time(st.root, tmp_path / "d.csv", n_boot=0)
    assert main(["evaluate", str(st.root), "--diagnoses", str(tmp_path / "none.csv")]) == 2
