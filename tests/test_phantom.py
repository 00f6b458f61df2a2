"""Phantom CT archive: files decode, geometry matches a peer converter, HU and truth are right,
outputs are deterministic and extendable, previews render.

One small archive (matrix 128, 4 studies, ``compress="mixed"``) is written once per module; seed 22
gives studies with and without PDAC, a thick reformat and a secondary capture (asserted below).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from conftest import REPO
from scipy import ndimage

from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.archive import generate_archive
from pdacscreen.io.phantom.dicom import TRANSFER_SYNTAXES
from pdacscreen.io.phantom.subject import SLICE_CAP, make_subject
from pdacscreen.io.phantom.subject import _draw_findings as draw_findings
from pdacscreen.io.phantom.tissue import T
from pdacscreen.io.types import nifti_affine, voxel_to_world, world_to_voxel

SEED, N = 22, 4
DCM2NIIX = REPO / ".venv" / "bin" / "dcm2niix"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "archive"
    generate_archive(
        out, studies=N, seed=SEED, matrix=128, compress="mixed", workers=1, preview=True
    )
    return out


@pytest.fixture(scope="module")
def truth(archive) -> list[dict]:
    return pq.read_table(archive / "truth.parquet").to_pylist()


@pytest.fixture(scope="module")
def files(archive) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """Every DICOM file, read and decoded once, grouped by SeriesInstanceUID."""
    series = defaultdict(list)
    for f in sorted((archive / "dicom").rglob("*")):
        if f.is_file():
            ds = pydicom.dcmread(f)
            ds.decoded = ds.pixel_array  # decode now: fails here for any unsupported syntax
            series[ds.SeriesInstanceUID].append((f, ds))
    return series


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.decoded * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _sorted_series(items) -> list[pydicom.Dataset]:
    """Slices sorted along the normal of ImageOrientationPatient (never by InstanceNumber)."""
    dss = [ds for _, ds in items]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(dss, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))


def test_every_file_reads_and_decodes_for_every_transfer_syntax(files, truth):
    syntaxes = defaultdict(int)
    for items in files.values():
        for _, ds in items:
            syntaxes[ds.file_meta.TransferSyntaxUID] += 1
            assert ds.decoded.shape == (ds.Rows, ds.Columns)
    assert set(syntaxes) == set(TRANSFER_SYNTAXES["mixed"])
    assert sum(len(v) for v in files.values()) == sum(r["n_files"] for r in truth)


def test_series_in_each_study_look_like_a_hospitals(files, truth):
    kinds = defaultdict(int)
    for r in truth:
        nc, pv = files[r["noncontrast_series_uid"]], files[r["contrast_series_uid"]]
        assert len(nc) == len(pv) == r["n_slices"]
        loc = files[r["localizer_series_uid"]]
        assert len(loc) == 1 and "LOCALIZER" in loc[0][1].ImageType
        for _, ds in nc + pv:
            assert list(ds.ImageType[:2]) == ["ORIGINAL", "PRIMARY"]
            assert ds.StudyInstanceUID == r["study_instance_uid"]
            assert ds.PatientID == r["patient_id"]
            assert ds.Manufacturer == r["manufacturer"]
        assert nc[0][1].SeriesDescription == r["nc_series_description"]
        assert pv[0][1].SeriesDescription == r["pv_series_description"]
        assert nc[0][1].get("ContrastBolusAgent", "") == r["nc_contrast_agent_tag"]
        assert pv[0][1].get("ContrastBolusAgent", "") == r["pv_contrast_agent_tag"]
        # signed vendors store HU + 1024 in int16, unsigned ones use intercept -1024/-1000
        ds0 = nc[0][1]
        if ds0.PixelRepresentation == 0:
            assert float(ds0.RescaleIntercept) in (-1024.0, -1000.0)
        if r["reformat_series_uid"]:
            kinds["reformat"] += 1
            ref = files[r["reformat_series_uid"]]
            assert all(ds.ImageType[0] == "DERIVED" for _, ds in ref)
            assert float(ref[0][1].SliceThickness) > r["slice_thickness_mm"]
        if r["secondary_capture_series_uid"]:
            kinds["sc"] += 1
            ((_, sc),) = files[r["secondary_capture_series_uid"]]
            assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        # shuffled on disk: file name order is not slice order
        names = [p.name for p, _ in nc]
        z_order = [p.name for p, _ in sorted(nc, key=lambda t: float(t[1].ImagePositionPatient[2]))]
        assert names != z_order
    assert kinds["reformat"] and kinds["sc"], "seed no longer yields a reformat and a capture"
    assert {r["label"] for r in truth} == {0, 1}


def test_decoded_hu_equal_the_subject_and_padding_is_outside_fov(files, truth):
    """The archive's pixels are exactly make_subject's volume (vendor storage round-trips)."""
    for r in truth:
        sub = make_subject(r["subject_seed"], matrix=128, pdac=bool(r["label"]))
        vol = np.stack([_hu(ds) for ds in _sorted_series(files[r["noncontrast_series_uid"]])])
        floor = -1000.0 if r["manufacturer"] == "Philips" else -1024.0
        inside = vol[:, sub.fov_mask]
        np.testing.assert_array_equal(inside, np.maximum(sub.noncontrast[:, sub.fov_mask], floor))
        outside = vol[:, ~sub.fov_mask]
        assert outside.max() <= floor  # padding (-2000 stored, 0 stored) reads as air or below
        assert sub.truth["slice_thickness_mm"] == r["slice_thickness_mm"]


def test_dcm2niix_converts_to_the_label_grid(archive, files, truth, tmp_path):
    if not DCM2NIIX.exists():
        pytest.skip(f"dcm2niix not installed at {DCM2NIIX}")
    for r in truth:
        src = tmp_path / r["noncontrast_series_uid"] / "in"
        src.mkdir(parents=True)
        for f, _ in files[r["noncontrast_series_uid"]]:
            shutil.copy(f, src / f.name)
        out = src.parent
        run = subprocess.run(
            [str(DCM2NIIX), "-z", "n", "-b", "n", "-f", "nc", "-o", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        (nii,) = out.glob("nc*.nii")
        peer = nib.as_closest_canonical(nib.load(nii))
        label = nib.as_closest_canonical(nib.load(archive / r["label_path"]))
        assert peer.shape == label.shape
        np.testing.assert_allclose(peer.affine, label.affine, atol=0.01)
        # same voxels, same world positions: the peer's HU agree with ours inside the FOV
        ours = np.stack([_hu(ds) for ds in _sorted_series(files[r["noncontrast_series_uid"]])])
        ours_img = nib.as_closest_canonical(
            nib.Nifti1Image(
                ours.transpose(2, 1, 0).astype(np.float32), nifti_affine(_affine(files, r))
            )
        )
        a, b = np.asarray(peer.dataobj, np.float32), np.asarray(ours_img.dataobj, np.float32)
        keep = b > -1000
        np.testing.assert_array_equal(a[keep], b[keep])


def _affine(files, r) -> np.ndarray:
    """pdacscreen affine of a series from its headers (sorted along the normal)."""
    dss = _sorted_series(files[r["noncontrast_series_uid"]])
    iop = np.array(dss[0].ImageOrientationPatient, float)
    p0, p1 = (np.array(d.ImagePositionPatient, float) for d in dss[:2])
    dy, dx = (float(v) for v in dss[0].PixelSpacing)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2], aff[:3, 3] = p1 - p0, iop[3:] * dy, iop[:3] * dx, p0
    return aff


def test_truth_agrees_with_the_files(archive, files, truth):
    for r in truth:
        assert r["noncontrast_series_uid"] in files and r["contrast_series_uid"] in files
        lab = nib.load(archive / r["label_path"])
        data = np.asarray(lab.dataobj)
        assert set(np.unique(data)) <= {0, 1, 2} and (data == 1).sum() > 50
        np.testing.assert_allclose(nifti_affine(_affine(files, r)), lab.affine, atol=1e-3)
        if r["lesion_type"] == "none":
            assert not (data == 2).any() and np.isnan(r["lesion_center_x_mm"])
            continue
        xyz = np.array([r["lesion_center_x_mm"], r["lesion_center_y_mm"], r["lesion_center_z_mm"]])
        ras = np.array([-xyz[0], -xyz[1], xyz[2], 1.0])
        ijk = np.round(np.linalg.inv(lab.affine) @ ras)[:3].astype(int)
        assert data[tuple(ijk)] == 2, f"lesion centre of study {r['study_index']} not in lesion"
        assert r["lesion_location"] in ("head", "body", "tail")


def test_hu_fall_in_the_promised_ranges():
    """Non-contrast: parenchyma 35-50 (partial volume pulls the measured mean a little lower),
    PDAC 5-20 HU below it, liver 55-65, aorta 35-50; portal venous: aorta 150-200, parenchyma
    90-130, PDAC 30-60 HU below it."""
    for seed in (3, 4, 5):
        s = make_subject(
            seed, matrix=128, lesion_type="pdac", lesion_diameter_mm=30, fatty_pancreas=False
        )
        t = s.truth
        assert 35 <= t["parenchyma_hu"] <= 50 and 5 <= t["lesion_delta_nc_hu"] <= 20
        c = world_to_voxel(
            s.affine,
            np.array([t["lesion_center_x_mm"], t["lesion_center_y_mm"], t["lesion_center_z_mm"]]),
        )
        kk, jj, ii = np.indices(s.labels.shape)
        dist = np.sqrt(
            ((kk - c[0]) * s.spacing[0]) ** 2
            + ((jj - c[1]) * s.spacing[1]) ** 2
            + ((ii - c[2]) * s.spacing[2]) ** 2
        )
        core = (dist < 8) & (s.labels == 2) & (s.tissue == T.PDAC)
        paren = ndimage.binary_erosion((s.labels == 1) & (s.tissue == T.PANC)) & (dist > 30)

        def mean(vol, m):
            return float(vol[m].mean())

        liver = ndimage.binary_erosion(s.tissue == T.LIVER, iterations=2)
        aorta = ndimage.binary_erosion(s.tissue == T.ARTERY)
        nc_core, nc_par = mean(s.noncontrast, core), mean(s.noncontrast, paren)
        assert 25 <= nc_par <= 52
        assert abs(nc_core - (t["parenchyma_hu"] - t["lesion_delta_nc_hu"])) < 8
        assert 50 <= mean(s.noncontrast, liver) <= 68 or t.get("fatty_liver")
        assert 30 <= mean(s.noncontrast, aorta) <= 55
        pv_core, pv_par = mean(s.contrast, core), mean(s.contrast, paren)
        assert 80 <= pv_par <= 135 and 20 <= pv_par - pv_core <= 75
        assert 140 <= mean(s.contrast, aorta) <= 205
        assert 95 <= mean(s.contrast, liver) <= 125 or t.get("fatty_liver")


def test_subject_noise_geometry_and_slice_caps():
    s = make_subject(7, matrix=128)
    t = s.truth
    assert s.noncontrast.shape == s.contrast.shape == s.labels.shape == s.tissue.shape
    assert s.noncontrast.dtype == np.float32 and s.labels.dtype == np.uint8
    assert s.noncontrast.shape[0] <= SLICE_CAP[128]
    assert 0.6 * 4 <= t["pixel_spacing_mm"] <= 0.9 * 4 and 0.625 <= t["slice_thickness_mm"] <= 5
    assert 180 <= t["z_coverage_mm"] <= 330 and 8 <= t["noise_hu"] <= 25
    # correlated noise: the residual in homogeneous liver has the promised size
    liver = ndimage.binary_erosion(s.tissue == T.LIVER, iterations=3)
    resid = (s.noncontrast - ndimage.uniform_filter(s.noncontrast, (1, 7, 7)))[liver]
    assert 0.5 * t["noise_hu"] <= resid.std() <= 1.6 * t["noise_hu"]
    # voxel_to_world of the affine reproduces the spacing
    step = voxel_to_world(s.affine, np.array([[1, 1, 1]])) - voxel_to_world(s.affine, np.zeros(3))
    np.testing.assert_allclose(np.abs(step[0]), s.spacing[::-1])


def test_findings_follow_the_literature():
    rng = np.random.default_rng(0)
    pdac = [
        draw_findings(np.random.default_rng(rng.integers(2**32)), True, None) for _ in range(1500)
    ]
    d = np.array([f.lesion_diameter_mm for f in pdac])
    assert d.min() >= 5 and d.max() <= 45 and (d < 20).mean() >= 0.35
    head = np.mean([f.lesion_location == "head" for f in pdac])
    assert 0.6 <= head <= 0.7
    assert np.mean([f.duct_dilated for f in pdac]) > 0.4
    assert np.mean([f.atrophy for f in pdac]) > 0.2


def test_deterministic_parallel_and_extendable(archive, truth, tmp_path):
    """Studies 0-1, then 2-3 added with --start and two workers: same bytes as the one-go run."""
    other = tmp_path / "grown"
    generate_archive(other, studies=2, seed=SEED, matrix=128, compress="mixed", workers=1)
    first = {p: p.stat().st_mtime_ns for p in (other / "dicom").rglob("*") if p.is_file()}
    s = generate_archive(other, studies=4, seed=SEED, matrix=128, compress="mixed", workers=2)
    assert (s.studies_written, s.studies_skipped) == (2, 2)
    assert all(p.stat().st_mtime_ns == m for p, m in first.items())  # old studies untouched
    mine = {
        p.relative_to(archive): p.read_bytes()
        for p in (archive / "dicom").rglob("*")
        if p.is_file()
    }
    theirs = {
        p.relative_to(other): p.read_bytes() for p in (other / "dicom").rglob("*") if p.is_file()
    }
    assert mine.keys() == theirs.keys() and all(mine[k] == theirs[k] for k in mine)
    grown = pq.read_table(other / "truth.parquet").to_pylist()
    assert [r["study_instance_uid"] for r in grown] == [r["study_instance_uid"] for r in truth]
    again = generate_archive(
        other, studies=1, seed=SEED, matrix=128, compress="mixed", workers=1, start=3
    )
    assert again.studies_written == 0
    a, b = make_subject(5, matrix=128, pdac=True), make_subject(5, matrix=128, pdac=True)
    assert np.array_equal(a.noncontrast, b.noncontrast) and a.truth == b.truth


def test_bad_arguments_raise_typed_errors(tmp_path, archive):
    with pytest.raises(InputError) as e:
        make_subject(1, matrix=100)
    assert e.value.code == "bad_matrix"
    with pytest.raises(InputError) as e:
        generate_archive(tmp_path / "x", studies=1, seed=1, compress="zip")
    assert e.value.code == "bad_compress"
    with pytest.raises(InputError) as e:  # same folder, other parameters
        generate_archive(archive, studies=1, seed=SEED + 1, matrix=128, compress="mixed")
    assert e.value.code == "archive_mismatch"


def test_cli_and_previews(archive, tmp_path):
    from PIL import Image

    from pdacscreen.flows.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "phantom",
            "--out",
            str(out),
            "--studies",
            "1",
            "--seed",
            "5",
            "--matrix",
            "128",
            "--workers",
            "1",
            "--preview",
        ]
    )
    assert rc == 0 and (out / "truth.parquet").exists()
    assert len(list((out / "preview").glob("*.png"))) == 1
    pngs = sorted((archive / "preview").glob("*.png"))
    assert len(pngs) == N and any("none" in p.name for p in pngs)
    for p in pngs:
        img = np.asarray(Image.open(p).convert("L"), float)
        body = img[:, : img.shape[1] // 3] > 20  # the body is brighter than air at W400/L40
        assert 0.2 < body.mean() < 0.8
