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
