"""From network outputs to findings: pancreas box, lesion candidates, location, QC flags.

Grids: ``prob`` arrays are ``(z, y, x)`` on a grid whose ``affine`` maps index ``(k, j, i, 1)`` to
patient LPS mm.  Boxes are world boxes ``(x, y, z)`` mm (LPS), as ``crop_resample`` takes them.
Connected components come from :func:`pdacscreen.kernels.connected_components` (26-connectivity,
as picai_eval scores lesions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pdacscreen.io.types import voxel_to_world
from pdacscreen.kernels import connected_components, to_host

__all__ = [
    "Localisation",
    "Lesion",
    "localise",
    "lesion_candidates",
    "organ_mask",
    "pancreas_location",
    "organ_axis",
    "softmax",
    "dilate_mm",
    "pancreas_scores",
    "LocalisationQC",
    "gland_length_mm",
    "crop_faces_touched",
    "grow_box",
    "partial_localisation",
]

QC_FLAGS = (
    "pancreas_not_found",
    "pancreas_cut_by_fov",
    "low_localisation_confidence",
    "partial_localisation",
    "contrast_phase",
    "high_noise",
)


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """Numerically stable softmax over ``axis`` (float32)."""
    x = logits - logits.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x.astype(np.float32, copy=False)


def _components(mask: np.ndarray, affine: np.ndarray, min_voxels: int):
    """(components largest first, int32 label image on the host; 0 = none/dropped)."""

    comps, labels = connected_components(
        mask, affine, connectivity=26, min_voxels=max(1, int(min_voxels)), return_labels=True
    )
    return list(comps), np.asarray(to_host(labels))


def _voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class Localisation:
    """Stage-1 result: the pancreas box in world mm (LPS) and how sure we are of it.

    ``box_min``/``box_max`` are ``(x, y, z)`` mm including the margin and clipped to the maximum
    box; ``confidence`` is the mean pancreas probability inside the chosen component;
    ``length_mm`` the component's extent along its own long (first principal) axis, voxel faces
    included; ``outside_fraction`` the share of the stage-1 probability mass (voxels at or above
    half the threshold used) that lies outside the chosen component.
    """

    found: bool
    box_min: tuple[float, float, float]
    box_max: tuple[float, float, float]
    confidence: float
    cut_by_fov: bool
    volume_ml: float
    components: int
    length_mm: float = float("nan")
    outside_fraction: float = 0.0


def _bbox_world(
    affine: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y, z) min/max over the 8 corners of voxel box [lo - 0.5, hi + 0.5] (k, j, i)."""
    a, b = lo - 0.5, hi + 0.5
    corners = np.array(
        [[(a, b)[s][0], (a, b)[u][1], (a, b)[v][2]] for s in (0, 1) for u in (0, 1) for v in (0, 1)]
    )
    world = voxel_to_world(affine, corners)
    return world.min(axis=0), world.max(axis=0)


def localise(
    prob: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float,
    min_ml: float,
    margin_mm: tuple[float, float, float],
    max_box_mm: tuple[float, float, float],
) -> Localisation:
    """Pancreas box from the stage-1 probability map (largest component above ``threshold``;
    when nothing reaches it but the peak is at least half of it, above half the peak).

    ``margin_mm`` and ``max_box_mm`` are ``(z, y, x)`` mm (stage-2 settings); the box is grown by
    the margin, then shrunk about its centre to at most ``max_box_mm`` (bounded stage-2 memory).
    """
    vox_ml = _voxel_ml(affine)
    min_voxels = int(np.ceil(min_ml / vox_ml))
    comps, labels = _components(prob >= threshold, affine, min_voxels=min_voxels)
    peak = float(prob.max()) if prob.size else 0.0
    if not comps and peak >= 0.5 * threshold:
        # An unsure localiser: fall back to half its peak (reported as low confidence).
        threshold = 0.5 * peak
        comps, labels = _components(prob >= threshold, affine, min_voxels=min_voxels)
    if not comps:
        nan = (float("nan"),) * 3
        return Localisation(False, nan, nan, 0.0, False, 0.0, 0)
    best = comps[0]
    sl = best.bbox
    lo = np.array([s.start for s in sl], float)
    hi = np.array([s.stop - 1 for s in sl], float)
    region = prob[sl]
    member = labels[sl] == best.label
    confidence = float(region[member].mean()) if member.any() else 0.0
    shape = np.array(prob.shape)
    cut = bool(np.any(lo <= 0) or np.any(hi >= shape - 1))
    wmin, wmax = _bbox_world(affine, lo, hi)
    chosen = labels == best.label
    floor = prob >= 0.5 * threshold
    mass = float(prob[floor].sum())
    outside = float(prob[floor & ~chosen].sum()) / mass if mass > 0 else 0.0
    margin = np.array(margin_mm[::-1], float)  # (z, y, x) -> (x, y, z)
    limit = np.array(max_box_mm[::-1], float)
    wmin, wmax = wmin - margin, wmax + margin
    centre, half = (wmin + wmax) / 2.0, np.minimum((wmax - wmin) / 2.0, limit / 2.0)
    return Localisation(
        True,
        tuple(float(v) for v in centre - half),
        tuple(float(v) for v in centre + half),
        confidence,
        cut,
        float(best.voxels * vox_ml),
        len(comps),
        gland_length_mm(chosen, affine),
        outside,
    )


