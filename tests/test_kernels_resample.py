"""resample / crop_resample against scipy.ndimage and plain loops; world positions are kept."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from pdacscreen.kernels import KernelInputError, crop_resample, resample
from pdacscreen.kernels._backend import to_host
from pdacscreen.kernels.resample import AA_MIN_FACTOR, _apply_banded, _apply_dense, axis_operator
from pdacscreen.kernels.testing import assert_close, backend_params

BACKENDS = backend_params()


def _affine(spacing, *, oblique=False, seed=0, origin=(10.0, -20.0, 30.0)):
    rot = np.eye(3)
    if oblique:
        q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
        rot = q * np.sign(np.diag(r))  # a rotation or a rotation with a flip
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing, float)[None, :]
    aff[:3, 3] = origin
    return aff


def _zoom_ref(a, out_shape, sigma=None):
    x = a.astype(np.float32)
    if sigma is not None and any(s > 0 for s in sigma):
        x = ndi.gaussian_filter(x, sigma, mode="nearest", truncate=4.0)
    return ndi.zoom(
        x, np.array(out_shape) / np.array(a.shape), order=1, grid_mode=True, mode="nearest"
    )


def _aa_sigma(in_shape, out_shape):
    """scikit-image's rule on axes downsampled by more than AA_MIN_FACTOR (the module's choice)."""
    steps = np.array(in_shape) / np.array(out_shape)
    return [(f - 1) / 2 if f > AA_MIN_FACTOR else 0.0 for f in steps]


def _world(aff, kji):
    return kji @ aff[:3, :3].T + aff[:3, 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, spacing, target, dtype",
    [
        ((9, 20, 24), (2.0, 0.7, 0.9), (1.0, 1.0, 1.0), "float32"),
        ((6, 16, 17), (1.0, 1.0, 1.0), (0.6, 1.3, 0.8), "int16"),
        ((12, 10, 30), (0.8, 1.2, 0.5), 1.0, "float64"),
    ],
)
def test_trilinear_matches_scipy_zoom(backend, shape, spacing, target, dtype):
    rng = np.random.default_rng(11)
    a = (rng.normal(size=shape) * 300).astype(dtype)
    out, out_aff = resample(a, _affine(spacing), target, backend=backend)
    t = np.broadcast_to(np.asarray(target, float), (3,))
    expect_shape = tuple(
        max(1, round(n * s / tt)) for n, s, tt in zip(shape, spacing, t, strict=True)
    )
    assert out.shape == expect_shape and out.dtype == np.float32
    assert_close(out, _zoom_ref(a, expect_shape, _aa_sigma(shape, expect_shape)), scale=300 * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_antialias_matches_gaussian_then_zoom(backend):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(24, 40, 36)).astype(np.float32)
    spacing = (1.0, 0.7, 0.7)
    out, _ = resample(a, _affine(spacing), 4.0, backend=backend)
    sigma = _aa_sigma(a.shape, out.shape)
    assert all(s > 0 for s in sigma)
    assert_close(out, _zoom_ref(a, out.shape, sigma), scale=4)
    plain, _ = resample(a, _affine(spacing), 4.0, antialias=False, backend=backend)
    assert_close(plain, _zoom_ref(a, out.shape), scale=4)
    # Anti-aliasing removes most of the white noise's power that would fold into the coarse grid.
    assert float(np.std(to_host(out))) < 0.5 * float(np.std(to_host(plain)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_matches_loop_and_keeps_dtype(backend):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, size=(5, 7, 9)).astype(np.uint8)
    spacing, target = (2.0, 1.0, 1.0), (0.7, 1.6, 2.9)
    out, _ = resample(a, _affine(spacing), target, order=0, backend=backend)
    assert out.dtype == np.uint8
    ref = np.empty(out.shape, np.uint8)
    idx = []
    for c in range(3):
        n_in, n_out = a.shape[c], out.shape[c]
        pos = [(m + 0.5) * n_in / n_out - 0.5 for m in range(n_out)]
        idx.append([min(max(int(np.floor(p + 0.5)), 0), n_in - 1) for p in pos])
    for k, kk in enumerate(idx[0]):
        for j, jj in enumerate(idx[1]):
            for i, ii in enumerate(idx[2]):
                ref[k, j, i] = a[kk, jj, ii]
    np.testing.assert_array_equal(to_host(out), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", [(1.7, 2.9, 3.1), (0.9, 0.6, 0.75)], ids=["down", "up"])
def test_world_positions_are_kept(backend, target):
    """A linear function of world position stays the same function of the output's world grid."""
    shape, spacing = (20, 44, 44), (1.5, 0.8, 0.9)
    aff = _affine(spacing, oblique=True, seed=4)
    g = np.array([0.7, -1.3, 2.1])
    kji = np.stack(np.indices(shape), axis=-1).reshape(-1, 3).astype(float)
    a = (_world(aff, kji) @ g).reshape(shape).astype(np.float32)
    out, out_aff = resample(a, aff, target, backend=backend)
    out = to_host(out)
    # Same directions, the true spacing, and the same physical extent (voxel edges).
    n_in, n_out = np.array(shape), np.array(out.shape)
    sp_out = np.linalg.norm(out_aff[:3, :3], axis=0)
    np.testing.assert_allclose(sp_out, np.array(spacing) * n_in / n_out, rtol=1e-12)
    np.testing.assert_allclose(
        out_aff[:3, :3] / sp_out, aff[:3, :3] / np.array(spacing), atol=1e-12
    )
    for corner_in, corner_out in (((-0.5,) * 3, (-0.5,) * 3), (n_in - 0.5, n_out - 0.5)):
        np.testing.assert_allclose(
            _world(out_aff, np.array(corner_out)),
            _world(aff, np.array(corner_in, float)),
            atol=1e-9,
        )
    # Away from the edges (clamping, filter support) values follow the same function of world.
    okji = np.stack(np.indices(out.shape), axis=-1).reshape(-1, 3).astype(float)
    w = _world(out_aff, okji)
    src = (w - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    margin = 1 + 4 * np.maximum((np.array(target) / np.array(spacing) - 1) / 2, 0) + 1
    inner = np.all((src >= margin) & (src <= n_in - 1 - margin), axis=1)
    assert inner.sum() > 20
    np.testing.assert_allclose(out.reshape(-1)[inner], (w @ g)[inner], rtol=1e-5, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_equals_resample_then_crop(backend):
    rng = np.random.default_rng(9)
    a = rng.normal(size=(20, 30, 26)).astype(np.float32)
    aff = _affine((1.2, 0.7, 0.8))
    box = (slice(3, 17), slice(5, 22), slice(0, 11))
    for target in (1.0, 3.5):
        full, full_aff = resample(a, aff, target, backend=backend)
        part, part_aff = resample(a, aff, target, crop=box, backend=backend)
        off = np.linalg.solve(full_aff[:3, :3], part_aff[:3, 3] - full_aff[:3, 3])
        assert np.allclose(off, np.round(off), atol=1e-9)
        o = np.round(off).astype(int)
        sub = to_host(full)[
            o[0] : o[0] + part.shape[0], o[1] : o[1] + part.shape[1], o[2] : o[2] + part.shape[2]
        ]
        assert_close(part, sub, scale=4)
        np.testing.assert_allclose(part_aff[:3, :3], full_aff[:3, :3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("oblique", [False, True])
def test_crop_resample_matches_map_coordinates(backend, oblique):
    rng = np.random.default_rng(13)
    a = rng.normal(size=(16, 22, 25)).astype(np.float32) * 100
    aff = _affine((2.0, 0.8, 0.7), oblique=oblique, seed=1)
    centre = _world(aff, np.array([7.5, 10.0, 12.0]))
    box_min, box_max = centre - [30.0, 14.0, 22.0], centre + [6.0, 25.0, 20.0]  # partly outside
    out, out_aff = crop_resample(
        a,
        aff,
        box_min=box_max,
        box_max=box_min,  # swapped corners
        target_spacing=(1.1, 0.9, 1.3),
        antialias=False,
        fill=-999.0,
        backend=backend,
    )
    np.testing.assert_allclose(np.linalg.norm(out_aff[:3, :3], axis=0), [1.1, 0.9, 1.3])
    np.testing.assert_allclose(
        out_aff[:3, :3] / [1.1, 0.9, 1.3], aff[:3, :3] / [2.0, 0.8, 0.7], atol=1e-12
    )
    okji = np.stack(np.indices(out.shape), axis=-1).reshape(-1, 3).astype(float)
    src = (_world(out_aff, okji) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    ref = ndi.map_coordinates(a, src.T, order=1, mode="nearest")
    inside = np.all((src >= -0.5) & (src <= np.array(a.shape) - 0.5), axis=1)
    ref[~inside] = -999.0
    assert 0 < inside.sum() < inside.size  # the box does leave the volume
    assert_close(out, ref.reshape(out.shape), scale=400)
    if not oblique:  # the grid is centred on the box
        grid_centre = _world(out_aff, (np.array(out.shape) - 1) / 2.0)
        np.testing.assert_allclose(grid_centre, (box_min + box_max) / 2, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_resample_antialiased_world_function(backend):
    shape, spacing = (20, 40, 40), (1.0, 0.6, 0.6)
    aff = _affine(spacing, oblique=True, seed=8)
    g = np.array([0.2, 0.5, -0.9])
    kji = np.stack(np.indices(shape), axis=-1).reshape(-1, 3).astype(float)
    a = (_world(aff, kji) @ g).reshape(shape).astype(np.float32)
    c = _world(aff, (np.array(shape) - 1) / 2.0)
    out, out_aff = crop_resample(
        a, aff, box_min=c - 5, box_max=c + 5, target_spacing=2.5, backend=backend
    )
    w = _world(out_aff, np.stack(np.indices(out.shape), axis=-1).reshape(-1, 3).astype(float))
    np.testing.assert_allclose(to_host(out).reshape(-1), w @ g, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    one = np.full((1, 1, 1), 42, np.int16)
    out, aff = resample(one, _affine((1.0, 1.0, 1.0)), 2.0, backend=backend)
    assert out.shape == (1, 1, 1) and float(to_host(out)[0, 0, 0]) == 42.0
    np.testing.assert_allclose(aff, _affine((1.0, 1.0, 1.0)))  # one voxel keeps its extent
    rng = np.random.default_rng(1)
    sl = rng.normal(size=(1, 12, 12)).astype(np.float32)
    out, aff = resample(sl, _affine((5.0, 1.0, 1.0)), (1.0, 1.0, 1.0), backend=backend)
    assert out.shape == (5, 12, 12)
    for k in range(5):
        assert_close(out[k], sl[0], scale=4)
    np.testing.assert_allclose(
        _world(aff, np.array([2.0, 0, 0])), _world(_affine((5, 1, 1)), np.zeros(3))
    )
    aniso = rng.normal(size=(4, 64, 64)).astype(np.float32)
    out, _ = resample(aniso, _affine((8.0, 0.5, 0.5)), 2.0, backend=backend)
    sigma = _aa_sigma(aniso.shape, out.shape)
    assert out.shape == (16, 16, 16) and sigma[0] == 0 and sigma[1] > 0
    assert_close(out, _zoom_ref(aniso, out.shape, sigma), scale=4)


def test_dense_device_path_equals_banded_path():
    """The CuPy path's dense products (run here with NumPy) agree with the NumPy banded path."""
    rng = np.random.default_rng(21)
    a = rng.normal(size=(11, 37, 29)).astype(np.float32)
    ops = []
    for n, n_out, sigma in ((11, 23, 0.0), (37, 9, 1.6), (29, 40, 0.0)):
        pos = (np.arange(n_out) + 0.5) * n / n_out - 0.5
        ops.append(axis_operator(n, pos, order=1, sigma=sigma))
    np.testing.assert_allclose(
        _apply_dense(np, a, ops), _apply_banded(a, ops), rtol=1e-5, atol=1e-5
    )
    # and both equal the 3-D operator written as one einsum in float64
    ref = np.einsum("ai,bj,ck,ijk->abc", *ops, a.astype(np.float64))
    np.testing.assert_allclose(_apply_banded(a, ops), ref, rtol=1e-5, atol=1e-5)


def test_axis_operator_rows_sum_to_one():
    pos = np.linspace(-0.5, 9.5, 17)
    for order, sigma in ((0, 0.0), (1, 0.0), (1, 2.3)):
        w = axis_operator(10, pos, order=order, sigma=sigma)
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
        assert (w >= 0).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"order": 3}, "order"),
        ({"target_spacing": 0.0}, "target_spacing"),
        ({"target_spacing": (1.0, -1.0, 1.0)}, "target_spacing"),
        ({"fill": np.nan}, "fill"),
        ({"crop": (slice(0, 2), slice(3, 3), slice(0, 1))}, "crop"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"target_spacing": 1.0, **kwargs}
    with pytest.raises(KernelInputError, match=field) as e:
        resample(np.zeros((4, 4, 4), np.float32), np.eye(4), args.pop("target_spacing"), **args)
    assert e.value.code == "bad_input"
    with pytest.raises(KernelInputError, match="3-D"):
        resample(np.zeros((4, 4), np.float32), np.eye(4), 1.0)
    with pytest.raises(KernelInputError, match="affine"):
        resample(np.zeros((4, 4, 4), np.float32), np.zeros((4, 4)), 1.0)
