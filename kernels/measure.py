"""Image measurements the pipeline records: blood-pool HU (phase check), noise, z-coverage.

All take a ``(z, y, x)`` HU volume and (where geometry matters) its 4x4 affine (index ``(k, j, i, 1)``
-> LPS mm).  Volumes whose slice axis is not axis 0 are viewed with the most cranio-caudal axis first.

* :func:`z_coverage_mm`: cranio-caudal extent of the slices that hold body.
* :func:`noise_hu`: image noise, the mode of the local standard deviation over homogeneous tissue
  (the "global noise level" of Christianson et al., Med Phys 2015), corrected for the bias of a
  5x5 sample standard deviation.
* :func:`find_blood_pool` / :func:`blood_pool_hu`: the aorta, found in the mean image of a slab of
  central slices as the square of blood-like attenuation anterior to the vertebral body that is
  most homogeneous and nearest the aorta's usual place (just anterior and left of the vertebral
  body); its median HU over the slab is the blood-pool attenuation (non-contrast: 30-60 HU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from pdacscreen.kernels._backend import check_volume, resolve, spacing_from_affine, to_host
from pdacscreen.kernels.body import body_mask
from pdacscreen.kernels.errors import MeasurementError, NoBodyError

__all__ = [
    "BloodPool",
    "Phase",
    "PhaseMeasure",
    "blood_pool_hu",
    "find_blood_pool",
    "aortic_blood_pool_hu",
    "measure_phase",
    "noise_hu",
    "z_coverage_mm",
]

log = logging.getLogger(__name__)

NOISE_WINDOW = 5  # in-plane window (voxels) of the local standard deviation
NOISE_SLICES = 24  # slices sampled for the noise estimate
SLAB_MM = 40.0  # thickness of the central slab searched for the aorta
DISC_MM = 5.0  # half-size of the square the aorta must hold
BONE_HU = 200.0  # maximum-intensity threshold for bone (cancellous bone with partial volume)
BONE_GAP_MM = 2.0  # gaps in the cortex closed before the vertebra is labelled
VERTEBRA_MIN_MM2 = 300.0  # smallest cross-section (mm^2) taken for a vertebra
FRONT_BAND_MM = 12.0  # half-width of the band whose columns define the vertebra's front
BLOOD_RANGE = (-20.0, 700.0)  # plausible mean HU of a blood pool (non-contrast .. arterial)
ROI_ANTERIOR_MM = (0.0, 45.0)  # aorta centre: distance anterior of the vertebral body's front
ROI_LEFT_MM = (-12.0, 40.0)  # aorta centre: offset to the patient's left of the vertebra's centre
EXPECTED_MM = (10.0, 12.0)  # typical aorta centre (anterior, left) relative to the vertebral front
HU_PER_MM = 0.5  # score = std (HU) of the slab-mean square + this * distance from EXPECTED_MM
SD_MAX_HU = 30.0  # squares less homogeneous than this are not blood pool


def _axial(x: Any, affine: np.ndarray, xp: Any) -> tuple[Any, np.ndarray]:
    """View with the most cranio-caudal (LPS z) array axis first; the affine's columns follow."""
    aff = np.asarray(affine, dtype=np.float64)
    sp = spacing_from_affine(aff)
    ax = int(np.argmax(np.abs(aff[2, :3]) / sp))
    if ax == 0:
        return x, aff
    order = [ax] + [c for c in range(3) if c != ax]
    out = aff.copy()
    out[:3, :3] = aff[:3, order]
    return xp.transpose(x, order), out


def z_coverage_mm(hu: Any, affine: np.ndarray, *, backend: str = "auto") -> float:
    """Cranio-caudal extent in mm of the slices holding body: ``n_span * |step along LPS z|``.

    ``n_span`` counts slices from the first to the last that hold body (gaps included).  A volume
    with no body has coverage 0.0.
    """
    check_volume(hu, "hu")
    be = resolve(backend, hu)
    x, aff = _axial(be.asarray(hu), affine, be.xp)
    sp = spacing_from_affine(aff)
    try:
        body = body_mask(x, spacing=tuple(sp), backend=be.name)
    except NoBodyError:
        return 0.0
    z = body.box[0]
    return float((z.stop - z.start) * abs(aff[2, 0]))


