"""Body composition on one axial CT slice: skeletal muscle, visceral and subcutaneous fat.

HU ranges (the standard ones of the CT body-composition literature):

* skeletal muscle -29..+150 HU: Mitsiopoulos et al., J Appl Physiol 1998;85:115-122 (CT and MRI
  against cadavers), used for the L3 skeletal muscle index by Prado et al., Lancet Oncol
  2008;9:629-635 (sarcopenic obesity, cancer patients);
* adipose tissue -190..-30 HU: Mitsiopoulos 1998; an L3 slice's areas predict whole-body volumes
  (Shen et al., J Appl Physiol 2004;97:2333-2338);
* muscle mean HU (myosteatosis: lower is fattier) is the mean over the muscle mask.

Segmentation (classical, no model; the same steps work on real anatomy):

1. Body: above -500 HU, the table opened away (a ``TABLE_MM`` opening), largest component, holes
   filled.  The body's edge touching the reconstruction's field of view or the image border is
   reported as ``body_cut_by_fov``.
2. The abdominal wall is found along ``RAYS`` rays from the body's centroid: walking in from the
   skin, the first soft-tissue run of at least ``WALL_RUN_MM`` is the wall muscle (fascia); the
   run ends at the first fat gap of ``WALL_GAP_MM`` or at bone.  Both radii are median filtered
   over neighbouring rays, the wall thickness is capped at 1.5x its local median (a bowel loop
   touching the wall is not muscle).
3. Subcutaneous fat: fat outside the fascia.  Visceral fat: fat inside the wall's inner edge (the
   vertebra excluded).  Skeletal muscle: the wall (abdominal, paraspinal, quadratus lumborum), plus
   soft-tissue components inside it that lie beside the vertebral body and not in front of it
   (psoas); the aorta, the IVC and the bowel lie in front of the spine or away from it.

Runs on the host: one slice is milliseconds; CuPy inputs are copied to the host (``backend``
exists for the common signature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from pdacscreen.io.types import CTVolume
from pdacscreen.kernels._backend import BACKENDS, to_host
from pdacscreen.kernels.errors import KernelInputError
from pdacscreen.kernels.vertebrae import VertebralLevels, vertebral_levels

__all__ = [
    "BODYCOMP_COLUMNS",
    "FAT_HU",
    "MUSCLE_HU",
    "BodyComposition",
    "body_composition",
    "body_composition_slice",
    "skeletal_muscle_index",
]

MUSCLE_HU = (-29.0, 150.0)  # Mitsiopoulos 1998, Prado 2008
FAT_HU = (-190.0, -30.0)  # Mitsiopoulos 1998, Shen 2004
BODY_HU = -500.0
TABLE_MM = 3.0
RAYS = 360
WALL_RUN_MM = 4.0  # a soft-tissue run this long after the skin is wall (skin, septa: thinner)
WALL_GAP_MM = 2.0  # a fat gap this wide ends the wall muscle
BONE_HU = 120.0  # smoothed HU of the vertebra's outline
PSOAS_GROW_MM = 5.0  # the psoas is grown back this far through soft tissue after the cut
PSOAS_GAP_MM = 4.0  # a psoas component touches the vertebral body (within this distance)
WALL_WINDOW = 61  # rays (degrees) over which the wall thickness median is taken
WALL_CAP = 1.5  # an anterior/lateral wall run thicker than this times the median is capped
FOV_EDGE_MM = 20.0  # more body edge than this on the field-of-view edge: body_cut_by_fov
MAX_PIXEL_MM = 2.0  # coarser slices give areas too rough to report: resolution_too_coarse


#: the findings columns of :meth:`BodyComposition.row`, in order
BODYCOMP_COLUMNS = (
    "l3_slice_z_mm",
    "skeletal_muscle_area_cm2",
    "visceral_fat_area_cm2",
    "subcutaneous_fat_area_cm2",
    "muscle_mean_hu",
    "skeletal_muscle_index_cm2_m2",
    "bodycomp_qc",
)
#: plausible adult heights (m) for the skeletal muscle index; a PatientSize outside is ignored
HEIGHT_RANGE_M = (1.2, 2.3)


@dataclass(frozen=True)
class BodyComposition:
    """Tissue masks ``(y, x)`` bool of one slice, their areas (cm2), muscle mean HU and QC.

    ``qc`` is "" when every value was measured; otherwise the reason (``level_not_found``,
    ``body_cut_by_fov``, ``no_body``, ``resolution_too_coarse``) and the areas may be NaN.
    """

    slice_index: int
    z_mm: float
    muscle: np.ndarray
    visceral_fat: np.ndarray
    subcutaneous_fat: np.ndarray
    skeletal_muscle_area_cm2: float
    visceral_fat_area_cm2: float
    subcutaneous_fat_area_cm2: float
    muscle_mean_hu: float
    qc: str = ""

    def row(self, height_m: float | None = None) -> dict:
        """The findings columns (``l3_slice_z_mm`` ... ``bodycomp_qc``) as a plain dict.

        ``height_m`` (DICOM PatientSize, metres; often absent) gives the skeletal muscle index
        (:func:`skeletal_muscle_index`); the height itself is never a column.
        """

        def num(v: float) -> float | None:
            return round(float(v), 2) if np.isfinite(v) else None

        values = (
            num(self.z_mm),
            num(self.skeletal_muscle_area_cm2),
            num(self.visceral_fat_area_cm2),
            num(self.subcutaneous_fat_area_cm2),
            num(self.muscle_mean_hu),
            num(skeletal_muscle_index(self.skeletal_muscle_area_cm2, height_m)),
            self.qc or None,
        )
        return dict(zip(BODYCOMP_COLUMNS, values, strict=True))


def skeletal_muscle_index(area_cm2: float, height_m: float | None) -> float:
    """L3 skeletal muscle index, cm2/m2: muscle area over height squared (Prado 2008, whose
    sarcopenia cut-offs are 52.4 for men and 38.5 for women). NaN without a plausible height
    (:data:`HEIGHT_RANGE_M`) or area."""
    if height_m is None or not np.isfinite(height_m) or not np.isfinite(area_cm2):
        return float("nan")
    if not HEIGHT_RANGE_M[0] <= height_m <= HEIGHT_RANGE_M[1]:
        return float("nan")
    return float(area_cm2) / float(height_m) ** 2


def _empty(shape, qc: str, k: int = -1, z: float = float("nan")) -> BodyComposition:
    z0 = np.zeros(shape, dtype=bool)
    nan = float("nan")
    return BodyComposition(k, z, z0, z0, z0, nan, nan, nan, nan, qc)


def body_composition(
    volume: CTVolume,
    z_mm: float | None = None,
    *,
    level: str = "L3",
    backend: str = "auto",
) -> BodyComposition:
    """Body composition of ``volume`` on the slice nearest ``z_mm`` (LPS mm), or when ``z_mm`` is
    None on the middle slice of vertebra ``level`` (found by
    :func:`pdacscreen.kernels.vertebrae.vertebral_levels`).  Any axial grid: rows stored
    posterior -> anterior or columns left -> right (a NIfTI's RAS order) are read through the
    affine and the masks come back on the volume's own grid; an in-plane grid not along the LPS
    axes gives QC ``orientation_unsupported``.  Never raises for image content."""
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    arr = volume.array
    aff = volume.affine
    zs = aff[2, 0] * np.arange(arr.shape[0]) + aff[2, 3]
    if z_mm is None:
        lv: VertebralLevels = vertebral_levels(arr, aff, backend=backend)
        v = lv.level(level)
        if v is None:
            return _empty(arr.shape[1:], lv.qc or "level_not_found")
        k = v.slice_index
        level_qc = lv.qc  # "level_uncertain": measured, but perhaps on another vertebra
    else:
        if not np.isfinite(z_mm):
            raise KernelInputError(f"z_mm must be a finite LPS z in mm, got {z_mm!r}")
        k = int(np.argmin(np.abs(zs - float(z_mm))))
        if abs(zs[k] - float(z_mm)) > abs(aff[2, 0]):
            return _empty(arr.shape[1:], "level_outside_scan", k, float(z_mm))
        level_qc = ""
    dy, dx = volume.spacing[1], volume.spacing[2]
    if abs(aff[1, 1]) < 0.7 * dy or abs(aff[0, 2]) < 0.7 * dx:
        # rows along LPS y and columns along x (any sign) are what the method reads
        return _empty(arr.shape[1:], "orientation_unsupported", k, float(zs[k]))
    # The method reads rows anterior -> posterior and columns right -> left (LPS +y, +x): a grid
    # stored the other way round (NIfTI's RAS habit, feet-first flips) is flipped for the
    # measurement and the masks flipped back onto the volume's own grid.
    flip = (
        slice(None, None, -1 if aff[1, 1] < 0 else 1),
        slice(None, None, -1 if aff[0, 2] < 0 else 1),
    )
    out = body_composition_slice(
        np.ascontiguousarray(to_host(arr[k])[flip]), (dy, dx), backend=backend
    )
    return BodyComposition(
        k,
        float(zs[k]),
        np.ascontiguousarray(out.muscle[flip]),
        np.ascontiguousarray(out.visceral_fat[flip]),
        np.ascontiguousarray(out.subcutaneous_fat[flip]),
        out.skeletal_muscle_area_cm2,
        out.visceral_fat_area_cm2,
        out.subcutaneous_fat_area_cm2,
        out.muscle_mean_hu,
        out.qc or level_qc,
    )


def body_composition_slice(
    hu: Any, pixel_spacing_mm: tuple[float, float], *, backend: str = "auto"
) -> BodyComposition:
    """Body composition of one axial ``(y, x)`` HU slice (rows anterior -> posterior), spacing
    ``(dy, dx)`` mm.  See the module docstring for the method; never raises for image content."""
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    a = np.asarray(to_host(hu), dtype=np.float32)
    if a.ndim != 2 or min(a.shape) < 8:
        raise KernelInputError(f"hu must be a 2-D (y, x) slice of at least 8x8, got {a.shape}")
    sp = tuple(float(s) for s in pixel_spacing_mm)
    if len(sp) != 2 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise KernelInputError(f"pixel_spacing_mm must be two positive mm values, got {sp!r}")
    if max(sp) > MAX_PIXEL_MM:
        return _empty(a.shape, "resolution_too_coarse")
    body = _body(a, sp)
    if body.sum() * sp[0] * sp[1] < 10_000.0:  # under 100 cm2: not a trunk
        return _empty(a.shape, "no_body")
    qc = "body_cut_by_fov" if _cut_by_fov(a, body, sp) else ""
    fat = body & (a >= FAT_HU[0]) & (a <= FAT_HU[1])
    soft = body & (a >= MUSCLE_HU[0]) & (a <= MUSCLE_HU[1])
    sm = ndi.gaussian_filter(a, min(1.0, 1.2 / min(sp)))
    bone = body & (sm > BONE_HU)
    vertebra = _vertebra(bone, sp)
    front = float(np.flatnonzero(vertebra.any(axis=1))[0]) if vertebra.any() else None
    r_out, r_in, rho, theta_idx = _wall(body, soft | (bone & ~vertebra), vertebra, sp, front)
    outside = rho > r_out[theta_idx]
    inside = rho <= r_in[theta_idx]
    # Subcutaneous fat: fat outside the fascia, and the skin's partial-volume rim (pixels between
    # the body threshold and -190 HU on the body's edge are mostly fat, not air).
    rim = body & ~ndi.binary_erosion(body, iterations=2) & (a < FAT_HU[0])
    sat = (fat | rim) & outside
    vat = fat & inside & ~vertebra
    wall = soft & ~outside & ~inside & ~vertebra
    muscle = wall | _psoas(soft & inside & ~vertebra, vertebra, sp)
    px = sp[0] * sp[1] / 100.0
    mean_hu = float(a[muscle].mean()) if muscle.any() else float("nan")
    return BodyComposition(
        -1,
        float("nan"),
        muscle,
        vat,
        sat,
        float(muscle.sum() * px),
        float(vat.sum() * px),
        float(sat.sum() * px),
        mean_hu,
        qc,
    )


def _disk(r_px: int) -> np.ndarray:
    yy, xx = np.mgrid[-r_px : r_px + 1, -r_px : r_px + 1]
    return yy**2 + xx**2 <= r_px**2


def _body(a: np.ndarray, sp) -> np.ndarray:
    fg = a > BODY_HU
    r = max(1, int(round(TABLE_MM / min(sp))))
    opened = ndi.binary_opening(fg, structure=_disk(r))
    lab, n = ndi.label(opened)
    if n == 0:
        return np.zeros_like(fg)
    big = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    body = fg & ndi.binary_dilation(big, structure=_disk(r + 1))
    lab, n = ndi.label(body)
    if n == 0:
        return body
    body = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    return ndi.binary_fill_holes(body)


def _cut_by_fov(a: np.ndarray, body: np.ndarray, sp) -> bool:
    """Body edge on padding (<= -1024 reaching the image border) or on the border itself."""
    pad = a <= -1024.0
    lab, n = ndi.label(pad)
    if n:
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        sizes = np.bincount(lab.ravel())
        keep = [c for c in border if c and sizes[c] > 0.01 * a.size]
        out = np.isin(lab, keep)
    else:
        out = np.zeros_like(pad)
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = True
    edge = body & ~ndi.binary_erosion(body)
    touching = edge & ndi.binary_dilation(out, iterations=2)
    return float(touching.sum()) * min(sp) > FOV_EDGE_MM


def _wall(body, soft, bone, sp, front):
    """Fascia radius ``r_out`` and inner wall radius ``r_in`` (pixels) per ray, and each pixel's
    radius and ray index (the body seen from its centroid, in mm-isotropic coordinates)."""
    cy, cx = ndi.center_of_mass(body)
    step = 0.5 * min(sp)
    r_max = float(np.hypot(body.shape[0] * sp[0], body.shape[1] * sp[1]))
    radii = np.arange(0.0, r_max, step)
    th = np.arange(RAYS) * (2 * np.pi / RAYS)
    yy = cy + (radii[None, :] * np.sin(th)[:, None]) / sp[0]
    xx = cx + (radii[None, :] * np.cos(th)[:, None]) / sp[1]
    cls = np.zeros(body.shape, np.uint8)  # 0 outside, 1 fat or other, 2 soft, 3 bone
    cls[body] = 1
    cls[soft] = 2
    cls[bone] = 3
    ray = ndi.map_coordinates(cls, [yy.ravel(), xx.ravel()], order=0, cval=0).reshape(yy.shape)
    run = max(1, int(round(WALL_RUN_MM / step)))
    gap = max(1, int(round(WALL_GAP_MM / step)))
    r_out = np.full(RAYS, np.nan)
    r_in = np.full(RAYS, np.nan)
    for t in range(RAYS):
        r = ray[t]
        inb = np.flatnonzero(r > 0)
        if len(inb) == 0:
            continue
        i = inb[-1]
        while i >= 0 and not (r[max(0, i - run + 1) : i + 1] == 2).all():
            i -= 1
        if i < run:
            continue
        r_out[t] = radii[i]
        j = i
        while j > 0 and r[j] != 3 and not (r[max(0, j - gap + 1) : j + 1] == 1).all():
            j -= 1
        r_in[t] = radii[j]
    r_out = _circular_fill(r_out)
    r_in = _circular_fill(r_in)
    r_out = ndi.median_filter(r_out, size=9, mode="wrap")
    thick = ndi.median_filter(r_out - np.minimum(r_in, r_out), size=5, mode="wrap")
    local = ndi.median_filter(thick, size=WALL_WINDOW, mode="wrap")
    # Anterior and lateral rays (ending in front of the vertebral body) cross the thin abdominal
    # wall: a run much thicker than its neighbours' is bowel touching the wall.  Behind that line
    # the paraspinal muscles are thick by nature.
    y_end = cy + r_out * np.sin(th) / sp[0]
    ant = y_end < front if front is not None else np.ones(RAYS, dtype=bool)
    ref = np.minimum(local, float(np.median(thick[ant]))) if ant.any() else local
    thick = np.where(ant, np.minimum(thick, WALL_CAP * ref + 2 * step), thick)
    r_in = r_out - thick
    py, px = np.indices(body.shape)
    dyy, dxx = (py - cy) * sp[0], (px - cx) * sp[1]
    rho = np.hypot(dyy, dxx)
    ang = np.mod(np.arctan2(dyy, dxx), 2 * np.pi)
    idx = np.round(ang / (2 * np.pi / RAYS)).astype(int) % RAYS
    return r_out, r_in, rho, idx


def _circular_fill(v: np.ndarray) -> np.ndarray:
    ok = np.isfinite(v)
    if ok.all() or not ok.any():
        return np.nan_to_num(v, nan=0.0)
    n = len(v)
    x = np.arange(n)
    xp = np.concatenate([x[ok] - n, x[ok], x[ok] + n])
    fp = np.tile(v[ok], 3)
    return np.interp(x, xp, fp)


def _vertebra(bone: np.ndarray, sp) -> np.ndarray:
    """The vertebra (filled): the bone component with the thickest part."""
    lab, n = ndi.label(bone, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(bone)
    filled = ndi.binary_fill_holes(bone)
    d = ndi.distance_transform_edt(filled, sampling=sp)
    j, i = np.unravel_index(int(np.argmax(d)), d.shape)
    flab, _ = ndi.label(filled, structure=np.ones((3, 3)))
    return flab == flab[j, i] if flab[j, i] else np.zeros_like(bone)


def _psoas(candidates: np.ndarray, vertebra: np.ndarray, sp) -> np.ndarray:
    """Soft-tissue components beside the vertebral body and level with or behind its centre."""
    if not vertebra.any():
        return np.zeros_like(candidates)
    vj, vi = np.nonzero(vertebra)
    front = vj.min()  # the vertebra's anterior edge (rows run anterior -> posterior)
    behind = candidates.copy()
    behind[: front + 1] = False  # cuts the psoas from the aorta and IVC in front of the spine
    opened = ndi.binary_opening(behind, structure=np.ones((3, 3)))
    lab, n = ndi.label(opened)
    if n == 0:
        return np.zeros_like(candidates)
    d = ndi.distance_transform_edt(~vertebra, sampling=sp)
    core = ndi.distance_transform_edt(vertebra, sampling=sp)
    j0, i0 = np.unravel_index(int(np.argmax(core)), core.shape)
    mins = ndi.minimum(d, lab, index=np.arange(1, n + 1))
    coms = ndi.center_of_mass(opened, lab, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, dtype=bool)
    for c, (m, (cj, ci)) in enumerate(zip(mins, coms, strict=True), start=1):
        lateral = abs(ci - i0) * sp[1]
        keep[c] = m <= PSOAS_GAP_MM and cj > front and lateral > 10.0
    sel = keep[lab]
    # grow back over the opening and a few mm in front of the spine's front line (psoas belly)
    grow = max(1, int(round(PSOAS_GROW_MM / min(sp))))
    return ndi.binary_dilation(sel, structure=np.ones((3, 3)), iterations=grow, mask=candidates)
