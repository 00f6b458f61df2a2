"""Vertebral levels (T12, L1 ... L5) of an axial CT from the spine's bone profile (classical).

Algorithm, on a ``(z, y, x)`` HU volume with rows running anterior -> posterior:

1. Body mask (:func:`pdacscreen.kernels.body_mask`: no table), bone = body voxels above
   ``BONE_HU``.  The spine is the bone present in the most slices: the largest component of the
   in-plane map "bone in at least ``COLUMN_FRACTION`` of the slices" (ribs, pelvis and the table
   are bone in few slices or lie outside the body).
2. Per slice, the vertebral body centre is the deepest point (distance-transform maximum) of the
   filled bone (in-plane Gaussian smoothing, above ``VERTEBRA_HU``) near that column, median
   filtered along z (lordosis is followed; disc slices, holding no bone, take their neighbours').
3. The bone profile is the mean HU of a disc of half the vertebral body's radius around that
   centre.  Intervertebral discs (70-100 HU) are its minima between vertebral bodies (cancellous
   bone 150-300 HU): ``scipy.signal.find_peaks`` with a minimum distance and prominence; a vertebra
   is the run between two discs (the runs at either end of the scan count when long enough).
4. Each vertebra's mid slices are searched for rib heads: bone components apart from the
   vertebra's own component, lying within ``RIB_GAP_MM`` of it, lateral to the vertebral body and
   level with or behind it (the costovertebral joints).  The lowest rib-bearing vertebra is T12,
   the next ones L1, L2 ...  This is how a reader counts when the sacrum is not in the field of
   view; it fails where anatomy varies (lumbar ribs, 11 or 13 rib pairs: about 5-10 % of people),
   so the result carries the QC reason ``level_not_found`` whenever no rib-bearing vertebra is seen.
5. Plausibility: an inner vertebra shorter than ``BODY_MIN_MM`` or two centres closer than
   ``SPACING_MIN_MM`` mean the disc profile was misread (thick or coarse slices, fractures,
   degenerate discs) and every name after it may be shifted: the levels keep their names and
   carry the QC reason ``level_uncertain``.  On the real TotalSegmentator abdomen (3 mm voxels,
   T11-L2) the profile split L1 into 6-9 mm fragments and L2's transverse processes looked like
   ribs, so L2 was called T12: this rule flags it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks

from pdacscreen.kernels._backend import check_volume, resolve, spacing_from_affine, to_host
from pdacscreen.kernels.body import body_mask
from pdacscreen.kernels.errors import KernelInputError, NoBodyError

__all__ = ["Vertebra", "VertebralLevels", "vertebral_levels"]

log = logging.getLogger(__name__)

BONE_HU = 150.0  # cancellous bone lower bound (DOMAIN.md: cancellous 150-300 HU)
VERTEBRA_HU = 120.0  # smoothed HU of a vertebra's outline (discs' partial volume stays below)
COLUMN_FRACTION = 0.35  # the spine holds bone in at least this fraction of the slices
SEARCH_MM = 25.0  # margin around the spine column searched for the vertebral body per slice
DISC_MIN_MM = 16.0  # minimum distance between two discs (vertebral body + disc, adults >= 20 mm)
DISC_PROMINENCE_HU = 20.0  # depth of a disc's dip in the bone profile
RIB_GAP_MM = 8.0  # a rib head lies within this distance of its vertebra's bone
RIB_LATERAL_MM = (12.0, 48.0)  # rib head centroid: lateral offset from the vertebral body centre
RIB_DEPTH_MM = (-10.0, 45.0)  # rib head centroid: offset behind the vertebral body centre
RIB_MIN_MM2 = 12.0  # smallest rib-head cross-section
RIB_MEAN_HU = 280.0  # a rib head's mean HU (cortex-rich); cancellous fragments stay below
SMOOTH_MM = 1.2  # in-plane Gaussian sigma (at most one pixel) before the bone outline is taken
BODY_MIN_MM = 15.0  # an inner vertebral body shorter than this is a fragment of the profile
SPACING_MIN_MM = 20.0  # adult T10-L5 centres lie 25-40 mm apart; closer ones are miscounted


@dataclass(frozen=True)
class Vertebra:
    """One vertebra found in the profile: centre slice, LPS z (mm), extent and whether it has ribs."""

    slice_index: int
    z_mm: float
    height_mm: float
    has_ribs: bool
    name: str = ""  # "T12", "L1" ... once labelled, "" when the count has no anchor


@dataclass(frozen=True)
class VertebralLevels:
    """Vertebrae from cranial to caudal, the levels found by name and QC reasons ('' when fine)."""

    vertebrae: tuple[Vertebra, ...]
    qc: str = ""

    def level(self, name: str) -> Vertebra | None:
        """The vertebra called ``name`` ("L3"), or None when it was not found."""
        return next((v for v in self.vertebrae if v.name == name), None)


def _slice_z(affine: np.ndarray, n: int) -> np.ndarray:
    """LPS z (mm) of each slice centre (tilt ignored: the slice axis is the cranio-caudal one)."""
    k = np.arange(n, dtype=np.float64)
    return affine[2, 0] * k + affine[2, 3]


def vertebral_levels(hu: Any, affine: np.ndarray, *, backend: str = "auto") -> VertebralLevels:
    """Find the vertebrae of a ``(z, y, x)`` HU volume and name them from T12 down.

    ``affine``: index ``(k, j, i, 1)`` -> LPS mm; axis 0 must be the slice axis and rows must run
    anterior -> posterior or the reverse (sagittal or coronal stacks are refused).  Never raises for
    image content: a volume without a recognisable spine gives QC ``level_not_found``.
    """
    check_volume(hu, "hu")
    aff = np.asarray(affine, dtype=np.float64)
    sp = spacing_from_affine(aff)
    if abs(aff[2, 0]) < 0.7 * sp[0] or abs(aff[1, 1]) < 0.7 * sp[1]:
        raise KernelInputError(
            "vertebral_levels needs an axial (z, y, x) stack with rows along the LPS y axis, "
            f"got affine columns {aff[:3, :3].round(3).tolist()}"
        )
    be = resolve(backend, hu)
    x = be.asarray(hu)
    try:
        body = body_mask(x, spacing=tuple(sp), backend=be.name)
    except NoBodyError:
        return VertebralLevels((), "level_not_found")
    bone = (x > BONE_HU) & body.mask
    frac = to_host(bone.mean(axis=0))
    column, n = ndi.label(frac >= COLUMN_FRACTION)
    if n == 0:
        return VertebralLevels((), "level_not_found")
    mass = ndi.sum(frac, column, index=np.arange(1, n + 1))
    col = column == (int(np.argmax(mass)) + 1)
    ys, xs = np.nonzero(col)
    my, mx = int(round(SEARCH_MM / sp[1])), int(round(SEARCH_MM / sp[2]))
    win = (
        slice(max(0, ys.min() - my), ys.max() + my + 1),
        slice(max(0, xs.min() - mx), xs.max() + mx + 1),
    )
    sub = to_host(x[:, win[0], win[1]]).astype(np.float32)
    sub_body = to_host(body.mask[:, win[0], win[1]])
    posterior = 1.0 if aff[1, 1] > 0 else -1.0  # rows run anterior -> posterior when +1
    vert = _vertebrae(sub, sub_body, sp, _slice_z(aff, sub.shape[0]), posterior)
    return _name(vert)


def _centres(sm: np.ndarray, sp: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per slice (y, x) of the vertebral body centre (NaN on disc slices) and its radius in mm."""
    nz = sm.shape[0]
    cy, cx, rad = np.full(nz, np.nan), np.full(nz, np.nan), np.full(nz, np.nan)
    for k in range(nz):
        filled = ndi.binary_fill_holes(sm[k] > VERTEBRA_HU)
        if filled.sum() * sp[1] * sp[2] < 150.0:
            continue
        d = ndi.distance_transform_edt(filled, sampling=sp[1:])
        j, i = np.unravel_index(int(np.argmax(d)), d.shape)
        cy[k], cx[k], rad[k] = j, i, d[j, i]
    if np.all(np.isnan(cy)):
        return cy, cx, float("nan")
    half = max(2, int(round(15.0 / sp[0])))
    out = []
    for a in (cy, cx):
        m = np.array([np.nanmedian(a[max(0, k - half) : k + half + 1]) for k in range(nz)])
        m = np.where(np.isnan(m), np.nanmedian(a), m)
        out.append(m)
    return out[0], out[1], float(np.nanmedian(rad))


