"""connected_components against a plain NumPy flood fill, with world-correct geometry."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from pdacscreen.io.types import voxel_to_world
from pdacscreen.kernels import Component, KernelInputError, connected_components
from pdacscreen.kernels._backend import to_host
from pdacscreen.kernels.testing import backend_params

BACKENDS = backend_params()


def _offsets(connectivity):
    out = []
    for d in itertools.product((-1, 0, 1), repeat=3):
        n = sum(abs(v) for v in d)
        if 0 < n and (connectivity == 26 or (connectivity == 18 and n <= 2) or n == 1):
            out.append(d)
    return out


def _flood(mask, connectivity):
    """Independent reference: breadth-first flood fill, returns a list of voxel index arrays."""
    seen = np.zeros(mask.shape, bool)
    comps = []
    offs = _offsets(connectivity)
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, vox = deque([start]), []
        while queue:
            p = queue.popleft()
            vox.append(p)
            for d in offs:
                q = (p[0] + d[0], p[1] + d[1], p[2] + d[2])
                if all(0 <= q[c] < mask.shape[c] for c in range(3)) and mask[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
        comps.append(np.array(vox))
    return comps


def _affine():
    aff = np.eye(4)
    aff[:3, :3] = np.array(
        [[0.0, 0.0, -0.7], [0.0, 0.8, 0.0], [2.5, 0.0, 0.0]]
    )  # permuted, flipped
    aff[:3, 3] = (12.0, -40.0, 7.5)
    return aff


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_matches_flood_fill(backend, connectivity):
    rng = np.random.default_rng(connectivity)
    mask = rng.random((7, 11, 13)) < 0.25
    aff = _affine()
    comps = connected_components(mask, aff, connectivity=connectivity, backend=backend)
    ref = sorted(_flood(mask, connectivity), key=lambda v: (-len(v), tuple(v.min(axis=0))))
    assert [c.voxels for c in comps] == [len(v) for v in ref]
    assert [c.label for c in comps] == list(range(1, len(ref) + 1))
    vox_ml = abs(np.linalg.det(aff[:3, :3])) / 1000
    sp = np.linalg.norm(aff[:3, :3], axis=0)
    by_centroid = {tuple(np.round(c.centroid_world, 9)): c for c in comps}
    for v in ref:
        cen = tuple(np.round(voxel_to_world(aff, v.mean(axis=0)), 9))
        c = by_centroid[cen]  # every reference component is found with its world centroid
        assert c.voxels == len(v)
        assert c.volume_ml == pytest.approx(len(v) * vox_ml)
        lo, hi = v.min(axis=0), v.max(axis=0) + 1
        assert c.bbox == tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        np.testing.assert_allclose(c.extent_mm, (hi - lo) * sp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_min_voxels_and_order(backend):
    mask = np.zeros((6, 20, 20), bool)
    mask[1:3, 1:4, 1:4] = True  # 18 voxels
    mask[4, 10:15, 10:15] = True  # 25 voxels
    mask[0, 18, 18] = True  # 1 voxel
    mask[5, 0, 10:12] = True  # 2 voxels
    comps, labels = connected_components(
        mask, _affine(), min_voxels=2, return_labels=True, backend=backend
    )
    labels = to_host(labels)
    assert [c.voxels for c in comps] == [25, 18, 2]
    assert labels.dtype == np.int32 and labels[0, 18, 18] == 0  # dropped component
    for c in comps:
        assert isinstance(c, Component)
        assert (labels == c.label).sum() == c.voxels
        assert (labels[c.bbox] == c.label).sum() == c.voxels


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_sorted_by_position(backend):
    mask = np.zeros((3, 9, 9), bool)
    mask[0, 6:8, 6:8] = True
    mask[2, 0:2, 0:2] = True
    mask[1, 3:5, 3:5] = True
    comps = connected_components(mask, np.eye(4), connectivity=6, backend=backend)
    assert [c.bbox[0].start for c in comps] == [0, 1, 2]  # equal sizes: scan order


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    one = connected_components(
        np.ones((1, 1, 1), bool), np.diag([3.0, 0.5, 0.5, 1.0]), backend=backend
    )
    assert len(one) == 1 and one[0].voxels == 1
    assert one[0].volume_ml == pytest.approx(0.75 / 1000)
    assert one[0].centroid_world == (0.0, 0.0, 0.0)
    assert connected_components(np.zeros((2, 3, 4), bool), np.eye(4), backend=backend) == []
    comps, labels = connected_components(
        np.zeros((2, 3, 4), np.uint8), np.eye(4), return_labels=True, backend=backend
    )
    assert comps == [] and int(to_host(labels).max()) == 0
    line = np.zeros((1, 1, 50), np.uint8)
    line[0, 0, ::2] = 7  # integer masks: non-zero is foreground
    assert len(connected_components(line, np.eye(4), backend=backend)) == 25


def test_bad_arguments():
    with pytest.raises(KernelInputError, match="connectivity"):
        connected_components(np.ones((2, 2, 2)), np.eye(4), connectivity=8)
    with pytest.raises(KernelInputError, match="min_voxels"):
        connected_components(np.ones((2, 2, 2)), np.eye(4), min_voxels=0)
