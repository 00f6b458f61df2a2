"""The second renderer (tests/second_renderer, issue 12): valid archives, consistent truth, d'."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pdacscreen.engine.training.dataset import archive_records, load_study
from pdacscreen.io.phantom.observer import QUANTISATION_VAR, generator_nps, npw_dprime
from pdacscreen.io.types import world_to_voxel
from tests.second_renderer.archive import make_study, study_lesion_type, write_archive
from tests.second_renderer.render import Acquisition, add_noise, noise_nps

SEED = 5
MATRIX = 96


def _indices(kinds: tuple[str, ...]) -> list[int]:
    """The first study index of each lesion type of archive SEED."""
    out = []
    for kind in kinds:
        out.append(next(k for k in range(200) if study_lesion_type(SEED, k) == kind))
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("second")
    for k in _indices(("pdac", "cyst", "none")):
        write_archive(out, studies=1, seed=SEED, matrix=MATRIX, start=k)
    return out


def test_archive_loads_with_the_engine_loader(archive):
    records = archive_records(archive)
    assert sorted(r.lesion_type for r in records) == ["cyst", "none", "pdac"]
    for rec in records:
        volume, label = load_study(rec)  # load_series on the DICOM files + the label map
        t = rec.truth
        assert volume.shape == label.shape
        assert volume.shape[1:] == (MATRIX, MATRIX)
        assert volume.spacing[0] == pytest.approx(t["slice_thickness_mm"])
        assert volume.spacing[2] == pytest.approx(t["pixel_spacing_mm"], abs=1e-3)
        assert (label >= 1).sum() > 50, "the gland must be in the series"
        # the image holds the gland: the parenchyma's mean HU is near the truth's calibration
        parenchyma = volume.array[label == 1]
        assert abs(float(parenchyma.mean()) - t["parenchyma_hu"]) < 12.0
        for col in ("noncontrast_series_uid", "study_dir", "lesion_dprime", "noise_hu"):
            assert col in t


def test_lesion_lies_in_the_gland_and_maps_to_the_grid(archive):
    for rec in archive_records(archive):
        volume, label = load_study(rec)
        t = rec.truth
        lesion = label == 2
        if rec.lesion_type == "none":
            assert not lesion.any() and np.isnan(t["lesion_dprime"])
            continue
        assert lesion.any()
        centre = np.array([t[f"lesion_center_{a}_mm"] for a in "xyz"])
        kji = world_to_voxel(volume.affine, centre)
        assert np.all(kji > -0.5) and np.all(kji < np.array(volume.shape) - 0.5)
        idx = np.argwhere(lesion)
        sp = np.array(volume.spacing)
        dist = np.sqrt((((idx - kji) * sp) ** 2).sum(axis=1))
        # the centre is in (or within a voxel of) the lesion, and the lesion is a compact blob
        assert dist.min() <= np.linalg.norm(sp)
        assert dist.max() <= 0.5 * t["lesion_diameter_mm"] * 1.6 * 1.6 + np.linalg.norm(sp)
        # every lesion voxel touches the gland or other lesion voxels adjacent to the gland
        touching = ndimage.binary_dilation(label == 1, iterations=2) & lesion
        assert touching.any()
        comps, n = ndimage.label(lesion | (label == 1))
        assert len(set(comps[lesion].tolist())) == 1
        assert t["lesion_dprime"] > 0


def test_dprime_of_a_uniform_sphere_in_white_noise_is_closed_form():
    z, y, x = np.mgrid[-12:13, -12:13, -12:13]
    sphere = (x**2 + y**2 + z**2) <= 7.5**2
    contrast, sigma = -15.0, 18.0
    s = contrast * sphere.astype(float)
    acq = Acquisition(
        gz=np.arange(3.0),
        gy=np.arange(3.0),
        gx=np.arange(3.0),
        thickness_mm=1.0,
        psf_sigma_mm=0.5,
        noise_kind="white",
        noise_hu=sigma,
        streak_px=0.0,
    )
    d = npw_dprime(s, nps=noise_nps(acq, s.shape[2]), white_var=QUANTISATION_VAR)
    expected = abs(contrast) * np.sqrt(sphere.sum()) / np.sqrt(sigma**2 + QUANTISATION_VAR)
    assert d == pytest.approx(expected, rel=1e-9)


def _acq(kind: str, shape=(16, 64, 128)) -> Acquisition:
    nz, ny, nx = shape
    return Acquisition(
        gz=np.arange(nz) * 3.0,
        gy=np.arange(ny) * 1.5,
        gx=np.arange(nx) * 1.5,
        thickness_mm=3.0,
        psf_sigma_mm=0.8,
        noise_kind=kind,
        noise_hu=15.0,
        streak_px=2.5,
    )


def test_streaky_noise_matches_its_spectrum_and_npw_dprime():
    acq = _acq("streaky")
    rng = np.random.default_rng(0)
    noise = add_noise(np.zeros((16, 64, 128), np.float32), acq, rng)
    assert float(noise.std()) == pytest.approx(15.0, rel=0.05)
    measured = (np.abs(np.fft.fft(noise.astype(np.float64), axis=2)) ** 2).mean(axis=(0, 1))
    measured /= noise.shape[2]
    model = noise_nps(acq, noise.shape[2])
    low, high = slice(1, 6), slice(40, 64)
    assert measured[low].mean() == pytest.approx(model[low].mean(), rel=0.15)
    assert measured[high].mean() < 0.05 * measured[low].mean()
    # Monte Carlo NPW d' for a small blob agrees with the spectral formula
    s = np.zeros((1, 16, 64))
    s[0, 6:10, 28:36] = -10.0
    t_absent = []
    for _ in range(600):
        n = add_noise(np.zeros((1, 16, 64), np.float32), acq, rng).astype(np.float64)
        t_absent.append(float((n * s).sum()))
    d_mc = float((s * s).sum()) / np.std(t_absent)
    d_formula = npw_dprime(s, nps=noise_nps(acq, 64))
    assert d_mc == pytest.approx(d_formula, rel=0.12)


def test_noise_spectrum_differs_from_the_project_generator():
    gen = generator_nps((64, 128), grain_px=1.0)  # the generator's isotropic correlated noise
    ratio_gen = gen[32, 0] / gen[0, 64]  # Nyquist in y vs Nyquist in x
    assert ratio_gen == pytest.approx(1.0, rel=0.2)
    assert gen[0, 64] < 0.1 * gen[0, 1]  # it falls off towards high frequency
    streak = np.broadcast_to(noise_nps(_acq("streaky"), 128), (64, 128))
    assert streak[32, 0] / streak[0, 64] > 100.0  # strongly anisotropic
    white = noise_nps(_acq("white"), 128)
    assert np.ndim(white) == 0 and white == pytest.approx(225.0)  # flat


def test_hu_calibration_is_offset_and_deterministic():
    _, t1 = make_study(SEED, 3, matrix=64)
    _, t2 = make_study(SEED, 3, matrix=64)
    assert t1["hu_offset"] == t2["hu_offset"] and t1["noise_hu"] == t2["noise_hu"]
    assert t1["lesion_type"] == t2["lesion_type"]
    offsets = [make_study(SEED, k, matrix=48)[1]["hu_offset"] for k in range(4)]
    assert all(3.0 <= abs(o) <= 8.0 for o in offsets)