def _vertebrae(sub, sub_body, sp, zs, posterior) -> list[Vertebra]:
    sig = (0.0, min(1.0, SMOOTH_MM / sp[1]), min(1.0, SMOOTH_MM / sp[2]))
    sm = ndi.gaussian_filter(sub, sig)
    sm[~sub_body] = -1000.0
    cy, cx, radius = _centres(sm, sp)
    if not np.isfinite(radius) or radius < 5.0:
        return []
    yy, xx = np.indices(sub.shape[1:])
    r_in = 0.5 * radius
    prof = np.empty(sub.shape[0])
    for k in range(sub.shape[0]):
        disc = ((yy - cy[k]) * sp[1]) ** 2 + ((xx - cx[k]) * sp[2]) ** 2 <= r_in**2
        prof[k] = float(sub[k][disc].mean()) if disc.any() else np.nan
    prof = np.nan_to_num(prof, nan=float(np.nanmin(prof)) if np.isfinite(prof).any() else 0.0)
    dist = max(1, int(DISC_MIN_MM / sp[0]))
    discs, _ = find_peaks(-prof, distance=dist, prominence=DISC_PROMINENCE_HU)
    is_bone = prof > 0.5 * (VERTEBRA_HU + BONE_HU)
    bounds = [-1, *discs.tolist(), sub.shape[0]]
    typical = float(np.median(np.diff(discs)) * sp[0]) if len(discs) >= 2 else 30.0
    out: list[Vertebra] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        run = np.flatnonzero(is_bone[a + 1 : b]) + a + 1
        if len(run) == 0:
            continue
        height = (run[-1] - run[0] + 1) * sp[0]
        inner = a >= 0 and b < sub.shape[0]
        if not inner and height < 0.5 * typical:
            continue  # a sliver of a vertebra at the edge of the scan
        k = int(round(0.5 * (run[0] + run[-1])))
        out.append(
            Vertebra(
                slice_index=k,
                z_mm=float(np.interp(0.5 * (run[0] + run[-1]), np.arange(len(zs)), zs)),
                height_mm=float(height),
                has_ribs=_has_ribs(sm, run, (cy, cx, radius), sp, posterior),
            )
        )
    return sorted(out, key=lambda v: -v.z_mm)


