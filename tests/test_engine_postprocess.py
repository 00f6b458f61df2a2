"""Postprocessing on synthetic probability maps: pancreas box, fallback, lesions, location."""

from __future__ import annotations

import numpy as np
import pytest

from pdacscreen.engine.postprocess import lesion_candidates, localise, organ_axis


def _aff(spacing=2.0, origin=(0.0, 0.0, 0.0)):
    """(k, j, i) -> (x, y, z) with k along z, j along y, i along x."""
    a = np.zeros((4, 4))
    a[0, 2] = a[1, 1] = a[2, 0] = spacing
    a[:3, 3] = origin
    a[3, 3] = 1.0
    return a


def test_box_contains_blob_with_margin_and_cap():
    prob = np.zeros((20, 30, 40), np.float32)
    prob[8:12, 10:16, 5:35] = 0.9  # voxel box z 8-11, y 10-15, x 5-34
    loc = localise(
        prob, _aff(4.0), threshold=0.5, min_ml=0.1, margin_mm=(8, 8, 8), max_box_mm=(500, 500, 60)
    )
    assert loc.found and not loc.cut_by_fov and loc.confidence == pytest.approx(0.9)
    # world x of voxels 5..34 at 4 mm: 18..138 mm (edges), +/- 8 mm margin, then capped to 60 mm
    assert loc.box_max[0] - loc.box_min[0] == pytest.approx(60.0)
    assert loc.box_min[2] == pytest.approx(8 * 4 - 2 - 8) and loc.box_max[2] == pytest.approx(
        11 * 4 + 2 + 8
    )
    assert loc.volume_ml == pytest.approx(4 * 6 * 30 * 64 / 1000)


def test_fallback_to_half_peak_and_not_found():
    prob = np.full((10, 10, 10), 0.05, np.float32)
    prob[0:3, 4:6, 4:6] = 0.4  # an unsure localiser touching the first slice
    loc = localise(
        prob, _aff(), threshold=0.5, min_ml=0.001, margin_mm=(0, 0, 0), max_box_mm=(99, 99, 99)
    )
    assert loc.found and loc.cut_by_fov and loc.confidence == pytest.approx(0.4)
    none = localise(
        np.zeros((5, 5, 5), np.float32),
        _aff(),
        threshold=0.5,
        min_ml=0.001,
        margin_mm=(0, 0, 0),
        max_box_mm=(9, 9, 9),
    )
    assert not none.found and np.isnan(none.box_min[0])


def test_lesions_sorted_measured_and_located():
    organ = np.zeros((10, 20, 60), bool)
    organ[3:7, 5:15, 2:58] = True
    lesion = np.zeros(organ.shape, np.float32)
    lesion[4:6, 8:12, 5:11] = 0.9  # near i = 2 (smallest x: the patient's right = head)
    lesion[4:6, 8:10, 50:52] = 0.8  # small one at the tail end
    lesion[0, 0, 0] = 0.9  # a single voxel, below min_ml
    found, mask = lesion_candidates(lesion, organ, _aff(2.0), threshold=0.5, min_ml=0.05)
    assert [len(found), int(mask.sum())] == [2, 2 * 4 * 6 + 2 * 2 * 2]
    big, small = found
    assert big.voxels == 48 and big.diameter_mm == pytest.approx(12.0)
    assert big.volume_ml == pytest.approx(48 * 8 / 1000) and big.peak == pytest.approx(0.9)
    assert (big.location, small.location) == ("head", "tail")
    assert organ_axis(organ, _aff()).axis[0] > 0.99  # long axis along x, toward patient left


def test_pancreas_scores_ignore_what_lies_outside_the_gland():
    from pdacscreen.engine.postprocess import lesion_candidates, pancreas_scores

    aff = np.diag([2.0, 1.0, 1.0, 1.0])  # (dz, dy, dx) = 2, 1, 1 mm
    organ = np.zeros((20, 40, 40), bool)
    organ[5:15, 10:20, 10:30] = True
    prob = np.zeros(organ.shape, np.float32)
    prob[8:11, 25:30, 30:35] = 0.97  # a hot blob 5+ mm outside the gland (bowel, vessel)
    lesions, labels = lesion_candidates(
        prob, organ, aff, threshold=0.5, min_ml=0.0, return_labels=True
    )
    assert len(lesions) == 1 and labels.max() == lesions[0].label == 1
    s = pancreas_scores(prob, organ, lesions, labels, aff, rim_mm=3.0)
    assert s == {
        "pancreas_peak": 0.0,
        "pancreas_topk": 0.0,
        "candidate_peak": 0.0,
        "candidate_ml": 0.0,
    }
    # the same blob inside the gland raises every score, and more evidence never lowers them
    prob[8:11, 12:15, 15:18] = 0.6
    previous = None
    for p in (0.6, 0.8, 0.95):
        prob[9, 13, 16] = p
        lesions, labels = lesion_candidates(
            prob, organ, aff, threshold=0.5, min_ml=0.0, return_labels=True
        )
        s = pancreas_scores(prob, organ, lesions, labels, aff, rim_mm=3.0)
        assert s["pancreas_peak"] == pytest.approx(p) and s["candidate_peak"] == pytest.approx(p)
        assert 0.6 - 1e-6 <= s["pancreas_topk"] <= p + 1e-6 and s["candidate_ml"] == pytest.approx(
            27 * 2 / 1000
        )
        if previous is not None:
            assert all(s[k] >= previous[k] for k in s)
        previous = s