def noise_hu(hu: Any, *, backend: str = "auto") -> float:
    """Noise level in HU: mode of the 5x5 in-plane local standard deviation in soft tissue and fat.

    Uses up to ``NOISE_SLICES`` evenly spaced slices.  Raises :class:`MeasurementError`
    (``no_homogeneous_tissue``) when no window of fat or soft tissue is found.
    """
    check_volume(hu, "hu")
    be = resolve(backend, hu)
    xp, ndi = be.xp, be.ndi
    x = be.asarray(hu)
    nz = int(x.shape[0])
    pick = np.unique(np.linspace(0, nz - 1, min(nz, NOISE_SLICES)).round().astype(int))
    sub = x[be.asarray(pick)].astype(xp.float64)
    w = min(NOISE_WINDOW, int(sub.shape[1]), int(sub.shape[2]))
    if w < 3:
        raise MeasurementError(
            f"noise needs slices of at least 3x3 voxels, got {tuple(x.shape)}",
            code="no_homogeneous_tissue",
        )
    size = (1, w, w)
    m1 = ndi.uniform_filter(sub, size=size, mode="nearest")
    m2 = ndi.uniform_filter(sub * sub, size=size, mode="nearest")
    n = w * w
    sd = xp.sqrt(xp.maximum(m2 - m1 * m1, 0.0) * (n / (n - 1.0)))
    tissue = (m1 > -150.0) & (m1 < 150.0) & (sd < 100.0)
    vals = sd[tissue]
    if int(vals.size) < 50:
        raise MeasurementError(
            f"noise: only {int(vals.size)} homogeneous fat/soft-tissue windows in {len(pick)} "
            "slices (need 50); is this a CT in HU?",
            code="no_homogeneous_tissue",
        )
    hist, edges = xp.histogram(vals, bins=500, range=(0.0, 100.0))
    hist = to_host(hist).astype(np.float64)
    kernel = np.exp(-0.5 * (np.arange(-15, 16) / 5.0) ** 2)
    smooth = np.convolve(hist, kernel / kernel.sum(), mode="same")
    centres = 0.5 * (to_host(edges)[1:] + to_host(edges)[:-1])
    mode = float(centres[int(np.argmax(smooth))])
    k = n - 1  # chi distribution with k degrees of freedom: its mode is sigma * sqrt((k-1)/k)
    return mode / float(np.sqrt((k - 1.0) / k))


@dataclass(frozen=True)
class BloodPool:
    """Where the blood pool was measured.

    Attributes:
        hu: median HU inside the measured cylinder.
        centre_world: ``(x, y, z)`` LPS mm of the disc centre in the slab's middle slice.
        radius_mm: half-size of the square sampled in each slice.
        slices: ``(start, stop)`` slice range of the slab (axial view of the volume).
        homogeneity_hu: standard deviation of the slab-mean image over the disc.
    """

    hu: float
    centre_world: tuple[float, float, float]
    radius_mm: float
    slices: tuple[int, int]
    homogeneity_hu: float


def blood_pool_hu(hu: Any, affine: np.ndarray, *, backend: str = "auto") -> float:
    """Aortic blood-pool attenuation in HU (see :func:`find_blood_pool`)."""
    return find_blood_pool(hu, affine, backend=backend).hu


