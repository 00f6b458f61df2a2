"""SEG + Comprehensive 3D SR writer: dciodvfy-clean, read back, masks equal voxel for voxel."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pdacscreen.io.dicom.export import (
    NOT_FOR_CLINICAL_USE,
    Algorithm,
    LesionFinding,
    StudyFinding,
    export_uids,
    sort_source,
    write_seg,
    write_sr,
)
from pdacscreen.io.errors import InputError

ALG = Algorithm(
    name="pdacscreen-reference", version="0.1.0", model_sha256="ab" * 32, config_hash="c0ffee12"
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A phantom PDAC study at matrix 128: non-contrast files, and the subject's label map."""
    from pdacscreen.io.phantom.dicom import write_study
    from pdacscreen.io.phantom.subject import make_subject

    root = tmp_path_factory.mktemp("phantom")
    sub = make_subject(3, matrix=128, lesion_type="pdac", lesion_diameter_mm=25)
    truth = write_study(sub, root=root, seed=3, index=0, matrix=128, compress="none")
    files = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
        == truth["noncontrast_series_uid"]
    ]
    return sub, files


def _dciodvfy(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; make setup installs it)")
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def _errors(report: str) -> list[str]:
    return [ln for ln in report.splitlines() if ln.startswith("Error")]


def _masks(sub):
    return (sub.labels >= 1).astype(np.uint8), (sub.labels == 2).astype(np.uint8)


def test_seg_round_trip_and_dciodvfy(study, tmp_path):
    import highdicom as hd

    sub, files = study
    pancreas, lesion = _masks(sub)
    path = write_seg(files, pancreas=pancreas, lesions=[lesion], algorithm=ALG, out_dir=tmp_path)
    assert _errors(_dciodvfy(path)) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == export_uids(ds.StudyInstanceUID, ALG)["seg"]
    assert NOT_FOR_CLINICAL_USE in ds.SeriesDescription
    assert ds.SegmentationType == "BINARY"
    # frames only where a segment is
    n_planes = int(pancreas.any(axis=(1, 2)).sum() + lesion.any(axis=(1, 2)).sum())
    assert int(ds.NumberOfFrames) == n_planes
    seg = hd.seg.segread(path)
    src = sort_source(files)
    positions = [tuple(float(v) for v in d.ImagePositionPatient) for d in src]
    # map every frame back through its position onto the source slice, per segment
    got = {1: np.zeros_like(pancreas), 2: np.zeros_like(lesion)}
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        k = positions.index(pos)
        s = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        got[s][k] = pixels[f]
    np.testing.assert_array_equal(got[1], pancreas)
    np.testing.assert_array_equal(got[2], lesion)
    # highdicom's own mapping through the referenced source SOP instances agrees
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in src], segment_numbers=[1, 2]
    )
    np.testing.assert_array_equal(arr[..., 0], pancreas)
    np.testing.assert_array_equal(arr[..., 1], lesion)
    assert seg.get_segment_description(1).segmented_property_type.value == "15776009"
    params = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert ALG.model_sha256 in str(params.AlgorithmParameters)
    # deterministic: the same study, model and config give the same UIDs
    again = write_seg(
        files, pancreas=pancreas, lesions=[lesion], algorithm=ALG, out_dir=tmp_path / "b"
    )
    assert pydicom.dcmread(again).SOPInstanceUID == ds.SOPInstanceUID


def test_sr_round_trip_and_dciodvfy(study, tmp_path):
    import highdicom as hd

    sub, files = study
    pancreas, lesion = _masks(sub)
    seg_path = write_seg(
        files, pancreas=pancreas, lesions=[lesion], algorithm=ALG, out_dir=tmp_path
    )
    t = sub.truth
    centre = (t["lesion_center_x_mm"], t["lesion_center_y_mm"], t["lesion_center_z_mm"])
    finding = StudyFinding(
        probability=0.8731,
        flagged=True,
        threshold=0.42,
        threshold_provenance="validation phantom set v1, sensitivity 0.90",
        lesions=(
            LesionFinding(
                diameter_mm=24.5, volume_ml=6.2, location=t["lesion_location"], center_lps_mm=centre
            ),
        ),
    )
    path = write_sr(files, seg=seg_path, finding=finding, algorithm=ALG, out_dir=tmp_path)
    assert _errors(_dciodvfy(path)) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == export_uids(ds.StudyInstanceUID, ALG)["sr"]
    assert NOT_FOR_CLINICAL_USE in ds.SeriesDescription
    sr = hd.sr.srread(path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    g = groups[0]
    assert (
        g.referenced_segment.referenced_sop_instance_uid == pydicom.dcmread(seg_path).SOPInstanceUID
    )
    vals = {m.name.meaning: m.value for m in g.get_measurements()}
    assert vals["Diameter"] == pytest.approx(24.5)
    assert vals["Volume"] == pytest.approx(6.2)
    centres = sr.content.get_planar_roi_measurement_groups()
    assert len(centres) == 1
    region = centres[0].roi
    assert region.graphic_type.value == "POINT"
    np.testing.assert_allclose(region.value, [centre])
    texts, numbers = [], {}

    def walk(items):
        for it in items:
            if "TextValue" in it:
                texts.append(str(it.TextValue))
            if "MeasuredValueSequence" in it:
                mv = it.MeasuredValueSequence[0]
                numbers[it.ConceptNameCodeSequence[0].CodeMeaning] = float(mv.NumericValue)
            walk(it.get("ContentSequence", []))

    walk(ds.ContentSequence)
    assert numbers["Probability"] == pytest.approx(0.8731)
    assert numbers["Operating threshold"] == pytest.approx(0.42)
    note = "\n".join(texts)
    assert "validation phantom set v1" in note and NOT_FOR_CLINICAL_USE in note
    assert ALG.model_sha256 in note


def test_masks_off_the_source_grid_are_refused(study, tmp_path):
    sub, files = study
    pancreas, lesion = _masks(sub)
    with pytest.raises(InputError, match="source series grid"):
        write_seg(files, pancreas=pancreas[1:], lesions=[], algorithm=ALG, out_dir=tmp_path)
    with pytest.raises(InputError, match="model_sha256"):
        Algorithm(name="x", version="1", model_sha256="nothex", config_hash="c")
