"""Sliding window: plan coverage, Gaussian blending against a naive reference, extras by max."""

from __future__ import annotations

import numpy as np
import pytest

from pdacscreen.engine.errors import EngineInputError
from pdacscreen.engine.tiling import gaussian_importance, plan_tiles, sliding_window


def naive_blend(image, patch, predict, overlap):
    """Straightforward reference: every window, full-size weight maps, no padding tricks."""
    c, z, y, x = image.shape
    shape = tuple(max(s, p) for s, p in zip((z, y, x), patch, strict=True))
    padded = np.zeros((c, *shape), np.float32)
    padded[:, :z, :y, :x] = image
    w = gaussian_importance(patch)
    num = None
    den = np.zeros(shape, np.float64)
    plan = plan_tiles((z, y, x), patch=patch, overlap=overlap)
    for s in plan.starts:
        sl = tuple(slice(a, a + p) for a, p in zip(s, patch, strict=True))
        out = predict(padded[(slice(None), *sl)][None])[0]
        if num is None:
            num = np.zeros((out.shape[0], *shape), np.float64)
        num[(slice(None), *sl)] += out * w
        den[sl] += w
    return (num / den)[:, :z, :y, :x]


def local_predict(batch):
    """A translation-equivariant 'network' (pointwise), so windows must blend back exactly."""
    return np.concatenate([batch * 2.0 + 1.0, np.tanh(batch)], axis=1)


def position_predict(batch):
    """A window-dependent output (depends on the patch mean), to exercise the weighting."""
    m = batch.mean(axis=(1, 2, 3, 4), keepdims=True)
    return np.broadcast_to(m, batch.shape).copy()


@pytest.mark.parametrize("shape", [(20, 30, 41), (8, 9, 10), (16, 16, 16), (5, 40, 3)])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_matches_naive_reference(shape, overlap):
    rng = np.random.default_rng(sum(shape))
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    patch = (8, 12, 16)
    for fn in (local_predict, position_predict):
        got = sliding_window(image, patch=patch, predict=fn, overlap=overlap, batch_size=3)
        ref = naive_blend(image, patch, fn, overlap)
        assert got["seg"].shape == ref.shape
        np.testing.assert_allclose(got["seg"], ref, rtol=1e-5, atol=1e-5)
    exact = sliding_window(image, patch=patch, predict=local_predict, overlap=overlap)["seg"]
    np.testing.assert_allclose(exact, local_predict(image[None])[0], rtol=1e-5, atol=1e-5)


def test_plan_covers_every_voxel_and_ends_at_border():
    plan = plan_tiles((50, 33, 7), patch=(16, 16, 8), overlap=0.5)
    cover = np.zeros(plan.shape, bool)
    for z, y, x in plan.starts:
        cover[z : z + 16, y : y + 16, x : x + 8] = True
    assert cover.all()
    assert max(s[0] for s in plan.starts) == 50 - 16
    assert plan.shape == (50, 33, 8)
    assert plan.count == 6 * 4 * 1  # ceil((50-16)/8)+1, ceil((33-16)/8)+1, 1


def test_extras_are_max_over_windows():
    image = np.zeros((1, 8, 8, 32), np.float32)
    image[0, :, :, 28:] = 5.0

    def predict(batch):
        return {"seg": batch, "cls": batch.max(axis=(1, 2, 3, 4))[:, None]}

    out = sliding_window(image, patch=(8, 8, 8), predict=predict, overlap=0.0)
    assert out["cls"].shape == (1,) and out["cls"][0] == 5.0
    assert int(out["windows"]) == 4


def test_bad_arguments_name_the_value():
    with pytest.raises(EngineInputError, match="overlap must be >= 0 and < 1, got 1.2"):
        plan_tiles((8, 8, 8), patch=(4, 4, 4), overlap=1.2)
    with pytest.raises(EngineInputError, match="batch_size"):
        sliding_window(np.zeros((8, 8, 8)), patch=(4, 4, 4), predict=local_predict, batch_size=0)


def test_gaussian_peak_and_floor():
    w = gaussian_importance((9, 9, 9))
    assert w[4, 4, 4] == pytest.approx(1.0)
    assert w.min() > 0 and w[0, 0, 0] < w[4, 4, 0] < w[4, 4, 4]