def find_blood_pool(hu: Any, affine: np.ndarray, *, backend: str = "auto") -> BloodPool:
    """Locate the aorta anterior to the vertebral body in central slices and measure it.

    Raises :class:`MeasurementError` with code ``no_spine`` (no vertebra found) or
    ``no_blood_pool`` (no homogeneous blood-like disc where the aorta should be), or
    :class:`NoBodyError`.
    """
    check_volume(hu, "hu")
    be = resolve(backend, hu)
    xp = be.xp
    x, aff = _axial(be.asarray(hu), affine, xp)
    sp = spacing_from_affine(aff)
    body = body_mask(x, spacing=tuple(sp), backend=be.name)
    z0, z1 = body.box[0].start, body.box[0].stop
    half = max(1, int(round(SLAB_MM / sp[0] / 2.0)))
    zc = (z0 + z1) // 2
    s0, s1 = max(z0, zc - half), min(z1, zc + half + 1)
    slab = x[s0:s1].astype(xp.float32)
    inside = body.mask[s0:s1].any(axis=0)
    mean_img = to_host(slab.mean(axis=0))
    mip = to_host(slab.max(axis=0))
    inside = to_host(inside)
    # Vertebral body: the bone blob nearest the body's left-right centre, behind its middle.
    ry = max(1, int(round(DISC_MM / sp[1])))
    rx = max(1, int(round(DISC_MM / sp[2])))
    import scipy.ndimage as sndi  # 2-D work on one small image: host code for both backends

    # Cortex can break up at coarse pixels: close gaps of a few mm, then fill the rings.
    cy = max(1, int(round(BONE_GAP_MM / sp[1])))
    cx = max(1, int(round(BONE_GAP_MM / sp[2])))
    closing = np.ones((2 * cy + 1, 2 * cx + 1), dtype=bool)
    bone = sndi.binary_closing(np.pad((mip > BONE_HU) & inside, ((cy, cy), (cx, cx))), closing)
    bone = sndi.binary_fill_holes(bone[cy:-cy, cx:-cx])
    lab, n = sndi.label(bone)
    if n == 0:
        raise MeasurementError("blood pool: no bone found in the central slab", code="no_spine")
    jj, ii = np.indices(mean_img.shape)
    px_area = sp[1] * sp[2]
    b = np.flatnonzero(inside.ravel())
    world = _plane_world(aff, jj.ravel()[b], ii.ravel()[b])
    body_lr, body_ap = np.median(world[:, 0]), np.median(world[:, 1])
    best, best_cost = 0, np.inf
    for lbl in range(1, n + 1):
        sel = np.flatnonzero(lab.ravel() == lbl)
        if sel.size * px_area < VERTEBRA_MIN_MM2:
            continue
        w = _plane_world(aff, jj.ravel()[sel], ii.ravel()[sel])
        lr, ap = np.median(w[:, 0]), np.median(w[:, 1])
        if ap < body_ap - 20.0:  # in the anterior part of the body: not the spine
            continue
        cost = abs(lr - body_lr) - 0.002 * sel.size * px_area
        if cost < best_cost:
            best, best_cost = lbl, cost
    if best == 0:
        raise MeasurementError(
            "blood pool: no vertebra-sized bone near the midline", code="no_spine"
        )
    sel = np.flatnonzero(lab.ravel() == best)
    vw = _plane_world(aff, jj.ravel()[sel], ii.ravel()[sel])
    # Left-right centre from the posterior half (canal, spinous process): a bright aorta merged
    # into the component in front cannot pull it sideways.
    spine_lr = float(np.median(vw[vw[:, 1] >= np.median(vw[:, 1]), 0]))
    front_ap = _front(vw, spine_lr, float(min(sp[1], sp[2])))
    # Homogeneous, bright, blood-like squares in the region of interest.
    size = (2 * ry + 1, 2 * rx + 1)
    m1 = sndi.uniform_filter(mean_img.astype(np.float64), size=size, mode="nearest")
    m2 = sndi.uniform_filter(mean_img.astype(np.float64) ** 2, size=size, mode="nearest")
    sd = np.sqrt(np.maximum(m2 - m1 * m1, 0.0))
    pw = _plane_world(aff, jj.ravel(), ii.ravel())
    ant = front_ap - pw[:, 1]
    left = pw[:, 0] - spine_lr
    holds = sndi.minimum_filter(inside & (mip <= 1500.0), size=size, mode="constant")
    ok = (
        (ant >= ROI_ANTERIOR_MM[0])
        & (ant <= ROI_ANTERIOR_MM[1])
        & (left >= ROI_LEFT_MM[0])
        & (left <= ROI_LEFT_MM[1])
        & (m1.ravel() >= BLOOD_RANGE[0])
        & (m1.ravel() <= BLOOD_RANGE[1])
        & holds.ravel()
        & (sd.ravel() <= SD_MAX_HU)
    )
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        raise MeasurementError(
            "blood pool: no blood-like region anterior to the vertebral body",
            code="no_blood_pool",
        )
    dist = np.hypot(ant[cand] - EXPECTED_MM[0], left[cand] - EXPECTED_MM[1])
    pick = int(cand[np.argmin(sd.ravel()[cand] + HU_PER_MM * dist)])
    j, i = divmod(pick, mean_img.shape[1])
    cyl = slab[:, max(0, j - ry) : j + ry + 1, max(0, i - rx) : i + rx + 1]
    value = float(to_host(xp.median(cyl)))
    mid = (s0 + s1 - 1) / 2.0
    centre = aff[:3, :3] @ np.array([mid, j, i], dtype=np.float64) + aff[:3, 3]
    log.debug("blood pool at %s: %.1f HU (sd %.1f)", centre, value, float(sd.ravel()[pick]))
    return BloodPool(
        hu=value,
        centre_world=tuple(float(v) for v in centre),  # type: ignore[arg-type]
        radius_mm=DISC_MM,
        slices=(int(s0), int(s1)),
        homogeneity_hu=float(sd.ravel()[pick]),
    )