# ---------------------------------------------------------------- partial localisation QC


def _tube(shape, affine, *, x_range, radius_mm, centre_yz=(60.0, 60.0)):
    """A synthetic gland: a tube along world x (mm range ``x_range``) sampled on a grid."""
    idx = np.indices(shape).reshape(3, -1).T.astype(float)
    xyz = idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    inside = (xyz[:, 0] >= x_range[0]) & (xyz[:, 0] <= x_range[1])
    inside &= (xyz[:, 1] - centre_yz[0]) ** 2 + (xyz[:, 2] - centre_yz[1]) ** 2 <= radius_mm**2
    return inside.reshape(shape)


GLAND_X = (40.0, 190.0)  # a 150 mm gland along x (patient right -> left)


def _check(prob, *, radius_mm=12.0):
    """localise on a 6 mm stage-1 grid, then the stage-2 view of the true gland in that box."""
    from pdacscreen.engine.postprocess import (
        LocalisationQC,
        crop_faces_touched,
        gland_length_mm,
        partial_localisation,
    )

    loc = localise(
        prob,
        _aff(6.0),
        threshold=0.5,
        min_ml=1.0,
        margin_mm=(20, 20, 20),
        max_box_mm=(160, 160, 240),
    )
    # the crop on a 2 mm grid over the box, with the *whole* true gland drawn in it
    lo, hi = np.array(loc.box_min), np.array(loc.box_max)
    shape = tuple(int(v) for v in np.floor((hi - lo)[::-1] / 2.0) + 1)
    caff = _aff(2.0, origin=tuple(lo))
    organ = _tube(shape, caff, x_range=GLAND_X, radius_mm=radius_mm)
    faces = crop_faces_touched(organ, caff, min_voxels=LocalisationQC().min_touch_voxels)
    reason = partial_localisation(
        stage1_length_mm=loc.length_mm,
        outside_fraction=loc.outside_fraction,
        gland_length_mm=gland_length_mm(organ, caff),
        open_faces=tuple(faces),
        qc=LocalisationQC(),
    )
    return loc, faces, reason


def test_whole_gland_box_is_not_flagged_truncated_one_is():
    shape = (24, 24, 40)  # 144 x 144 x 240 mm at 6 mm
    whole = _tube(shape, _aff(6.0), x_range=GLAND_X, radius_mm=12.0).astype(np.float32) * 0.9
    loc, faces, reason = _check(whole)
    assert loc.found and 140.0 <= loc.length_mm <= 165.0 and loc.outside_fraction == 0.0
    assert faces == {} and reason == ""
    # stage 1 sees only the first 60 mm of the same gland (the rest below threshold)
    part = whole.copy()
    part[:, :, 17:] = 0.3  # x >= 102 mm: probability 0.3, above half the threshold
    loc, faces, reason = _check(part)
    assert loc.found and loc.length_mm < 80.0
    assert "x+" in faces and "x-" not in faces  # the gland goes on toward the tail
    assert "stage-2 gland reaches crop face x+" in reason
    assert loc.outside_fraction > 0.5 and "stage-1 pancreas probability outside" in reason


def test_atrophic_gland_is_not_flagged_short_one_is():
    from pdacscreen.engine.postprocess import LocalisationQC, partial_localisation

    shape = (24, 24, 40)
    thin = _tube(shape, _aff(6.0), x_range=GLAND_X, radius_mm=6.0).astype(np.float32) * 0.9
    loc, faces, reason = _check(thin, radius_mm=6.0)
    assert loc.volume_ml < 30.0  # well under the adult 50-90 ml: atrophy
    assert faces == {} and reason == ""
    qc = LocalisationQC()
    short = partial_localisation(
        stage1_length_mm=70.0,
        outside_fraction=0.1,
        gland_length_mm=72.0,
        open_faces=(),
        qc=qc,
    )
    assert short == "stage-2 gland 72 mm long (< 110 mm)"
    assert "stage-1 component 70 mm" in partial_localisation(
        stage1_length_mm=70.0,
        outside_fraction=0.1,
        gland_length_mm=float("nan"),
        open_faces=(),
        qc=qc,
    )
    # a crop that had to grow is flagged even when the rerun's long gland stays inside it
    grown = partial_localisation(
        stage1_length_mm=70.0,
        outside_fraction=0.1,
        gland_length_mm=150.0,
        open_faces=(),
        qc=qc,
        grown_faces=("x+",),
    )
    assert grown == "stage-2 gland reached crop face x+ (crop grown, rerun)"


def test_grow_box_on_open_faces_within_limits():
    from pdacscreen.engine.postprocess import grow_box

    kw = dict(scan_min=(-200, -200, -200), scan_max=(200, 200, 200), grow_mm=40.0)
    lo, hi = grow_box((0, 0, 0), (100, 50, 50), ("x+",), max_box_mm=(160, 160, 240), **kw)
    assert lo == (0, 0, 0) and hi == (150, 50, 50)  # half of 100 mm > 40 mm
    lo, hi = grow_box((0, 0, 0), (100, 50, 50), ("x-", "z+"), max_box_mm=(160, 160, 120), **kw)
    assert lo == (-20, 0, 0) and hi == (100, 50, 90)  # x capped at 120 mm, the grown side last
    # a face at the scan's edge cannot grow: nothing to do
    assert grow_box((0, 0, 0), (200, 50, 50), ("x+",), max_box_mm=(160, 160, 240), **kw) is None
