"""Per-patient timelines and longitudinal flags (flows/query.py views, flows/timeline.py, CLI).

A store written with the store API holds patients with known changes; the phantom follow-ups give
an end-to-end check: body composition measured on follow-up scans of one subject, written to a
store, flags the muscle loss of a progressor and not the stable subject.
"""

from __future__ import annotations

import datetime as dt

import pytest

from pdacscreen.flows.cli import main
from pdacscreen.flows.query import EXAMPLE_QUERIES, query
from pdacscreen.flows.timeline import longitudinal_flags, patient_timeline
from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.followup import follow_up_course
from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.store import FindingsStore
from pdacscreen.io.types import CTVolume
from pdacscreen.kernels.bodycomp import body_composition

KW = {"sweep_date": dt.date(2025, 3, 1), "model_version": "1.0.0", "config_hash": "cfg1"}
T0 = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.UTC)


def _row(uid, key, date, *, volume, muscle=None, lesions=0, diameter=None, p=0.1, **kw):
    return {
        "study_instance_uid": uid,
        "patient_key": key,
        "study_date": date,
        "model_name": "ref",
        "pdac_probability": p,
        "pdac_flag": p >= 0.5,
        "operating_threshold": 0.5,
        "lesion_count": lesions,
        "lesion_diameter_mm": diameter,
        "pancreas_volume_ml": volume,
        "skeletal_muscle_area_cm2": muscle,
        "status": "ok",
        "processed_at": T0,
        **kw,
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = FindingsStore(tmp_path_factory.mktemp("tl") / "store")
    rows = [
        # A: gland and muscle loss, then a new candidate (a progressor)
        _row("1.1", "pk-A", "2022-01-10", volume=70.0, muscle=130.0),
        _row("1.2", "pk-A", "2023-01-10", volume=66.0, muscle=127.0),
        _row("1.3", "pk-A", "2024-01-10", volume=55.0, muscle=115.0, lesions=1, diameter=11.0),
        {"study_instance_uid": "1.4", "patient_key": "pk-A", "study_date": "2024-02-01",
         "status": "failed", "error_code": "truncated", "processed_at": T0},
        # B: stable
        _row("2.1", "pk-B", "2021-06-01", volume=72.0, muscle=140.0),
        _row("2.2", "pk-B", "2023-06-01", volume=71.0, muscle=138.0),
        # C: a candidate that grows 10 -> 16 mm in six months
        _row("3.1", "pk-C", "2023-01-01", volume=60.0, lesions=1, diameter=10.0, p=0.4),
        _row("3.2", "pk-C", "2023-07-02", volume=60.0, lesions=1, diameter=16.0, p=0.6),
        # D: one study only
        _row("4.1", "pk-D", "2024-05-05", volume=50.0, muscle=90.0),
    ]  # fmt: skip
    st.append_findings(rows, sweep_id="sweep-1", **KW)
    return st


def test_timeline_orders_studies_and_computes_changes_per_year(store):
    t = patient_timeline(store.root, "pk-A").to_pylist()
    assert [r["study_instance_uid"] for r in t] == ["1.1", "1.2", "1.3"]  # failed row left out
    assert [r["study_number"] for r in t] == [1, 2, 3] and {r["n_studies"] for r in t} == {3}
    assert (
        t[0]["days_since_previous"] is None and t[0]["pancreas_volume_change_pct_per_year"] is None
    )
    days = (dt.date(2024, 1, 10) - dt.date(2023, 1, 10)).days
    want = 100 * (55.0 / 66.0 - 1) * 365.25 / days
    assert t[2]["pancreas_volume_change_pct_per_year"] == pytest.approx(want)
    assert t[2]["muscle_change_pct_per_year"] == pytest.approx(
        100 * (115 / 127 - 1) * 365.25 / days
    )
    assert [r["new_candidate"] for r in t] == [False, False, True]
    assert t[2]["lesion_growth_mm_per_year"] == pytest.approx(11.0 * 365.25 / days)
    c = patient_timeline(store.root, "pk-C").to_pylist()
    assert c[1]["lesion_growth_mm_per_year"] == pytest.approx(6.0 * 365.25 / 182)
    assert not c[1]["new_candidate"]
    assert patient_timeline(store.root, "pk-nobody").num_rows == 0
    with pytest.raises(InputError, match="patient_key"):
        patient_timeline(store.root, " ")


def test_longitudinal_flags_name_the_reasons_and_rank_by_change(store):
    flags = {r["patient_key"]: r for r in longitudinal_flags(store.root).to_pylist()}
    assert set(flags) == {"pk-A", "pk-C"}  # B is stable, D has one study
    assert flags["pk-A"]["reasons"] == ["new_candidate", "pancreas_volume_loss", "muscle_loss"]
    assert flags["pk-C"]["reasons"] == ["lesion_growth"]
    assert flags["pk-A"]["latest_study_instance_uid"] == "1.3"
    ranked = [r["patient_key"] for r in longitudinal_flags(store.root).to_pylist()]
    scores = [flags[k]["change_score"] for k in ranked]
    assert scores == sorted(scores, reverse=True)
    # a stricter muscle threshold drops the muscle reason (A lost ~9 %/year)
    strict = longitudinal_flags(store.root, {"muscle_loss_pct_per_year": 20.0}).to_pylist()
    a = next(r for r in strict if r["patient_key"] == "pk-A")
    assert "muscle_loss" not in a["reasons"]
    with pytest.raises(InputError, match="threshold"):
        longitudinal_flags(store.root, {"muscle_loss": 5.0})
    assert query(store.root, EXAMPLE_QUERIES["patients_changing"]).num_rows == 2


def test_cli_timeline(store, tmp_path, capsys):
    assert main(["timeline", str(store.root), "--patient-key", "pk-A"]) == 0
    out = capsys.readouterr().out
    assert "2024-01-10" in out and "2022-01-10" in out
    assert main(["timeline", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "pk-A" in out and "pk-B" not in out
    csv = tmp_path / "flags.csv"
    assert main(["timeline", str(store.root), "--out", str(csv)]) == 0
    text = csv.read_text()
    assert "new_candidate;pancreas_volume_loss;muscle_loss" in text
    assert main(["timeline", str(store.root), "--out", str(tmp_path / "x.txt")]) == 2


def test_phantom_follow_ups_end_to_end(tmp_path):
    """Body composition measured on follow-up scans of the same subjects flags the progressor."""
    st = FindingsStore(tmp_path / "store")
    rows = []
    for key, seed, course, lesion in (
        ("pk-P", 3, "progressor", "pdac"),
        ("pk-S", 6, "stable", "none"),
    ):
        for v in follow_up_course(course, (0.0, 12.0)):
            s = make_subject(seed, matrix=256, lesion_type=lesion, visit=v)
            bc = body_composition(CTVolume(s.noncontrast, s.spacing, s.affine), backend="numpy")
            assert bc.qc in ("", "body_cut_by_fov")
            date = dt.date(2023, 1, 1) + dt.timedelta(days=int(round(v.months * 30.44)))
            n = 1 if s.truth["lesion_type"] != "none" else 0
            rows.append(
                _row(
                    f"9.{seed}.{v.index}", key, date,
                    volume=s.truth["pancreas_volume_ml"], lesions=n,
                    diameter=s.truth["lesion_diameter_mm"] if n else None,
                )
                | bc.row()
            )  # fmt: skip
    st.append_findings(rows, sweep_id="sweep-f", **KW)
    flags = {r["patient_key"]: r for r in longitudinal_flags(st.root).to_pylist()}
    assert set(flags) == {"pk-P"}
    assert {"new_candidate", "muscle_loss"} <= set(flags["pk-P"]["reasons"])
    stable = patient_timeline(st.root, "pk-S").to_pylist()
    assert stable[1]["muscle_change_pct_per_year"] > -5.0  # measured +4.7 %: noise of the method