def _front(vw: np.ndarray, spine_lr: float, px: float) -> float:
    """AP position (LPS y) of the vertebral body's anterior surface.

    Per left-right column within ``FRONT_BAND_MM`` of the spine's centre, the most anterior bone
    pixel; then a high percentile of those (the more posterior ones), so that a bright aorta
    touching the vertebra on one side (arterial phase) does not move the front forward.
    """
    band = np.abs(vw[:, 0] - spine_lr) <= FRONT_BAND_MM
    cols = np.round((vw[band, 0] - spine_lr) / px).astype(np.int64)
    ap = vw[band, 1]
    order = np.lexsort((ap, cols))
    first = np.ones(order.size, dtype=bool)
    first[1:] = cols[order][1:] != cols[order][:-1]
    return float(np.percentile(ap[order][first], 65.0))


def _plane_world(aff: np.ndarray, j: np.ndarray, i: np.ndarray) -> np.ndarray:
    """LPS offsets (x, y) of in-plane pixels (j, i), ignoring the slice axis (N, 2)."""
    return np.stack([aff[0, 1] * j + aff[0, 2] * i, aff[1, 1] * j + aff[1, 2] * i], axis=1)


def _disc(radius_px: tuple[float, float]) -> np.ndarray:
    ry, rx = max(radius_px[0], 1.0), max(radius_px[1], 1.0)
    y, x = np.mgrid[-int(ry) : int(ry) + 1, -int(rx) : int(rx) + 1]
    disc = ((y / ry) ** 2 + (x / rx) ** 2 <= 1.0).astype(np.float32)
    return disc / disc.sum()


def _spine_window(
    bone: np.ndarray,
    body: np.ndarray,
    *,
    py: float,
    px: float,
    col_dir: np.ndarray,
    row_dir: np.ndarray,
) -> np.ndarray | None:
    """In-plane mask 8-75 mm anterior and -30..+45 mm left of the vertebral body, or None."""
    lab, nb = ndi.label(bone & body)
    if nb == 0 or not body.any():
        return None
    ids = np.arange(1, nb + 1)
    cms = ndi.center_of_mass(bone, lab, ids)
    sizes = ndi.sum_labels(bone, lab, ids)
    bcy, bcx = ndi.center_of_mass(body)
    ant, left = np.array([0.0, -1.0, 0.0]), np.array([1.0, 0.0, 0.0])
    best = None
    for (cy, cx), sz in zip(cms, sizes, strict=True):
        if sz * py * px < 300.0:  # < 3 cm2: a rib or a calcification, not a vertebra
            continue
        v = (cy - bcy) * py * col_dir + (cx - bcx) * px * row_dir
        score = abs(v @ left) + max(v @ ant, 0.0)  # near the midline, posterior
        if best is None or score < best[0]:
            best = (score, cy, cx)
    if best is None:
        return None
    _, cy, cx = best
    jj, ii = np.mgrid[0 : bone.shape[0], 0 : bone.shape[1]]
    vec = ((jj - cy) * py)[..., None] * col_dir + ((ii - cx) * px)[..., None] * row_dir
    a, lft = vec @ ant, vec @ left
    return (a > 8) & (a < 75) & (lft > -30) & (lft < 45)


