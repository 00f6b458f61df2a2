"""body_mask on phantoms with known truth and against a plain full-resolution SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from pdacscreen.kernels import BodyBox, KernelInputError, NoBodyError, body_mask
from pdacscreen.kernels._backend import to_host
from pdacscreen.kernels.phantom import synthetic_ct
from pdacscreen.kernels.testing import backend_params

BACKENDS = backend_params()


@pytest.fixture(scope="module")
def phantom():
    return synthetic_ct(shape=(24, 128, 128), spacing=(2.5, 2.5, 2.5), noise_hu=15.0, seed=3)


def _bbox(mask):
    return tuple(
        slice(
            int(np.flatnonzero(mask.any(axis=ax))[0]),
            int(np.flatnonzero(mask.any(axis=ax))[-1]) + 1,
        )
        for ax in ((1, 2), (0, 2), (0, 1))
    )


def _reference(hu, threshold=-500.0):
    """Threshold, largest 26-connected component, holes filled slice by slice (full resolution)."""
    lab, n = ndi.label(hu > threshold, structure=np.ones((3, 3, 3)))
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return np.stack([ndi.binary_fill_holes(s) for s in body])


@pytest.mark.parametrize("backend", BACKENDS)
def test_phantom_body_without_table(backend, phantom):
    b = body_mask(phantom.hu, spacing=phantom.spacing, backend=backend)
    assert isinstance(b, BodyBox)
    m = to_host(b.mask)
    truth = phantom.truth["body"]
    assert m.dtype == bool and m.shape == phantom.hu.shape
    assert (m & truth).sum() / truth.sum() > 0.995  # gas pockets inside are filled
    assert (m & ~truth).sum() / truth.sum() < 0.005
    assert not (m & phantom.truth["table"]).any()
    assert b.box == _bbox(truth) == _bbox(m)
    assert b.voxels == int(m.sum()) and b.slices == 24
    # agrees with the plain full-resolution reference (table is not touching here)
    ref = _reference(phantom.hu)
    assert (m & ref).sum() / (m | ref).sum() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_touching_the_body_is_cut_off(backend, phantom):
    hu = phantom.hu.copy()
    table = phantom.truth["table"]
    back = int(np.flatnonzero(phantom.truth["body"][0].any(axis=1))[-1])
    top = int(np.flatnonzero(table[0].any(axis=1))[0])
    hu[:, back : top + 1, 60:62] = 30  # a 5 mm strap of soft tissue density: body touches table
    ref = _reference(hu)
    assert (ref & table).any()  # the plain reference keeps the table
    m = to_host(body_mask(hu, spacing=phantom.spacing, backend=backend).mask)
    assert not (m & table).any()
    truth = phantom.truth["body"]
    assert (m & truth).sum() / truth.sum() > 0.995


@pytest.mark.parametrize("backend", BACKENDS)
def test_body_in_some_slices_and_box_affine(backend):
    p = synthetic_ct(shape=(20, 64, 64), spacing=(3.0, 5.0, 5.0), body_slices=(4, 15), noise_hu=5)
    b = body_mask(p.hu, spacing=p.spacing, backend=backend)
    assert b.box[0] == slice(4, 15) and b.slices == 11
    aff = b.box_affine(p.affine)
    start = np.array([s.start for s in b.box], float)
    np.testing.assert_allclose(aff[:3, 3], p.affine[:3, :3] @ start + p.affine[:3, 3])
    np.testing.assert_allclose(aff[:3, :3], p.affine[:3, :3])
    assert b.shape == tuple(s.stop - s.start for s in b.box)


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_in_stored_units(backend, phantom):
    stored = (phantom.hu.astype(np.int32) + 1024).clip(0).astype(np.uint16)
    a = body_mask(phantom.hu, spacing=phantom.spacing, backend=backend)
    b = body_mask(stored, threshold=-500.0 + 1024, spacing=phantom.spacing, backend=backend)
    np.testing.assert_array_equal(to_host(a.mask), to_host(b.mask))
    assert a.box == b.box


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    one = body_mask(np.full((1, 1, 1), 40, np.int16), backend=backend)
    assert one.box == (slice(0, 1),) * 3 and one.voxels == 1
    sl = np.full((1, 20, 30), -1000, np.int16)
    sl[0, 5:15, 8:25] = 40
    sl[0, 9:11, 12:14] = -1000  # inner air: filled
    b = body_mask(sl, backend=backend)
    assert b.box == (slice(0, 1), slice(5, 15), slice(8, 25))
    assert b.voxels == 10 * 17
    # very anisotropic: 2 slices of 0.5 mm pixels with 10 mm slice distance
    p = synthetic_ct(shape=(2, 200, 180), spacing=(10.0, 1.6, 1.8), noise_hu=5.0)
    m = to_host(body_mask(p.hu, spacing=p.spacing, backend=backend).mask)
    assert (m & p.truth["body"]).sum() / p.truth["body"].sum() > 0.995
    assert not (m & p.truth["table"]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_body_is_a_typed_error(backend):
    air = np.full((3, 16, 16), -1000, np.int16)
    air[:, 0, 0] = -3024
    with pytest.raises(NoBodyError) as e:
        body_mask(air, backend=backend)
    assert e.value.code == "no_body"


def test_bad_arguments():
    with pytest.raises(KernelInputError, match="spacing"):
        body_mask(np.zeros((2, 2, 2)), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(KernelInputError, match="threshold"):
        body_mask(np.zeros((2, 2, 2)), threshold=float("nan"))
    with pytest.raises(KernelInputError, match="hu"):
        body_mask(np.zeros((2, 2)))
