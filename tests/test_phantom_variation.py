"""Anatomy and appearance randomisation of training phantoms (io/phantom/variation.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.phantom.tissue import N_TISSUES
from pdacscreen.io.phantom.variation import Variation, draw_variation
from pdacscreen.io.types import voxel_to_world

FINDINGS = ("lesion_type", "lesion_diameter_mm", "lesion_location", "fatty_pancreas", "label")


def _identity(**kw) -> Variation:
    base = dict(
        pancreas_scale=(1.0, 1.0, 1.0),
        pancreas_rot_z_deg=0.0,
        pancreas_rot_y_deg=0.0,
        pancreas_shift_mm=(0.0, 0.0, 0.0),
        tail_rise_mm=0.0,
        point_jitter_mm=(0.0,) * 27,
        thickness=1.0,
        fat_mm=20.0,
        muscle_mm=10.0,
        texture_factor=1.0,
        lobulation_factor=1.0,
        tissue_offsets_hu=(0.0,) * N_TISSUES,
        global_offset_hu=0.0,
        grain_px=1.0,
    )
    return Variation(**{**base, **kw})


def test_warp_is_a_pose_about_the_neck():
    neck = np.array([-4.0, -10.0, 6.0])
    pts = np.array([[-40.0, -20.0, -26.0], [26.0, -14.0, 12.0], neck])
    np.testing.assert_allclose(_identity().warp(pts, neck), pts)
    v = _identity(pancreas_scale=(1.2, 0.9, 1.1), pancreas_rot_z_deg=15.0)
    out = v.warp(pts, neck)
    np.testing.assert_allclose(out[2], neck)  # the neck is the fixed point
    # a rotation about z keeps the (scaled) distance to the neck
    d_scaled = np.linalg.norm((pts[:2] - neck) * [1.2, 0.9, 1.1], axis=1)
    np.testing.assert_allclose(np.linalg.norm(out[:2] - neck, axis=1), d_scaled, rtol=1e-12)
    shifted = _identity(pancreas_shift_mm=(5.0, -3.0, 2.0)).warp(pts, neck)
    np.testing.assert_allclose(shifted - pts, np.broadcast_to([5.0, -3.0, 2.0], pts.shape))


def test_draws_stay_in_their_documented_ranges():
    rng = np.random.default_rng(4)
    for _ in range(200):
        v = draw_variation(rng, N_TISSUES)
        assert all(0.7 <= s <= 1.4 for s in v.pancreas_scale)
        assert 3.0 <= v.fat_mm <= 80.0 and 0.7 <= v.thickness <= 1.25
        assert 0.0 <= v.texture_factor <= 2.0 and 0.5 <= v.grain_px <= 2.5
        assert len(v.tissue_offsets_hu) == N_TISSUES and max(map(abs, v.tissue_offsets_hu)) <= 6
        assert len(v.point_jitter_mm) == 27


@pytest.mark.parametrize("seed", [3, 11])
def test_a_varied_subject_keeps_its_findings_and_consistent_labels(seed):
    plain = make_subject(seed, matrix=128, pdac=True)
    again = make_subject(seed, matrix=128, pdac=True, vary=False)
    np.testing.assert_array_equal(plain.noncontrast, again.noncontrast)  # vary=False: unchanged
    assert "varied" not in plain.truth
    varied = make_subject(seed, matrix=128, pdac=True, vary=True)
    assert varied.truth["varied"] is True
    assert {k: varied.truth[k] for k in FINDINGS} == {k: plain.truth[k] for k in FINDINGS}
    # the gland moved or changed shape: the label maps differ, and it is still soft tissue
    a, b = plain.labels >= 1, varied.labels >= 1
    assert a.sum() > 0 and b.sum() > 0
    assert (a & b).sum() / (a | b).sum() < 0.9
    gland_hu = np.median(varied.noncontrast[varied.labels == 1])
    assert -60 < gland_hu < 90
    # the lesion is labelled and its truth centre lies in a lesion voxel
    assert (varied.labels == 2).sum() > 0
    idx = np.argwhere(varied.labels == 2).astype(float)
    xyz = voxel_to_world(varied.affine, idx)
    centre = np.array([varied.truth[f"lesion_center_{c}_mm"] for c in "xyz"])
    assert np.min(np.linalg.norm(xyz - centre, axis=1)) <= max(varied.spacing)
    # the same seed varies the same way
    np.testing.assert_array_equal(
        make_subject(seed, matrix=128, pdac=True, vary=True).noncontrast, varied.noncontrast
    )