def aortic_blood_pool_hu(
    hu: np.ndarray, affine: np.ndarray, *, disc_mm: float = 4.0, slab_mm: float = 80.0
) -> tuple[float, int]:
    """Blood-pool attenuation (HU) of an axial ``(z, y, x)`` volume and the slices it was measured on.

    The measure :func:`measure_phase` decides the phase with (host code: a few 2-D images).

    Looks for the aorta as the brightest column that is homogeneous along z: on a central slab
    (``slab_mm`` along z, slices at least 2 mm apart, in-plane pixels ~1.5 mm) every in-plane
    position gets the mean over a disc of radius ``disc_mm`` on each slice; positions whose disc
    stays in soft tissue (-50..600 HU) on every slice, more than 3 mm from bone (> 400 HU, holes
    filled), with an SD along z < 25 HU and in-plane SD < 40 HU are candidates; vertebrae and
    intervertebral discs alternate along z and fail.  With a vertebral body found, candidates
    are limited to 8-75 mm anterior and -30..+45 mm to the patient's left of it (aorta, IVC).
    The estimate is the mean of the brightest 0.5 cm2 of candidates.  NaN when none is found.
    """
    arr, aff = hu, np.asarray(affine, dtype=np.float64)
    nz = arr.shape[0]
    dz, dy, dx = (float(v) for v in spacing_from_affine(aff))
    kz = max(1, int(round(2.0 / dz)))
    sy, sx = max(1, int(round(1.5 / dy))), max(1, int(round(1.5 / dx)))
    py, px, mm = dy * sy, dx * sx, min(dy * sy, dx * sx)
    n_slab = max(3, min(nz, int(round(slab_mm / dz))))
    k0 = max(0, nz // 2 - n_slab // 2)
    slab = np.asarray(arr[k0 : k0 + n_slab : kz, ::sy, ::sx], dtype=np.float32)
    if slab.shape[0] < 2:
        return float("nan"), 0
    disc = _disc((disc_mm / py, disc_mm / px))
    mean = ndi.convolve(slab, disc[None], mode="nearest")
    sd = np.sqrt(np.maximum(ndi.convolve(slab * slab, disc[None], mode="nearest") - mean**2, 0))
    soft = ndi.binary_erosion((slab > -50) & (slab < 600), structure=disc[None] > 0).all(0)
    grow = max(1, int(round(2.0 / mm)))
    bone = ndi.binary_fill_holes(ndi.binary_closing((slab > 400).any(0), iterations=grow))
    bone_ex = ndi.binary_dilation(bone, iterations=max(1, int(round(3.0 / mm))))
    ok = soft & ~bone_ex & (mean.std(0) < 25.0) & (sd.mean(0) < 40.0)
    window = _spine_window(
        bone, (slab > -400).all(0), py=py, px=px, col_dir=aff[:3, 1] / dy, row_dir=aff[:3, 2] / dx
    )
    if window is not None:
        ok &= window
    if not ok.any():
        return float("nan"), 0
    vals = np.sort(mean.mean(0)[ok])[::-1]
    top = max(1, int(round(50.0 / (py * px))))
    return float(vals[:top].mean()), int(slab.shape[0])


class Phase(StrEnum):
    """Contrast phase of a series as its image shows it (from the aortic blood pool)."""

    NON_CONTRAST = "non_contrast"
    CONTRAST = "contrast"
    INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class PhaseMeasure:
    """The one phase measurement of a study (:func:`measure_phase`).

    Attributes:
        estimate: what the blood pool says.
        blood_pool_hu: the aortic blood pool (median HU, see :func:`find_blood_pool`); ``None``
            when it could not be measured.
        reason: one line for humans (value, thresholds, or why nothing was measured).
    """

    estimate: Phase
    blood_pool_hu: float | None
    reason: str


def measure_phase(
    hu: Any,
    affine: np.ndarray,
    *,
    noncontrast_max_hu: float,
    contrast_min_hu: float,
    backend: str = "auto",
) -> PhaseMeasure:
    """Decide a series' contrast phase from its aortic blood pool: the ONE phase decision.

    ``hu``: ``(z, y, x)`` HU; ``affine``: index ``(k, j, i, 1)`` -> LPS mm.  Blood pool
    <= ``noncontrast_max_hu`` -> non-contrast, >= ``contrast_min_hu`` -> contrast, in between ->
    indeterminate (also when no blood pool is found: no spine, no body, no homogeneous aorta).
    Non-contrast aorta is about 35-50 HU, portal-venous 150-200 HU (DOMAIN.md: under about 70 HU
    means no contrast).  The measure is :func:`aortic_blood_pool_hu` (discs on an 80 mm slab,
    homogeneous along z, anterior of the vertebral body), chosen over :func:`find_blood_pool`
    because it also finds an enhanced aorta on real CT at 3 mm, where the latter's vertebra front
    is pulled forward by an aorta touching the spine (tests/test_real_ct.py).  ``backend`` is
    accepted for the common signature; the work is host code on a few small images.
    """
    if not contrast_min_hu >= noncontrast_max_hu:
        raise MeasurementError(
            f"contrast_min_hu={contrast_min_hu} must be >= noncontrast_max_hu={noncontrast_max_hu}",
            code="bad_input",
        )
    value, n = aortic_blood_pool_hu(to_host(hu), affine)
    if n == 0 or not np.isfinite(value):
        return PhaseMeasure(
            Phase.INDETERMINATE, None, "blood pool not measured: no homogeneous aorta-like column"
        )
    if value <= noncontrast_max_hu:
        est, how = Phase.NON_CONTRAST, f"<= {noncontrast_max_hu:g}"
    elif value >= contrast_min_hu:
        est, how = Phase.CONTRAST, f">= {contrast_min_hu:g}"
    else:
        est, how = Phase.INDETERMINATE, f"between {noncontrast_max_hu:g} and {contrast_min_hu:g}"
    return PhaseMeasure(est, round(value, 1), f"blood pool {value:.0f} HU {how} HU: {est}")
