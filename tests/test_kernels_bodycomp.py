"""Body composition (kernels/bodycomp.py) and vertebral levels (kernels/vertebrae.py).

Against the phantom's truth (levels from its vertebrae, tissue areas counted on its tissue map at
L3), against an analytic slice with areas known in closed form, and on bad input (QC, not raises).
"""

from __future__ import annotations

import numpy as np
import pytest

from pdacscreen.io.phantom.followup import Visit, follow_up_course
from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.types import CTVolume
from pdacscreen.kernels.bodycomp import (
    FAT_HU,
    MUSCLE_HU,
    body_composition,
    body_composition_slice,
)
from pdacscreen.kernels.errors import KernelInputError
from pdacscreen.kernels.vertebrae import vertebral_levels

SEEDS = (2, 6)  # matrix 256: 1.6 mm pixels, 3 and 5 mm slices


@pytest.fixture(scope="module", params=SEEDS)
def subject(request):
    return make_subject(request.param, matrix=256)


def _volume(s) -> CTVolume:
    return CTVolume(s.noncontrast, s.spacing, s.affine)


def test_vertebral_levels_match_the_phantom_truth(subject):
    lv = vertebral_levels(subject.noncontrast, subject.affine, backend="numpy")
    assert lv.qc == ""
    names = [v.name for v in lv.vertebrae]
    assert "T12" in names and "L1" in names and "L3" in names
    assert [v.z_mm for v in lv.vertebrae] == sorted((v.z_mm for v in lv.vertebrae), reverse=True)
    half_slice = subject.spacing[0] / 2 + 1.0
    assert abs(lv.level("L1").z_mm - subject.truth["l1_z_mm"]) <= half_slice
    assert abs(lv.level("L3").z_mm - subject.truth["l3_z_mm"]) <= half_slice
    assert lv.level("T12").has_ribs and not lv.level("L1").has_ribs


def test_areas_at_l3_within_five_percent_of_truth(subject):
    t = subject.truth
    bc = body_composition(_volume(subject), backend="numpy")  # levels located, not given
    assert bc.z_mm == pytest.approx(t["l3_slice_z_mm"], abs=subject.spacing[0] + 0.01)
    for got, key in (
        (bc.skeletal_muscle_area_cm2, "l3_skeletal_muscle_area_cm2"),
        (bc.visceral_fat_area_cm2, "l3_visceral_fat_area_cm2"),
        (bc.subcutaneous_fat_area_cm2, "l3_subcutaneous_fat_area_cm2"),
    ):
        assert got == pytest.approx(t[key], rel=0.05), key
    assert 35.0 < bc.muscle_mean_hu < 60.0  # phantom muscle 42-55 HU, partial volume at edges
    # masks are disjoint and the areas are their pixel counts
    m, v, s = bc.muscle, bc.visceral_fat, bc.subcutaneous_fat
    assert not (m & v).any() and not (m & s).any() and not (v & s).any()
    px = subject.spacing[1] * subject.spacing[2] / 100.0
    assert bc.skeletal_muscle_area_cm2 == pytest.approx(m.sum() * px)
    a = subject.noncontrast[bc.slice_index]
    assert (a[m] >= MUSCLE_HU[0]).all() and (a[m] <= MUSCLE_HU[1]).all()
    assert (a[v] >= FAT_HU[0]).all() and (a[v] <= FAT_HU[1]).all()
    row = bc.row()
    assert row["skeletal_muscle_area_cm2"] == round(bc.skeletal_muscle_area_cm2, 2)
    assert set(row) == {
        "l3_slice_z_mm",
        "skeletal_muscle_area_cm2",
        "visceral_fat_area_cm2",
        "subcutaneous_fat_area_cm2",
        "muscle_mean_hu",
        "skeletal_muscle_index_cm2_m2",
        "bodycomp_qc",
    }


def _ellipse(shape, c, semi, sp):
    yy, xx = np.indices(shape)
    return ((yy - c[0]) * sp / semi[0]) ** 2 + ((xx - c[1]) * sp / semi[1]) ** 2 <= 1.0


