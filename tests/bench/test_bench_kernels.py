"""CPU preprocessing chain of pdacscreen.kernels against the obvious NumPy/SciPy chain.

Volume: a 512 x 512 x 300 synthetic CT (0.7 x 0.7 x 1.0 mm, stored uint16 with intercept -1024).
Chain: stored -> HU -> window (-160, 240) -> normalise (mean 40, std 80) -> body crop -> resample
to 1.0 mm and to 4.0 mm (anti-aliased).  Reference: float64 NumPy arithmetic, full-resolution
``scipy.ndimage.label`` + slice-wise ``binary_fill_holes`` for the body, ``scipy.ndimage.zoom(order=1,
grid_mode=True)`` (after ``gaussian_filter`` with the same sigma for 4 mm) on the whole volume, then
the crop.  Both chains run in the same process on the same volume; results must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
from baselines import best_of

from pdacscreen.kernels import body_mask, resample, to_model_input
from pdacscreen.kernels.phantom import synthetic_ct
from pdacscreen.kernels.resample import AA_MIN_FACTOR

SHAPE = (300, 512, 512)
SPACING = (1.0, 0.7, 0.7)
WINDOW, MEAN, STD = (-160.0, 240.0), 40.0, 80.0
SLOPE, INTERCEPT = 1.0, -1024.0


def _fast_chain(stored, affine):
    t = {}
    # Body mask on stored values: the HU threshold moved into stored units (no HU array made).
    t["body"], body = best_of(
        lambda: body_mask(
            stored, threshold=(-500.0 - INTERCEPT) / SLOPE, spacing=SPACING, backend="numpy"
        )
    )
    t["model_input"], x = best_of(
        lambda: to_model_input(
            stored,
            slope=SLOPE,
            intercept=INTERCEPT,
            window=WINDOW,
            mean=MEAN,
            std=STD,
            backend="numpy",
        )
    )
    t["resample_1mm"], r1 = best_of(
        lambda: resample(x, affine, 1.0, crop=body.box, backend="numpy")
    )
    t["resample_4mm"], r4 = best_of(
        lambda: resample(x, affine, 4.0, crop=body.box, backend="numpy")
    )
    return t, body, r1, r4


def _crop_rows(n_in, n_out, sl):
    """Output rows of the whole-volume grid whose centres fall in the input rows ``sl``."""
    step = n_in / n_out
    pos = (np.arange(n_out) + 0.5) * step - 0.5
    keep = np.flatnonzero((pos >= sl.start - 0.5) & (pos <= sl.stop - 0.5))
    return slice(int(keep[0]), int(keep[-1]) + 1)


def _reference_chain(stored, box):
    t = {}

    def hu_window():
        hu = stored * SLOPE + INTERCEPT
        return hu, ((np.clip(hu, *WINDOW) - MEAN) / STD).astype(np.float32)

    t["model_input"], (hu, x) = best_of(hu_window, repeats=1)

    def body():
        lab, n = ndi.label(hu > -500.0)
        largest = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        return np.stack([ndi.binary_fill_holes(s) for s in largest])

    t["body"], mask = best_of(body, repeats=1)

    def zoom(target):
        out_shape = [max(1, round(n * s / target)) for n, s in zip(SHAPE, SPACING, strict=True)]
        steps = np.array(SHAPE) / np.array(out_shape)
        sigma = [(f - 1) / 2 if f > AA_MIN_FACTOR else 0.0 for f in steps]
        y = ndi.gaussian_filter(x, sigma, mode="nearest") if any(sigma) else x
        z = ndi.zoom(
            y, np.array(out_shape) / np.array(SHAPE), order=1, grid_mode=True, mode="nearest"
        )
        return z[tuple(_crop_rows(SHAPE[c], out_shape[c], box[c]) for c in range(3))]

    t["resample_1mm"], r1 = best_of(lambda: zoom(1.0), repeats=1)
    t["resample_4mm"], r4 = best_of(lambda: zoom(4.0), repeats=1)
    return t, mask, r1, r4


@pytest.mark.bench
def test_bench_cpu_chain(request):
    if "bench" not in (request.config.option.markexpr or ""):
        pytest.skip("benchmark: run with -m bench (make bench)")
    p = synthetic_ct(shape=SHAPE, spacing=SPACING, noise_hu=12.0, seed=0)
    stored = (p.hu.astype(np.int32) - int(INTERCEPT)).clip(0, 65535).astype(np.uint16)
    fast_t, body, r1, r4 = _fast_chain(stored, p.affine)
    ref_t, ref_mask, ref1, ref4 = _reference_chain(stored, body.box)

    # Same results: identical grids, differences at float32 rounding level.
    assert r1[0].shape == ref1.shape and r4[0].shape == ref4.shape
    d1 = float(np.abs(r1[0] - ref1).max())
    d4 = float(np.abs(r4[0] - ref4).max())
    assert d1 < 1e-4 and d4 < 1e-4, (d1, d4)
    ref_box = tuple(
        slice(
            int(np.flatnonzero(ref_mask.any(axis=ax))[0]),
            int(np.flatnonzero(ref_mask.any(axis=ax))[-1]) + 1,
        )
        for ax in ((1, 2), (0, 2), (0, 1))
    )
    box_diff = max(
        abs(a.start - b.start) + abs(a.stop - b.stop)
        for a, b in zip(body.box, ref_box, strict=True)
    )
    iou = float((body.mask & ref_mask).sum() / (body.mask | ref_mask).sum())
    assert box_diff <= 2 and iou > 0.99, (body.box, ref_box, iou)

    for name in ("model_input", "body", "resample_1mm", "resample_4mm"):
        print(
            f"BENCH kernels_{name} ratio={ref_t[name] / fast_t[name]:.2f} "
            f"fast={fast_t[name]:.3f}s reference={ref_t[name]:.3f}s "
            f"(pdacscreen.kernels numpy vs numpy/scipy.ndimage, 512x512x300)"
        )
    total_fast, total_ref = sum(fast_t.values()), sum(ref_t.values())
    print(
        f"BENCH kernels_cpu_chain ratio={total_ref / total_fast:.2f} fast={total_fast:.3f}s "
        f"reference={total_ref:.3f}s (HU+window+normalise, body crop, resample to 1 mm and "
        f"4 mm of 512x512x300; max diff 1mm={d1:.1e} 4mm={d4:.1e}, body IoU={iou:.4f})"
    )
