"""load_series: slice order, geometry (tilt, gaps, uneven spacing), HU, codecs, refusals; NIfTI."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from ingest_synth import phantom_slice, write_series
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from pdacscreen.io.dicom.read import read_slice, to_hu
from pdacscreen.io.errors import (
    DuplicatePositionError,
    InputError,
    MissingSliceError,
    MixedGeometryError,
    NotAVolumeError,
    UnevenSpacingError,
)
from pdacscreen.io.nifti import read_nifti, write_labels, write_nifti
from pdacscreen.io.types import voxel_to_world, world_to_voxel
from pdacscreen.io.volume import load_series

KEY = b"test-key-0123456789abcdef"


def _ipp(path) -> np.ndarray:
    return np.array(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float)


def test_order_by_position_not_instance_number(tmp_path):
    files = write_series(tmp_path / "s", n=9, step=2.5, shuffle_instance_numbers=True)
    vol = load_series(list(reversed(files)), key=KEY)
    assert vol.shape == (9, 64, 64)
    assert vol.flags == ()
    # slice k of the volume is the file written for position k, whatever the InstanceNumber
    for k, f in enumerate(files):
        expected = phantom_slice(64, 64, k)
        np.testing.assert_allclose(vol.array[k], np.maximum(expected, -1024), atol=0.5)
        np.testing.assert_allclose(voxel_to_world(vol.affine, [k, 0, 0]), _ipp(f), atol=1e-4)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.8))
    assert vol.series_instance_uid and vol.patient_key and "PAT-001" not in repr(vol)


def test_affine_maps_rows_and_columns(tmp_path):
    # coronal-ish oblique orientation: rows along x, columns along -z
    iop = (1, 0, 0, 0, 0, -1)
    files = write_series(tmp_path / "s", n=5, iop=iop, pixel_spacing=(0.5, 0.7), step=3.0)
    vol = load_series(files, key=KEY)
    ipp0 = _ipp(files[0])
    # voxel (0, j, i) = IPP + i * col_spacing * row_dir + j * row_spacing * col_dir
    np.testing.assert_allclose(
        voxel_to_world(vol.affine, [0, 2, 3]),
        ipp0 + 3 * 0.7 * np.array([1, 0, 0]) + 2 * 0.5 * np.array([0, 0, -1]),
    )
    normal = np.cross(iop[:3], iop[3:])
    np.testing.assert_allclose(vol.affine[:3, 0], 3.0 * normal, atol=1e-6)
    np.testing.assert_allclose(
        world_to_voxel(vol.affine, voxel_to_world(vol.affine, [4, 1, 2])), [4, 1, 2], atol=1e-9
    )


def test_gantry_tilt_keeps_sheared_geometry(tmp_path):
    tilt = np.radians(15.0)
    iop = (1, 0, 0, 0, np.cos(tilt), -np.sin(tilt))
    files = write_series(tmp_path / "s", n=8, iop=iop, step=4.0, step_vector=(0, 0, 1))
    vol = load_series(files, key=KEY)
    assert "gantry_tilt" in vol.flags
    assert vol.provenance["tilt_deg"] == pytest.approx(15.0, abs=0.01)
    for k, f in enumerate(files):  # world coordinates of every slice origin are exact
        np.testing.assert_allclose(voxel_to_world(vol.affine, [k, 0, 0]), _ipp(f), atol=1e-4)
    normal = np.cross(iop[:3], iop[3:])
    assert vol.spacing[0] == pytest.approx(4.0 * np.cos(tilt), rel=1e-6)  # along the normal
    assert abs(vol.affine[:3, 0] @ normal) == pytest.approx(vol.spacing[0], rel=1e-6)


def test_missing_slice_refused_or_interpolated(tmp_path):
    files = write_series(tmp_path / "s", positions=[0, 2, 4, 8, 10, 12], step=2)
    with pytest.raises(MissingSliceError) as e:
        load_series(files, key=KEY)
    assert e.value.code == "missing_slice" and "1 slice(s) missing" in str(e.value)
    vol = load_series(files, key=KEY, on_missing_slice="resample")
    assert vol.shape[0] == 7 and "missing_slice_interpolated" in vol.flags
    # the interpolated slice 3 (position 6) is the mean of its neighbours (positions 4 and 8)
    hu = [np.maximum(phantom_slice(64, 64, k), -1024) for k in range(6)]
    np.testing.assert_allclose(vol.array[3], (hu[2] + hu[3]) / 2, atol=0.5)
    np.testing.assert_allclose(vol.array[4], hu[3], atol=0.5)


def test_uneven_spacing_resampled_or_refused(tmp_path):
    pos = [0, 2, 4, 6, 7, 10, 13, 16]
    files = write_series(tmp_path / "s", positions=pos)
    with pytest.raises(UnevenSpacingError):
        load_series(files, key=KEY, on_uneven="refuse")
    vol = load_series(files, key=KEY)
    assert "uneven_spacing" in vol.flags
    step = vol.spacing[0]
    assert step == pytest.approx(np.median(np.diff(pos)))
    assert vol.shape[0] == int(16 // step) + 1
    assert vol.provenance["source_positions_mm"] == [100.0 + p for p in pos]


def test_refusals(tmp_path):
    one = write_series(tmp_path / "one", n=1)
    with pytest.raises(NotAVolumeError):
        load_series(one, key=KEY)
    same = write_series(tmp_path / "same", positions=[5, 5, 5])
    with pytest.raises(NotAVolumeError, match="one position"):
        load_series(same, key=KEY)
    a = write_series(tmp_path / "a", n=4, rows=64, cols=64)
    b = write_series(tmp_path / "b", n=4, rows=32, cols=32, origin=(-25, -25, 120), sop_salt="b")
    with pytest.raises(MixedGeometryError, match="matrix"):
        load_series(a + b, key=KEY, series_instance_uid=pydicom.dcmread(a[0]).SeriesInstanceUID)
    with pytest.raises(InputError, match="series"):
        load_series(a + write_series(tmp_path / "c", name="other", n=4), key=KEY)
    with pytest.raises(InputError):
        load_series(a, key=KEY, on_uneven="stretch")


def test_duplicates(tmp_path):
    files = write_series(tmp_path / "s", n=6)
    vol = load_series(files + files[:2], key=KEY)  # the same instances twice
    assert vol.shape[0] == 6 and "duplicate_files" in vol.flags
    # different pixels at the same positions, new SOP UIDs, same series
    other = write_series(
        tmp_path / "dup", n=6, sop_salt="x", image_fn=lambda k: phantom_slice(64, 64, k) + 5
    )
    with pytest.raises(DuplicatePositionError):
        load_series(files + other, key=KEY)


def test_padding_rescale_and_out_of_field(tmp_path):
    files = write_series(tmp_path / "s", n=3, slope=0.5, intercept=-1000.0, padding=-2000)
    vol = load_series(files, key=KEY)
    hu = phantom_slice(64, 64, 1)
    ref = np.where(hu <= -1000, -1024, hu)  # air outside the body was stored as padding
    np.testing.assert_allclose(vol.array[1], ref, atol=0.5)
    assert vol.array.min() == -1024.0
    stored = np.array([[-2000, -3024, 0, 100]], np.int16)
    hu = to_hu(stored, slope=1.0, intercept=-1024.0, padding_value=-2000)
    assert hu.tolist() == [[-1024.0, -1024.0, -1024.0, -924.0]]
    hu = to_hu(stored, slope=1.0, intercept=0.0, padding_value=-3024, padding_limit=-2000)
    assert hu.tolist() == [[-1024.0, -1024.0, 0.0, 100.0]]


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_equal_uncompressed(tmp_path, ts):
    plain = load_series(write_series(tmp_path / "p", n=4), key=KEY)
    comp = load_series(write_series(tmp_path / "c", n=4, transfer_syntax=ts), key=KEY)
    np.testing.assert_array_equal(plain.array, comp.array)
    assert comp.provenance["transfer_syntaxes"] == [str(ts)]


def test_process_pool_gives_same_volume(tmp_path, caplog):
    from pdacscreen.io.dicom import read as dicomio

    files = write_series(tmp_path / "s", n=20, rows=32, cols=32, transfer_syntax=RLELossless)
    a = load_series(files, key=KEY, workers=1)
    b = load_series(files, key=KEY, workers=2)  # compressed, > 16 files: decoded in processes
    assert 2 in dicomio._POOLS and "pool unavailable" not in caplog.text
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_read_slice_matches_pydicom(tmp_path):
    files = write_series(tmp_path / "s", n=2, intercept=-1024)
    s = read_slice(files[1], key=KEY)
    np.testing.assert_array_equal(s.stored, pydicom.dcmread(files[1]).pixel_array)
    assert s.info["patient_key"] and "PAT-001" not in str(s.info)


def test_nifti_round_trip(tmp_path):
    tilt = np.radians(10.0)
    files = write_series(
        tmp_path / "s",
        n=5,
        iop=(1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)),
        step_vector=(0, 0, 1),
        step=3,
    )
    vol = load_series(files, key=KEY)
    out = write_nifti(vol, tmp_path / "v.nii.gz")
    arr, aff = read_nifti(out)
    np.testing.assert_array_equal(arr, vol.array)
    np.testing.assert_allclose(aff, vol.affine, atol=1e-4)  # sform keeps the shear
    lab = (vol.array > 0).astype(np.uint8)
    arr2, _ = read_nifti(write_labels(lab, vol.affine, tmp_path / "l.nii"))
    np.testing.assert_array_equal(arr2, lab)
    with pytest.raises(InputError):
        write_nifti(vol, tmp_path / "v.nrrd")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from ingest_synth import phantom_archive

    return phantom_archive(tmp_path_factory)


def test_phantom_volumes_match_dcm2niix(phantom, tmp_path, monkeypatch):
    """`pdacscreen volume` equals dcm2niix's conversion voxel for voxel in world coordinates
    (after mapping stored padding / out-of-field values to air), for every vendor, transfer
    syntax and phase in a small phantom archive."""
    import subprocess
    import sys
    from pathlib import Path

    import nibabel as nib
    import pandas as pd

    from pdacscreen.flows.cli import main as cli_main
    from pdacscreen.io.types import nifti_affine

    dcm2niix = Path(sys.executable).parent / "dcm2niix"
    if not dcm2niix.exists():
        pytest.skip("dcm2niix is not installed in the venv")
    archive, index = phantom
    monkeypatch.setenv("PDACSCREEN_PSEUDONYM_KEY", "phantom-ingest-test-key-0123")
    truth = pd.read_parquet(archive / "truth.parquet")
    compared, syntaxes, vendors = 0, set(), set()
    for row in truth.itertuples():
        peer = tmp_path / "dcm2niix" / str(row.study_index)
        peer.mkdir(parents=True)
        subprocess.run(
            [
                str(dcm2niix),
                "-b",
                "n",
                "-z",
                "n",
                "-f",
                "%j",
                "-o",
                str(peer),
                str(archive / row.study_dir),
            ],
            check=True,
            capture_output=True,
        )
        for uid, ts in (
            (row.noncontrast_series_uid, row.noncontrast_transfer_syntax),
            (row.contrast_series_uid, row.contrast_transfer_syntax),
        ):
            ours_path = tmp_path / f"{uid}.nii.gz"
            assert cli_main(["volume", uid, "--index", str(index), "--out", str(ours_path)]) == 0
            ours, ours_aff = read_nifti(ours_path)  # (z, y, x) HU, index -> LPS
            img = nib.load(str(peer / f"{uid}.nii"))
            theirs = np.asarray(img.get_fdata())  # (i, j, k) with scl_slope/inter applied
            m = np.linalg.inv(img.affine) @ nifti_affine(ours_aff)  # our (i,j,k) -> their (i,j,k)
            grid = np.indices(ours.shape[::-1]).reshape(3, -1).T
            q = grid @ m[:3, :3].T + m[:3, 3]
            qi = np.rint(q).astype(int)
            assert np.abs(q - qi).max() < 1e-3  # the same voxel centres in world coordinates
            assert sorted(theirs.shape) == sorted(ours.shape)
            mine = ours.transpose(2, 1, 0).reshape(-1)
            peer_vals = np.maximum(theirs[qi[:, 0], qi[:, 1], qi[:, 2]], -1024)
            np.testing.assert_array_equal(mine, peer_vals)
            compared += 1
            syntaxes.add(ts)
            vendors.add(row.manufacturer)
    assert compared == 2 * len(truth)
    assert len(syntaxes) >= 2 and len(vendors) >= 2