def organ_mask(prob_organ: np.ndarray, affine: np.ndarray, *, threshold: float) -> np.ndarray:
    """Largest 26-connected component of ``prob_organ >= threshold`` as a bool ``(z, y, x)`` mask."""
    comps, labels = _components(prob_organ >= threshold, affine, min_voxels=1)
    return labels == 1 if comps else np.zeros(prob_organ.shape, dtype=bool)


@dataclass(frozen=True)
class Lesion:
    """One lesion candidate (world coordinates LPS mm; ``peak`` is its maximum lesion probability)."""

    volume_ml: float
    diameter_mm: float
    center_mm: tuple[float, float, float]
    peak: float
    location: str
    voxels: int
    label: int = 0  # its value in the label image of lesion_candidates(..., return_labels=True)


@dataclass(frozen=True)
class OrganAxis:
    """The pancreas' long axis: mean point, unit direction toward the tail, projection range."""

    mean: np.ndarray
    axis: np.ndarray
    lo: float
    hi: float

    def location(self, point_mm) -> str:
        """``"head"``, ``"body"`` or ``"tail"``: thirds of the organ's length along the axis."""
        f = (float((np.asarray(point_mm, float) - self.mean) @ self.axis) - self.lo) / max(
            self.hi - self.lo, 1e-6
        )
        return "head" if f < 1.0 / 3.0 else "body" if f < 2.0 / 3.0 else "tail"


def organ_axis(
    organ: np.ndarray, affine: np.ndarray, *, max_points: int = 20000
) -> OrganAxis | None:
    """First principal axis of the organ's voxels (world mm), oriented so the head is at the
    patient's right (smaller LPS x) and the tail at the left; None for fewer than 3 voxels."""
    idx = np.argwhere(organ)
    if len(idx) < 3:
        return None
    if len(idx) > max_points:  # a deterministic subsample is plenty for an axis
        idx = idx[:: int(np.ceil(len(idx) / max_points))]
    pts = voxel_to_world(affine, idx.astype(float))
    mean = pts.mean(axis=0)
    _, _, vt = np.linalg.svd(pts - mean, full_matrices=False)
    axis = vt[0] if vt[0][0] >= 0 else -vt[0]
    proj = (pts - mean) @ axis
    return OrganAxis(mean, axis, float(proj.min()), float(proj.max()))


def pancreas_location(organ: np.ndarray, affine: np.ndarray, point_mm: np.ndarray) -> str:
    """``"head"``, ``"body"`` or ``"tail"`` of a world point along the organ's long axis."""
    ax = organ_axis(organ, affine)
    return "" if ax is None else ax.location(point_mm)


def lesion_candidates(
    lesion_prob: np.ndarray,
    organ: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float,
    min_ml: float,
    return_labels: bool = False,
) -> tuple[list[Lesion], np.ndarray]:
    """Lesion candidates: 26-connected components of ``lesion_prob >= threshold``, largest first.

    Components under ``min_ml`` are dropped.  Diameter is the largest extent in mm of the
    component along the grid axes.  Returns ``(lesions, mask of the kept components)``, or with
    ``return_labels`` ``(lesions, int32 label image)`` where lesion ``l`` is ``== l.label``.
    """
    min_voxels = int(np.ceil(min_ml / _voxel_ml(affine)))
    comps, labels = _components(lesion_prob >= threshold, affine, min_voxels=max(min_voxels, 1))
    axis = organ_axis(organ | (labels > 0), affine) if comps else None
    out = []
    for c in comps:
        centre = np.asarray(c.centroid_world, float)
        peak = float(lesion_prob[c.bbox][labels[c.bbox] == c.label].max())
        out.append(
            Lesion(
                volume_ml=float(c.volume_ml),
                diameter_mm=float(max(c.extent_mm)),
                center_mm=tuple(float(v) for v in centre),
                peak=peak,
                location="" if axis is None else axis.location(centre),
                voxels=int(c.voxels),
                label=int(c.label),
            )
        )
    return out, (labels if return_labels else labels > 0)


