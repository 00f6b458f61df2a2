"""to_model_input against the literal NumPy float64 formula, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from pdacscreen.kernels import KernelInputError, to_model_input
from pdacscreen.kernels._backend import to_host
from pdacscreen.kernels.testing import assert_close, backend_params

BACKENDS = backend_params()


def reference(stored, *, slope, intercept, window, mean, std, dtype):
    hu = stored.astype(np.float64) * slope + intercept
    return ((np.clip(hu, *window) - mean) / std).astype(dtype)


def _random(shape, dtype, rng):
    if np.dtype(dtype).kind == "f":
        return (rng.normal(0, 400, size=shape)).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 5000)
    return rng.integers(lo, hi, size=shape).astype(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", ["int16", "uint16", "int32", "float32", "float64"])
@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
def test_matches_formula(backend, in_dtype, out_dtype):
    rng = np.random.default_rng(7)
    x = _random((5, 17, 23), in_dtype, rng)
    kw = dict(slope=1.5, intercept=-1024.0, window=(-160.0, 240.0), mean=40.0, std=80.0)
    if in_dtype == "uint16":
        kw["intercept"] = -2048.0
    y = to_model_input(x, dtype=out_dtype, backend=backend, **kw)
    assert y.dtype == np.dtype(out_dtype) and y.shape == x.shape
    ref = reference(x, dtype=np.float64, **kw)
    assert_close(y, ref, dtype=out_dtype, scale=3.0)
    # The window is hit on both sides: the test covers clipping, not just the linear part.
    host = to_host(y).astype(np.float64)
    assert host.min() == pytest.approx((-160 - 40) / 80, abs=1e-3)
    assert host.max() == pytest.approx((240 - 40) / 80, abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 9, 9), (2, 1, 700), (3, 300, 300)])
def test_edge_shapes_and_several_blocks(backend, shape):
    # (3, 300, 300) has 270,000 elements: more than one 262,144-element block with a remainder.
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = _random(shape, "int16", rng)
    y = to_model_input(x, window=(-1000.0, 1000.0), mean=-24.0, std=300.0, backend=backend)
    ref = reference(
        x, slope=1.0, intercept=0.0, window=(-1000, 1000), mean=-24.0, std=300.0, dtype=np.float64
    )
    assert_close(y, ref, scale=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_view_and_nan(backend):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 300, size=(6, 8, 10)).astype(np.float32)
    x[2, 3, 4] = np.nan
    view = x.transpose(2, 0, 1)[::2]
    y = to_host(to_model_input(view, backend=backend))
    ref = reference(
        view, slope=1.0, intercept=0.0, window=(-160, 240), mean=0.0, std=1.0, dtype=np.float64
    )
    assert np.isnan(y).sum() == np.isnan(ref).sum() == np.isnan(view).sum()
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(y[ok], ref[ok], rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"std": 0.0}, "std"),
        ({"window": (240.0, -160.0)}, "window"),
        ({"dtype": "int16"}, "dtype"),
        ({"slope": 0.0}, "slope"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(KernelInputError, match=field) as e:
        to_model_input(np.zeros((2, 2, 2), np.int16), **kwargs)
    assert e.value.code == "bad_input"


def test_negative_slope_is_windowed_in_hu():
    x = np.array([[[-100, 0, 100, 300]]], dtype=np.int16)
    y = to_model_input(x, slope=-1.0, intercept=0.0, window=(-160.0, 240.0), backend="numpy")
    np.testing.assert_allclose(y, [[[100.0, 0.0, -100.0, -160.0]]])