def _has_ribs(sm, run, centre, sp, posterior) -> bool:
    """Rib heads beside the vertebra in its middle slices (see the module docstring, step 4)."""
    cy, cx, radius = centre
    mid = run[len(run) // 4 : len(run) - len(run) // 4 + 1] if len(run) > 2 else run
    for k in mid:
        lab, n = ndi.label(sm[k] > VERTEBRA_HU, structure=np.ones((3, 3)))
        if n < 2:
            continue
        means = ndi.mean(sm[k], lab, index=np.arange(n + 1))
        if n < 2:
            continue
        j, i = int(round(cy[k])), int(round(cx[k]))
        own = lab[j, i]
        if own == 0:
            continue
        gap = ndi.distance_transform_edt(lab != own, sampling=sp[1:])
        for c in range(1, n + 1):
            if c == own:
                continue
            m = lab == c
            if (
                m.sum() * sp[1] * sp[2] < RIB_MIN_MM2
                or gap[m].min() > RIB_GAP_MM
                or means[c] < RIB_MEAN_HU
            ):
                continue
            pj, pi = np.nonzero(m)
            lateral = abs(pi.mean() - cx[k]) * sp[2]
            depth = (pj.mean() - cy[k]) * sp[1] * posterior
            if (
                RIB_LATERAL_MM[0] <= lateral <= RIB_LATERAL_MM[1]
                and RIB_DEPTH_MM[0] <= depth <= RIB_DEPTH_MM[1]
                and lateral > 0.8 * radius
            ):
                return True
    return False


def _name(vert: list[Vertebra]) -> VertebralLevels:
    """Name the vertebrae from the lowest rib-bearing one (T12) downwards."""
    ribbed = [i for i, v in enumerate(vert) if v.has_ribs]
    if not ribbed:
        return VertebralLevels(tuple(vert), "level_not_found")
    t12 = ribbed[-1]
    named = []
    for i, v in enumerate(vert):
        off = i - t12
        if off < 0:
            name = f"T{12 + off}" if 12 + off >= 1 else ""
        elif off == 0:
            name = "T12"
        else:
            name = f"L{off}" if off <= 5 else ""
        named.append(Vertebra(v.slice_index, v.z_mm, v.height_mm, v.has_ribs, name))
    log.debug("vertebrae %s", [(v.name, round(v.z_mm, 1)) for v in named])
    short = any(v.height_mm < BODY_MIN_MM for v in named[1:-1]) or (
        len(named) <= 2 and any(v.height_mm < BODY_MIN_MM for v in named)
    )
    close = any(a.z_mm - b.z_mm < SPACING_MIN_MM for a, b in zip(named, named[1:], strict=False))
    return VertebralLevels(tuple(named), "level_uncertain" if short or close else "")