def dilate_mm(mask: np.ndarray, affine: np.ndarray, radius_mm: float) -> np.ndarray:
    """``mask`` grown by an ellipsoid of ``radius_mm`` (in world mm on this grid's spacing)."""
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))  # (dz, dy, dx) mm
    r = np.maximum(np.floor(radius_mm / spacing), 0).astype(int)
    if not mask.any() or not r.any():
        return mask.astype(bool, copy=True)
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    ball = (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= radius_mm**2
    return ndimage.binary_dilation(mask, structure=ball)


def pancreas_scores(
    lesion_prob: np.ndarray,
    organ: np.ndarray,
    lesions: list[Lesion],
    lesion_labels: np.ndarray,
    affine: np.ndarray,
    *,
    rim_mm: float = 5.0,
    top_k: int = 20,
) -> dict[str, float]:
    """Study scores that look only at the pancreas (``organ`` grown by ``rim_mm``).

    * ``pancreas_peak``: the highest lesion probability inside the grown pancreas;
    * ``pancreas_topk``: the mean of its ``top_k`` highest (one hot voxel is not a lesion);
    * ``candidate_peak``: the highest ``peak`` of the lesion candidates whose component touches
      the grown pancreas (0 when none does);
    * ``candidate_ml``: that candidate's volume.

    Nothing outside the gland can raise them: a false positive in the bowel or a vessel next to
    the crop's edge does not flag the study.
    """
    region = dilate_mm(organ, affine, rim_mm)
    inside = lesion_prob[region]
    if inside.size == 0:
        return {
            "pancreas_peak": 0.0,
            "pancreas_topk": 0.0,
            "candidate_peak": 0.0,
            "candidate_ml": 0.0,
        }
    k = min(top_k, inside.size)
    top = np.partition(inside.ravel(), inside.size - k)[-k:]
    best, best_ml = 0.0, 0.0
    for les in lesions:
        if les.peak > best and bool(region[lesion_labels == les.label].any()):
            best, best_ml = float(les.peak), float(les.volume_ml)
    return {
        "pancreas_peak": float(inside.max()),
        "pancreas_topk": float(top.mean()),
        "candidate_peak": best,
        "candidate_ml": best_ml,
    }


# ---------------------------------------------------------------------- localisation QC


@dataclass(frozen=True)
class LocalisationQC:
    """Settings of the ``partial_localisation`` check (see :func:`partial_localisation`).

    * ``min_length_mm``: the stage-2 gland (the stage-1 component when stage 2 has none) must be
      at least this long along its own long axis (an adult pancreas is 12-17 cm; an atrophic one
      is thinner and lighter, not much shorter, so length is checked and volume is not; 110 mm
      is under the normal adult range and 30 mm under the generator's shortest, 140 mm);
    * ``max_outside_fraction``: at most this share of the stage-1 probability mass may lie
      outside the chosen component (a gland found in pieces);
    * ``min_touch_voxels``: the stage-2 gland "reaches" a crop face when at least this many of its
      voxels lie in the face's outermost layer (50 at 2 mm = 200 mm^2: above the 30-39 voxels
      of the 3 generator studies whose box missed 1-3% of the gland: such a near-miss is not
      flagged);
    * ``grow``: when the stage-2 gland reaches a crop face that lies inside the scan, grow the crop
      on that side (by ``max(grow_mm, half the crop's size there)``, capped at the stage's
      ``max_box_mm``) and run stage 2 once more on the enlarged crop.

    Calibrated on the project's phantom generator: none of its studies is flagged
    (tests/second_renderer/RESULTS.md, "Partial localisation").
    """

    min_length_mm: float = 110.0
    max_outside_fraction: float = 0.3
    min_touch_voxels: int = 50
    grow: bool = True
    grow_mm: float = 40.0


def gland_length_mm(mask: np.ndarray, affine: np.ndarray) -> float:
    """Extent in mm of ``mask`` along its first principal axis, voxel faces included (NaN when
    it has fewer than 3 voxels)."""
    ax = organ_axis(mask, affine)
    if ax is None:
        return float("nan")
    # one voxel's extent along the axis: sum over index axes of |axis . (that axis' mm vector)|
    voxel = float(np.abs(np.asarray(affine)[:3, :3].T @ ax.axis).sum())
    return float(ax.hi - ax.lo + voxel)


def _world_axis(affine: np.ndarray) -> list[tuple[int, int]]:
    """Per index axis (k, j, i): (world axis 0/1/2 = x/y/z, +1 when the index grows with it)."""
    m = np.asarray(affine)[:3, :3]
    out = []
    for a in range(3):
        w = int(np.argmax(np.abs(m[:, a])))
        out.append((w, 1 if m[w, a] > 0 else -1))
    return out


def crop_faces_touched(
    organ: np.ndarray, affine: np.ndarray, *, min_voxels: int = 1
) -> dict[str, int]:
    """Organ voxels in each outermost layer of the crop, keyed by world face (``"x-"`` = the face
    at the crop's smallest LPS x); only faces with at least ``min_voxels`` are kept."""
    out: dict[str, int] = {}
    for a, (w, sign) in enumerate(_world_axis(affine)):
        for end in (0, organ.shape[a] - 1):
            n = int(np.take(organ, end, axis=a).sum())
            low = (end == 0) == (sign > 0)
            if n >= max(1, int(min_voxels)):
                out["xyz"[w] + ("-" if low else "+")] = n
    return out


def grow_box(
    box_min,
    box_max,
    faces,
    *,
    scan_min,
    scan_max,
    grow_mm: float,
    max_box_mm: tuple[float, float, float],
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The world box ``(x, y, z)`` mm grown on ``faces`` (``"x+"`` ...) that lie inside the scan
    (``scan_min``/``scan_max``, world mm), by ``max(grow_mm, half its size on that axis)``, kept
    within the scan and within ``max_box_mm`` (``(z, y, x)``) by cutting back what was added, in
    proportion when both faces of an axis grew (the old box is always kept).  None when no face
    can grow."""
    lo, hi = np.array(box_min, float), np.array(box_max, float)
    smin, smax = np.array(scan_min, float), np.array(scan_max, float)
    limit = np.array(max_box_mm[::-1], float)
    new_lo, new_hi = lo.copy(), hi.copy()
    for f in faces:
        w = "xyz".index(f[0])
        step = max(float(grow_mm), 0.5 * float(hi[w] - lo[w]))
        if f[1] == "-" and lo[w] > smin[w] + 1e-3:
            new_lo[w] = max(lo[w] - step, smin[w])
        elif f[1] == "+" and hi[w] < smax[w] - 1e-3:
            new_hi[w] = min(hi[w] + step, smax[w])
    for w in range(3):  # cap at the limit, cutting back what was added (the old box stays)
        room = max(limit[w] - (hi[w] - lo[w]), 0.0)
        add_lo, add_hi = lo[w] - new_lo[w], new_hi[w] - hi[w]
        if add_lo + add_hi > room:
            scale = room / (add_lo + add_hi)
            new_lo[w], new_hi[w] = lo[w] - add_lo * scale, hi[w] + add_hi * scale
    if np.allclose(new_lo, lo) and np.allclose(new_hi, hi):
        return None
    return tuple(float(v) for v in new_lo), tuple(float(v) for v in new_hi)


def partial_localisation(
    *,
    stage1_length_mm: float,
    outside_fraction: float,
    gland_length_mm: float,
    open_faces: tuple[str, ...],
    qc: LocalisationQC,
    grown_faces: tuple[str, ...] = (),
) -> str:
    """Why the localisation looks partial ("" when it does not): the measured reasons, joined.

    * the crop was grown on ``grown_faces`` because the stage-2 gland reached them (the
      stage-1 box was partial; the study's numbers come from the rerun, so it is flagged even
      when the rerun's gland stays inside: an unflagged study always has the plain result);
    * the stage-2 gland reaches crop faces that lie inside the scan (``open_faces``: the gland
      goes on outside the crop that stage 2 saw);
    * the stage-2 gland, or (when stage 2 gave none) the stage-1 component, is shorter than
      ``qc.min_length_mm`` along its long axis;
    * more than ``qc.max_outside_fraction`` of the stage-1 probability mass lies outside the
      chosen component.

    Volume is not a criterion: an atrophic gland is small but keeps most of its length.
    """
    reasons = []
    if grown_faces:
        reasons.append(
            "stage-2 gland reached crop face " + ",".join(grown_faces) + " (crop grown, rerun)"
        )
    if open_faces:
        after = " after growth" if grown_faces else ""
        reasons.append("stage-2 gland reaches crop face " + ",".join(open_faces) + after)
    length, what = gland_length_mm, "stage-2 gland"
    if not np.isfinite(length):
        length, what = stage1_length_mm, "stage-1 component"
    if np.isfinite(length) and length < qc.min_length_mm:
        reasons.append(f"{what} {length:.0f} mm long (< {qc.min_length_mm:.0f} mm)")
    if outside_fraction > qc.max_outside_fraction:
        reasons.append(
            f"{100 * outside_fraction:.0f}% of stage-1 pancreas probability outside the box's "
            f"component (> {100 * qc.max_outside_fraction:.0f}%)"
        )
    return "; ".join(reasons)