def _analytic_slice(sp=0.8, n=512):
    """Skin-to-spine rings: SAT, wall muscle, visceral fat, a vertebra and two psoas muscles."""
    rng = np.random.default_rng(0)
    c = (n / 2, n / 2)
    a = np.full((n, n), -1000.0, np.float32)
    outer = _ellipse(a.shape, c, (120, 160), sp)
    fascia = _ellipse(a.shape, c, (95, 135), sp)
    cavity = _ellipse(a.shape, c, (83, 123), sp)
    a[outer] = -100.0
    a[fascia] = 50.0
    a[cavity] = -95.0
    vert = _ellipse(a.shape, (c[0] + 50 / sp, c[1]), (15, 20), sp)
    psoas = _ellipse(a.shape, (c[0] + 50 / sp, c[1] - 34 / sp), (13, 13), sp) | _ellipse(
        a.shape, (c[0] + 50 / sp, c[1] + 34 / sp), (13, 13), sp
    )
    bowel = _ellipse(a.shape, (c[0] - 20 / sp, c[1]), (20, 30), sp)
    a[psoas] = 48.0
    a[bowel] = 20.0
    a[vert] = 400.0
    truth = {
        "sat": (outer & ~fascia).sum(),
        "muscle": ((fascia & ~cavity) | psoas).sum(),
        "vat": (cavity & ~psoas & ~vert & ~bowel).sum(),
    }
    a += rng.normal(0, 8, a.shape).astype(np.float32)
    return a, truth, sp


def test_analytic_slice_areas():
    a, truth, sp = _analytic_slice()
    bc = body_composition_slice(a, (sp, sp), backend="numpy")
    px = sp * sp / 100.0
    assert bc.qc == ""
    assert bc.subcutaneous_fat_area_cm2 == pytest.approx(truth["sat"] * px, rel=0.03)
    assert bc.skeletal_muscle_area_cm2 == pytest.approx(truth["muscle"] * px, rel=0.03)
    assert bc.visceral_fat_area_cm2 == pytest.approx(truth["vat"] * px, rel=0.03)
    assert bc.muscle_mean_hu == pytest.approx(49.0, abs=3.0)


def test_bad_input_gives_qc_not_exceptions():
    a, _, sp = _analytic_slice()
    coarse = body_composition_slice(a[::4, ::4], (4 * sp, 4 * sp), backend="numpy")
    assert coarse.qc == "resolution_too_coarse" and np.isnan(coarse.skeletal_muscle_area_cm2)
    air = body_composition_slice(np.full((64, 64), -1000.0), (1.0, 1.0), backend="numpy")
    assert air.qc == "no_body"
    cut = a.copy()
    cut[:, :150] = -1024.0  # the reconstruction's field of view cuts the body
    assert body_composition_slice(cut, (sp, sp), backend="numpy").qc == "body_cut_by_fov"
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2], aff[3, 3] = 5.0, sp, sp, 1.0  # k -> z, j -> y, i -> x
    vol = CTVolume(np.stack([a] * 6), (5.0, sp, sp), aff)
    far = body_composition(vol, 500.0, backend="numpy")
    assert far.qc == "level_outside_scan"
    assert body_composition(vol, backend="numpy").qc == "level_not_found"  # no disc profile
    with pytest.raises(KernelInputError, match="axial"):
        vertebral_levels(vol.array, np.diag([5.0, sp, sp, 1.0]))  # slices along x: not axial
    with pytest.raises(KernelInputError, match="2-D"):
        body_composition_slice(np.zeros((4, 4, 4)), (1.0, 1.0))
    with pytest.raises(KernelInputError, match="pixel_spacing_mm"):
        body_composition_slice(a, (0.0, 1.0))
    with pytest.raises(KernelInputError, match="backend"):
        body_composition_slice(a, (sp, sp), backend="gpu")


def test_follow_up_keeps_the_anatomy_and_changes_what_it_says():
    visits = follow_up_course("progressor", (0.0, 12.0, 24.0))
    assert [v.lesion_scale for v in visits][0] == 0.0 and visits[-1].lesion_scale == 1.0
    first = make_subject(11, matrix=128, lesion_type="pdac", visit=visits[0])
    last = make_subject(11, matrix=128, lesion_type="pdac", visit=visits[-1])
    assert first.truth["label"] == 0 and first.truth["lesion_type"] == "none"
    assert last.truth["label"] == 1 and last.truth["lesion_diameter_mm"] > 0
    assert last.truth["visit_months"] == 24.0
    # same anatomy: the vertebrae lie at the same body-frame heights (offset differs per visit)
    d_first = first.truth["l3_z_mm"] - first.truth["l1_z_mm"]
    d_last = last.truth["l3_z_mm"] - last.truth["l1_z_mm"]
    assert d_first == pytest.approx(d_last)
    assert last.truth["pancreas_volume_ml"] < first.truth["pancreas_volume_ml"]
    assert last.truth["l3_skeletal_muscle_area_cm2"] < first.truth["l3_skeletal_muscle_area_cm2"]
    same = make_subject(11, matrix=128, lesion_type="pdac", visit=Visit())
    plain = make_subject(11, matrix=128, lesion_type="pdac")
    assert np.array_equal(same.noncontrast, plain.noncontrast)
    with pytest.raises(Exception, match="lesion_scale"):
        Visit(lesion_scale=-1.0)


