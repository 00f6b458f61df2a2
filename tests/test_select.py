"""Series selection rules, ranking, reasons, and the image phase check."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from ingest_synth import write_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pdacscreen.io.errors import InputError
from pdacscreen.io.index import read_index, update_index
from pdacscreen.io.select import load_rules, select_series
from pdacscreen.kernels.measure import measure_phase

KEY = b"select-test-key-0123456789"
BIG = dict(n=44, rows=24, cols=24, step=2.5)  # 110 mm z-coverage, tiny images


def _dose_report(path, study: str) -> None:
    from ingest_synth import uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    ds.file_meta.MediaStorageSOPInstanceUID = uid("dose", study)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    ds.SOPInstanceUID = uid("dose", study)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study", study), uid("series", study, "dose")
    ds.Modality, ds.PatientID, ds.SeriesDescription = "SR", "PAT-001", "Dose Report"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def study_index(tmp_path_factory):
    """One study with the usual series around the non-contrast one, and a contrast-only study."""
    root = tmp_path_factory.mktemp("archive")
    s = "study-A"
    write_series(
        root / "loc",
        name="loc",
        study=s,
        n=1,
        image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
        description="Topogram 0.6 T20s",
        iop=(0, 1, 0, 0, 0, -1),
        series_number=1,
    )
    write_series(
        root / "nc",
        name="nc",
        study=s,
        description="Abdomen nativ 2.5 Br40",
        kernel="Br40",
        series_number=2,
        **BIG,
    )
    write_series(
        root / "ncbone",
        name="ncbone",
        study=s,
        description="Abdomen nativ 1.0 Br64",
        kernel="Br64",
        thickness=1.0,
        series_number=3,
        **{**BIG, "step": 1.0, "n": 110},
    )
    write_series(
        root / "pv",
        name="pv",
        study=s,
        description="ABD PV 2.5",
        kernel="Br40",
        contrast_agent="OMNIPAQUE 350",
        series_number=4,
        **BIG,
    )
    write_series(
        root / "thick",
        name="thick",
        study=s,
        description="NATIV 8mm",
        thickness=8,
        series_number=5,
        **{**BIG, "step": 8.0, "n": 15},
    )
    write_series(
        root / "cor",
        name="cor",
        study=s,
        description="COR MPR 3",
        image_type="DERIVED\\SECONDARY\\REFORMATTED",
        iop=(1, 0, 0, 0, 0, -1),
        series_number=6,
        **BIG,
    )
    write_series(
        root / "short",
        name="short",
        study=s,
        description="NC liver",
        n=8,
        rows=24,
        cols=24,
        series_number=7,
    )
    _dose_report(root / "dose" / "sr.dcm", s)
    write_series(
        root / "b",
        name="pvonly",
        study="study-B",
        description="Portal venous 3mm",
        contrast_agent="Iomeron 400",
        **BIG,
    )
    (root / "notes.txt").write_text("not DICOM")
    update_index(root, root.parent / "idx", key=KEY, workers=1)
    return read_index(root.parent / "idx")


def _by_desc(sel, desc):
    for uid, reasons in sel.rejections.items():
        if reasons and any(desc in r for r in reasons):
            return uid, reasons
    return None, ()


def test_picks_noncontrast_soft_series_and_explains_the_rest(study_index):
    sels = select_series(study_index)
    assert len(sels) == 2
    a = next(
        s
        for s in sels
        if any(c.series_description.startswith("Abdomen nativ 2.5") for c in s.candidates)
    )
    assert a.status == "selected"
    assert a.candidates[0].series_description == "Abdomen nativ 2.5 Br40"
    assert a.series_instance_uid == a.candidates[0].series_instance_uid
    # the thinner sharp-kernel recon is eligible but ranked after the soft-tissue one
    assert [c.kernel_class for c in a.candidates] == ["soft", "sharp"]
    assert len(a.files) == 44 and all(f.endswith(".dcm") for f in a.files)
    reasons = [r for rs in a.rejections.values() for r in rs]
    assert any(r.startswith("image_type:") and "LOCALIZER" in r for r in reasons)
    assert any(r.startswith("contrast_description:") and "ABD PV" in r for r in reasons)
    assert any(r.startswith("slice_thickness: 8 mm") for r in reasons)
    assert any(r.startswith("orientation: not axial") for r in reasons)
    assert any(r.startswith("z_coverage:") for r in reasons)
    assert any(r.startswith("sop_class:") for r in reasons)  # the dose report
    assert len(a.rejections) == 6 and all(a.rejections.values())
    assert a.patient_key and a.study_date == "20240102"


def test_contrast_only_study_reports_no_eligible_series(study_index):
    b = next(s for s in select_series(study_index) if s.status != "selected")
    assert b.status == "no_eligible_series" and b.series_instance_uid is None and b.files == ()
    (reasons,) = b.rejections.values()
    assert any("Portal venous 3mm" in r for r in reasons)
    assert any("ContrastBolusAgent='Iomeron 400'" in r for r in reasons)


NONCONTRAST = [
    "Abdomen nativ 5mm",
    "ABD W/O",
    "Abdomen w/o",
    "NC ABDOMEN 2.5",
    "Non-Con",
    "Pre-contrast 5mm",
    "PLAIN ABDOMEN",
    "Unenhanced",
    "ABDOMEN SIN CONTRASTE",
    "ABDO SANS INJECTION",
    "senza mdc",
    "Buik blanco",
    "ZONDER CONTRAST",
    "Oberbauch ohne KM",
    "腹部 単純",
    "Diretta 2.5mm",
    "BASALE",
    "W/O CONTRAST",
]
CONTRAST = [
    "ABD PV",
    "Portal venous",
    "C+ PV",
    "Post-contrast",
    "VENOUS 5mm",
    "Abdomen w/",
    "Abd 70s",
    "Abdomen KM venös",
    "Oberbauch portalvenös",
    "ABDO TPV",
    "AVEC INJECTION",
    "con mdc fase portale",
    "FASE VENOSA",
    "Con contraste portal",
    "Portaal veneus",
    "MET CONTRAST",
    "腹部 造影 門脈相",
    "Arterial phase 1mm",
    "CTA abdomen",
]


@pytest.mark.parametrize("desc", NONCONTRAST)
def test_noncontrast_descriptions(desc):
    rules = load_rules()
    assert any(re.search(rx, desc, re.I) for rx in rules.noncontrast_description), desc


@pytest.mark.parametrize("desc", CONTRAST)
def test_contrast_descriptions(desc):
    rules = load_rules()
    assert not any(re.search(rx, desc, re.I) for rx in rules.noncontrast_description), desc
    assert any(re.search(rx, desc, re.I) for rx in rules.contrast_description), desc


def test_agent_tag_policy(tmp_path):
    root = tmp_path / "a"
    write_series(
        root / "x",
        name="x",
        study="s",
        description="Abdomen",
        contrast_agent="KM",
        series_number=2,
        **BIG,
    )
    write_series(
        root / "y",
        name="y",
        study="s",
        description="Abdomen nativ",
        contrast_agent="OMNIPAQUE",
        series_number=3,
        **BIG,
    )
    update_index(root, tmp_path / "idx", key=KEY, workers=1)
    df = read_index(tmp_path / "idx")
    (sel,) = select_series(df)
    # the wrong tag on the "nativ" series is noted; the neutral tagged one is demoted
    assert [c.contrast_evidence for c in sel.candidates] == [
        "noncontrast_description",
        "contrast_agent_tag",
    ]
    assert sel.candidates[0].notes and "OMNIPAQUE" in sel.candidates[0].notes[0]
    rules_path = tmp_path / "strict.json"
    rules_path.write_text(json.dumps({"version": "strict-1", "contrast_agent_policy": "reject"}))
    (sel,) = select_series(df, rules=load_rules(rules_path))
    assert len(sel.candidates) == 1 and sel.rules_version == "strict-1"


def test_rules_override_and_validation(tmp_path, study_index):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"version": "site-2", "max_slice_thickness_mm": 10.0}))
    rules = load_rules(p)
    assert rules.version == "site-2" and rules.max_slice_thickness_mm == 10.0
    assert rules.min_slices == load_rules().min_slices  # untouched keys keep the defaults
    a = next(s for s in select_series(study_index, rules=rules) if s.status == "selected")
    assert any(c.series_description == "NATIV 8mm" for c in a.candidates)
    for bad, msg in (
        ({"version": "x", "max_thickness": 3}, "unknown key"),
        ({"max_slice_thickness_mm": 3}, "version"),
        ({"version": "x", "contrast_description": ["("]}, "bad regex"),
        ({"version": "x", "phase_check": {"on_phase_mismatch": "ignore"}}, "flag"),
    ):
        p.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=msg):
            load_rules(p)


def _phase(array, affine, rules=None):
    pc = (rules or load_rules()).phase_check
    return measure_phase(
        array,
        affine,
        noncontrast_max_hu=pc.noncontrast_max_hu,
        contrast_min_hu=pc.contrast_min_hu,
        backend="numpy",
    )


@pytest.mark.parametrize("seed", [0, 3])
def test_phase_check_on_phantom_subjects(seed):
    from pdacscreen.io.phantom.subject import make_subject

    sub = make_subject(seed, matrix=128)
    rules = load_rules()
    nc = _phase(sub.noncontrast, sub.affine)
    pv = _phase(sub.contrast, sub.affine)
    assert nc.estimate == "non_contrast" and rules.phase_check.action(nc.estimate) == "accept"
    assert nc.blood_pool_hu < 70
    assert pv.estimate == "contrast" and rules.phase_check.action(pv.estimate) == "flag"
    assert pv.blood_pool_hu > 130
    strict = rules.__class__(
        **{**rules.__dict__, "phase_check": rules.phase_check.__class__(on_phase_mismatch="reject")}
    )
    assert strict.phase_check.action(pv.estimate) == "reject"
    assert strict.phase_check.action(nc.estimate) == "accept"


def test_phase_between_thresholds_is_indeterminate():
    """One measure, one rule: a blood pool between the thresholds is neither phase."""
    from pdacscreen.io.phantom.subject import make_subject

    sub = make_subject(0, matrix=128)
    hu = _phase(sub.noncontrast, sub.affine).blood_pool_hu
    rules = load_rules()
    mid = rules.__class__(
        **{
            **rules.__dict__,
            "phase_check": rules.phase_check.__class__(
                noncontrast_max_hu=hu - 5.0, contrast_min_hu=hu + 5.0
            ),
        }
    )
    pm = _phase(sub.noncontrast, sub.affine, mid)
    assert pm.estimate == "indeterminate" and pm.blood_pool_hu == hu
    assert mid.phase_check.action(pm.estimate) == "accept"


def test_phase_check_without_body_is_indeterminate():
    pc = _phase(np.full((6, 32, 32), -1000, np.float32), np.diag([3.0, 1, 1, 1]))
    assert pc.estimate == "indeterminate" and pc.blood_pool_hu is None
    assert "not measured" in pc.reason


def test_selection_on_phantom_archive_matches_truth(tmp_path_factory):
    import pandas as pd
    from ingest_synth import phantom_archive

    archive, index = phantom_archive(tmp_path_factory)
    truth = pd.read_parquet(archive / "truth.parquet")
    sels = {s.study_instance_uid: s for s in select_series(read_index(index))}
    assert set(sels) == set(truth["study_instance_uid"])
    for row in truth.itertuples():
        sel = sels[row.study_instance_uid]
        assert sel.status == "selected"
        assert sel.series_instance_uid == row.noncontrast_series_uid, (
            row.nc_series_description,
            row.pv_series_description,
        )
        assert row.contrast_series_uid in sel.rejections or any(
            c.series_instance_uid == row.contrast_series_uid for c in sel.candidates[1:]
        )
