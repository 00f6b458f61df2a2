"""Phantom follow-up archives: one DICOM study per visit of each patient (io/phantom/archive.py)."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pydicom
import pytest

from pdacscreen.flows.leadtime import load_diagnoses
from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.archive import DIAGNOSIS_AFTER_LAST_VISIT_DAYS, generate_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("fu") / "archive"
    generate_archive(out, studies=2, seed=77, matrix=128, follow_up_months=(0, 18), workers=1)
    return out


def _headers(archive, study_dir):
    for p in sorted((archive / study_dir).rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if ds.get("Modality") == "CT":
                return ds
    raise AssertionError(f"no CT file under {study_dir}")


def test_visits_share_the_patient_and_move_on_in_time(archive):
    truth = pd.read_parquet(archive / "truth.parquet").sort_values("study_index")
    assert list(truth["study_index"]) == [0, 1, 2, 3]
    assert list(truth["patient_index"]) == [0, 0, 1, 1]
    assert list(truth["visit_months"]) == [0.0, 18.0, 0.0, 18.0]
    assert truth["study_instance_uid"].is_unique
    for _, visits in truth.groupby("patient_index"):
        first, later = (_headers(archive, d) for d in visits["study_dir"])
        assert first.PatientID == later.PatientID and first.PatientSex == later.PatientSex
        assert first.PatientBirthDate == later.PatientBirthDate
        assert first.get("PatientSize") == later.get("PatientSize")
        d0, d1 = (dt.datetime.strptime(x.StudyDate, "%Y%m%d").date() for x in (first, later))
        assert abs((d1 - d0).days - 18 * 30.4375) <= 1
        height = visits["patient_height_m"].iloc[0]
        if pd.notna(height):
            assert float(first.PatientSize) == pytest.approx(height)
        else:
            assert "PatientSize" not in first
    # a progressor has no lesion at its first visit and a PDAC at its last
    prog = truth[truth["course"] == "progressor"]
    assert list(prog["lesion_type"]) == ["none", "pdac"]
    stable = truth[truth["course"] == "stable"]
    assert (stable["lesion_type"] == "none").all()


def test_diagnoses_file_reads_in_the_study_form(archive):
    truth = pd.read_parquet(archive / "truth.parquet")
    dx, form = load_diagnoses(archive / "diagnoses.csv")
    assert form == "study" and len(dx) == len(truth)
    cols = ["study_instance_uid", "course", "visit_months"]
    merged = dx.merge(truth[cols], on="study_instance_uid")
    assert (merged["label"] == (merged["course"] == "progressor")).all()
    prog = merged[merged["label"] == 1]
    last = prog["study_date"].max()
    assert (
        prog["diagnosis_date"] == last + pd.Timedelta(days=DIAGNOSIS_AFTER_LAST_VISIT_DAYS)
    ).all()
    assert merged.loc[merged["label"] == 0, "diagnosis_date"].isna().all()


def test_bad_months_are_refused(tmp_path):
    with pytest.raises(InputError, match="months must ascend from 0"):
        generate_archive(tmp_path / "x", studies=1, seed=1, matrix=128, follow_up_months=(6, 12))