def test_skeletal_muscle_index_needs_a_plausible_height():
    from pdacscreen.kernels.bodycomp import HEIGHT_RANGE_M, skeletal_muscle_index

    assert skeletal_muscle_index(150.0, 1.75) == pytest.approx(150.0 / 1.75**2)
    for bad in (None, float("nan"), 0.0, 175.0, HEIGHT_RANGE_M[0] - 0.01):  # 175: cm, not m
        assert np.isnan(skeletal_muscle_index(150.0, bad))
    assert np.isnan(skeletal_muscle_index(float("nan"), 1.75))


def test_height_from_the_header_gives_the_index_and_is_not_a_column(tmp_path, subject):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pdacscreen.flows.study_worker import patient_height_m
    from pdacscreen.kernels.bodycomp import BODYCOMP_COLUMNS

    def header(name: str, size) -> str:
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.SeriesInstanceUID = "1.2.3"
        if size is not None:
            ds.PatientSize = size
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return str(path)

    assert patient_height_m([tmp_path / "missing.dcm", header("a.dcm", "1.68")], "1.2.3") == 1.68
    assert patient_height_m([header("b.dcm", None)], "1.2.3") is None
    assert patient_height_m([header("c.dcm", "0")], "1.2.3") is None
    bc = body_composition(_volume(subject), backend="numpy")
    row = bc.row(1.68)
    assert set(row) == set(BODYCOMP_COLUMNS) and not any("height" in c for c in row)
    assert row["skeletal_muscle_index_cm2_m2"] == pytest.approx(
        bc.skeletal_muscle_area_cm2 / 1.68**2, abs=0.01
    )
    assert bc.row()["skeletal_muscle_index_cm2_m2"] is None


def test_bodycomp_evidence_image_shows_the_masks(tmp_path, subject):
    from PIL import Image

    from pdacscreen.engine.evidence import BODYCOMP_COLOURS, write_bodycomp_image

    vol = _volume(subject)
    bc = body_composition(vol, backend="numpy")
    path = write_bodycomp_image(vol, bc, tmp_path / "a")
    again = write_bodycomp_image(vol, bc, tmp_path / "b")
    assert path.name == "bodycomp.png" and path.read_bytes() == again.read_bytes()
    img = np.asarray(Image.open(path).convert("RGB")).astype(float)
    f = img.shape[1] // vol.shape[2] if img.shape[1] >= 2 * vol.shape[2] else 1
    for mask, colour in zip((bc.muscle, bc.subcutaneous_fat), BODYCOMP_COLOURS[::2], strict=True):
        ys, xs = np.nonzero(mask)
        px = img[ys * f, xs * f]
        # blended half with the colour: the colour's dominant channel is lifted everywhere
        c = int(np.argmax(colour))
        assert (px[:, c] >= 0.5 * colour[c] - 1).all()


def test_implausible_vertebra_runs_make_the_levels_uncertain():
    from pdacscreen.kernels.vertebrae import Vertebra, _name

    def run(heights, spacing):
        return [Vertebra(10 * i, -spacing * i, h, i == 0) for i, h in enumerate(heights)]

    assert _name(run([25, 26, 27, 28], 33.0)).qc == ""
    assert _name(run([25, 26, 27, 28], 33.0)).level("L3").slice_index == 30
    assert _name(run([25, 9, 27, 28], 33.0)).qc == "level_uncertain"  # a fragment inside
    assert _name(run([25, 26, 27, 28], 18.0)).qc == "level_uncertain"  # centres too close
    assert _name(run([25, 26], 33.0)).qc == ""
