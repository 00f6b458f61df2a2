"""Blood pool, noise and z-coverage on phantoms with known truth and on the real CT fixture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdacscreen.io.types import world_to_voxel
from pdacscreen.kernels import (
    MeasurementError,
    blood_pool_hu,
    body_mask,
    find_blood_pool,
    noise_hu,
    z_coverage_mm,
)
from pdacscreen.kernels._backend import to_host
from pdacscreen.kernels.phantom import synthetic_ct
from pdacscreen.kernels.testing import backend_params

BACKENDS = backend_params()


def _inside(mask, affine, xyz):
    k = np.round(world_to_voxel(affine, np.asarray(xyz))).astype(int)
    return bool(mask[tuple(k)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "aorta, ivc",
    [(40.0, 40.0), (220.0, 130.0), (300.0, 45.0)],
    ids=["non-contrast", "portal", "arterial"],
)
def test_blood_pool_on_phantom(backend, aorta, ivc):
    p = synthetic_ct(
        shape=(24, 128, 128),
        spacing=(3.0, 2.5, 2.5),
        aorta_hu=aorta,
        ivc_hu=ivc,
        noise_hu=12.0,
        seed=1,
    )
    bp = find_blood_pool(p.hu, p.affine, backend=backend)
    assert bp.hu == pytest.approx(aorta, abs=4.0)
    assert _inside(p.truth["aorta"], p.affine, bp.centre_world)
    assert blood_pool_hu(p.hu, p.affine, backend=backend) == bp.hu


@pytest.mark.parametrize("backend", BACKENDS)
def test_blood_pool_any_orientation(backend):
    """Flipped left-right and stored sagittally (axes permuted): the same aorta is found."""
    p = synthetic_ct(shape=(20, 128, 128), spacing=(3.0, 2.5, 2.5), aorta_hu=45.0, noise_hu=10.0)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, p.hu.shape[2] - 1  # new i = (n - 1) - old i
    hu = p.hu[:, :, ::-1].transpose(2, 1, 0)  # (x, y, z) array order
    aff = (p.affine @ flip)[:, [2, 1, 0, 3]]
    bp = find_blood_pool(np.ascontiguousarray(hu), aff, backend=backend)
    assert bp.hu == pytest.approx(45.0, abs=4.0)
    assert _inside(p.truth["aorta"], p.affine, bp.centre_world)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_spine_is_a_typed_error(backend):
    p = synthetic_ct(shape=(8, 96, 96), spacing=(3.0, 3.3, 3.3), vertebra=False, noise_hu=5.0)
    with pytest.raises(MeasurementError) as e:
        find_blood_pool(p.hu, p.affine, backend=backend)
    assert e.value.code == "no_spine"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [6.0, 15.0, 30.0])
def test_noise_on_phantom(backend, sigma):
    p = synthetic_ct(shape=(12, 128, 128), spacing=(3.0, 2.5, 2.5), noise_hu=sigma, seed=2)
    assert noise_hu(p.hu, backend=backend) == pytest.approx(sigma, rel=0.08)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_needs_tissue(backend):
    air = np.full((4, 32, 32), -1000, np.int16)
    with pytest.raises(MeasurementError) as e:
        noise_hu(air, backend=backend)
    assert e.value.code == "no_homogeneous_tissue"


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_coverage(backend):
    p = synthetic_ct(shape=(30, 64, 64), spacing=(2.5, 5.0, 5.0), body_slices=(4, 26), noise_hu=5)
    assert z_coverage_mm(p.hu, p.affine, backend=backend) == pytest.approx(22 * 2.5)
    # the same volume stored with the slice axis last: coverage is still cranio-caudal
    aff = p.affine[:, [2, 1, 0, 3]]
    hu = np.ascontiguousarray(p.hu.transpose(2, 1, 0))
    assert z_coverage_mm(hu, aff, backend=backend) == pytest.approx(22 * 2.5)
    air = np.full((5, 16, 16), -1000, np.int16)
    assert z_coverage_mm(air, p.affine, backend=backend) == 0.0


def _load_real(real_ct):
    nib = pytest.importorskip("nibabel")
    d = real_ct / "totalsegmentator"
    img = nib.load(d / "example_ct_sm.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    affine = flip @ img.affine @ perm  # inverse of pdacscreen.io.types.nifti_affine
    hu = np.ascontiguousarray(np.asarray(img.dataobj).transpose(2, 1, 0))
    seg = np.asarray(nib.load(d / "example_seg.nii.gz").dataobj).transpose(2, 1, 0)
    classes = json.loads((d / "class_map_total_v2.json").read_text())
    return hu, affine, seg, {v: int(k) for k, v in classes.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_ct(backend, real_ct):
    hu, affine, seg, label = _load_real(real_ct)
    aorta = seg == label["aorta"]
    bp = find_blood_pool(hu, affine, backend=backend)
    assert _inside(aorta, affine, bp.centre_world)
    truth = float(np.median(hu[aorta]))
    assert bp.hu == pytest.approx(truth, abs=8.0)
    assert bp.hu < 70.0  # a non-contrast scan by the aortic attenuation rule
    assert 3.0 < noise_hu(hu, backend=backend) < 30.0
    assert z_coverage_mm(hu, affine, backend=backend) == pytest.approx(hu.shape[0] * 3.0)
    # the body mask holds (nearly) every segmented structure
    body = to_host(body_mask(hu, spacing=(3.0, 3.0, 3.0), backend=backend).mask)
    organs = seg > 0
    assert (body & organs).sum() / organs.sum() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    one = np.full((1, 1, 1), 40, np.int16)
    aff = np.eye(4)
    aff[:3, :3] = [[0.0, 0.0, 0.8], [0.0, 0.8, 0.0], [2.0, 0.0, 0.0]]  # axis 0 (k) along LPS z
    assert z_coverage_mm(one, aff, backend=backend) == pytest.approx(2.0)
    with pytest.raises(MeasurementError) as e:
        noise_hu(one, backend=backend)
    assert e.value.code == "no_homogeneous_tissue"
    with pytest.raises(MeasurementError) as e:
        find_blood_pool(one, aff, backend=backend)
    assert e.value.code == "no_spine"
    # one slice of a phantom: coverage is that slice, the aorta is still found
    p = synthetic_ct(shape=(1, 128, 128), spacing=(5.0, 2.5, 2.5), aorta_hu=50.0, noise_hu=8.0)
    assert z_coverage_mm(p.hu, p.affine, backend=backend) == pytest.approx(5.0)
    assert blood_pool_hu(p.hu, p.affine, backend=backend) == pytest.approx(50.0, abs=5.0)
