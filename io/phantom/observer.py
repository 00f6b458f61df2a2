"""Ideal-observer visibility of a phantom lesion: known-location NPW detectability d'.

The generator knows everything about its images, so it can say how visible each lesion is before
any model looks at it.  :func:`lesion_images` renders the lesion's neighbourhood twice with the
subject's own anatomy, attenuation table, slab profile and point-spread function, once with and once
without the lesion (``Anatomy.lesion = None``; everything else, random fields included, is the same,
so duct dilation and atrophy stay in both: the signal is the tumour itself).  Without noise, their
difference is the expected signal ``s`` (HU, ``(z, y, x)``) a lesion adds to the series.

**Non-prewhitening matched filter (NPW).**  The observer correlates the image with ``s`` at the
known location, ``t = s . g``.  With Gaussian noise of covariance ``K`` the statistic's mean differs
by ``s . s`` between lesion present and absent, and its variance is ``s^T K s``, so::

    d'^2 = (s^T s)^2 / (s^T K s)

For white noise of variance ``sigma^2`` this is ``sum(s^2) / sigma^2``; for a uniform sphere of
contrast ``C`` covering ``N`` voxels (``N = V / v`` for volume ``V`` and voxel volume ``v``),
``d'^2 = C^2 N / sigma^2``.  The prewhitening observer (the ideal observer for a known signal in
Gaussian noise) reaches ``d'^2 = s^T K^-1 s``, never less than the NPW's (Cauchy-Schwarz).

**The generator's noise model** (:func:`pdacscreen.io.phantom.subject._noise`): white Gaussian
noise filtered in-plane by a Gaussian of ``grain_px`` pixels, scaled to unit variance, times the
amplitude map ``a(y, x)`` (HU); slices are independent; the image is then rounded to integer HU
(a uniform quantisation error, variance 1/12 HU^2, independent of everything).  So
``K = A C A + I / 12`` with ``A = diag(a)`` and ``C`` stationary, and::

    s^T K s = (1 / N) sum_f |F[a s](f)|^2 P(f)  +  (1 / 12) sum s^2

where ``F`` is the 3-D DFT over the neighbourhood box (``N`` voxels), ``P(f) = |H(fy, fx)|^2 /
mean |H|^2`` the unit-variance noise power spectrum (the DFT ``H`` of the generator's own discrete
Gaussian kernel, normalised by Parseval; constant along ``fz`` because slices are independent).
This is Parseval's theorem for a circular convolution; it equals the generator's filtering because
the box is zero-padded in-plane by more than the kernel's radius, and it is exact for the spatially
varying amplitude because ``a`` multiplies the signal before the transform.  Assumptions: the
anatomy behind the lesion is known to the observer (a known-location, known-background task: no
anatomical noise from textures or lobulation); partial-volume point sources (calcifications) are
in both renders, so they cancel; clipping at -1024 / 3071 HU never reaches the pancreas; the
non-contrast phase only (the series pdacscreen screens).

**Effective contrast**: the mean of the noise-free image over the lesion's core minus its mean
over the surrounding gland, HU (negative when hypo-attenuating; positive for a fat-free tumour in
a fatty gland).  The core is the lesion's voxels (all sub-slices inside the lesion) deeper than the
blur margin ``max(1 mm, 2 PSF sigmas)`` from other tissue; the surrounding gland is the voxels of
pure parenchyma 3-10 mm from the lesion (label 2) and deeper than that margin from anything that is
not parenchyma (fat, duct, vessels), so that partial volume with the gland's surroundings does not
count as contrast.  Where a mask is empty (tiny lesion, thin gland) the shallow one is used: label 2,
or parenchyma-majority voxels; with no gland at all, the without-lesion image over the lesion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtr, ndtri

from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.anatomy import Anatomy
from pdacscreen.io.phantom.render import attenuation, render
from pdacscreen.io.phantom.shapes import Canvas
from pdacscreen.io.phantom.tissue import T

__all__ = [
    "ImageFormation",
    "LesionImages",
    "QUANTISATION_VAR",
    "generator_nps",
    "lesion_images",
    "lesion_visibility",
    "npw_dprime",
    "npw_sensitivity",
    "prewhitening_dprime",
]

QUANTISATION_VAR = 1.0 / 12.0  # HU^2: rounding to integer HU
RING_MM = (3.0, 10.0)  # the surrounding gland for the effective contrast
_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default kernel radius, in sigmas


@dataclass(frozen=True)
class ImageFormation:
    """How :func:`~pdacscreen.io.phantom.subject.make_subject` forms one phase's image.

    Attributes:
        gz: slice centres, body-frame mm (ascending); ``gy``, ``gx``: row and column centres, mm.
        sub_offsets: z offsets (mm) of the sub-slices averaged into each slice (slab profile).
        lut, texture_lut: per-tissue HU and texture amplitude (HU) of the phase.
        lesion_delta: HU the PDAC core lies below the parenchyma in this phase.
        psf_sigma_px: in-plane point-spread function (Gaussian sigma, pixels).
        grain_px: in-plane noise correlation (Gaussian sigma, pixels).
        noise_amp_hu: ``(y, x)`` noise standard deviation map (HU) over the whole slice.
    """

    gz: np.ndarray
    gy: np.ndarray
    gx: np.ndarray
    sub_offsets: np.ndarray
    lut: np.ndarray
    texture_lut: np.ndarray
    lesion_delta: float
    psf_sigma_px: float
    grain_px: float
    noise_amp_hu: np.ndarray


@dataclass(frozen=True)
class LesionImages:
    """Noise-free images of a lesion's neighbourhood, ``(z, y, x)`` float32 HU.

    ``box`` are the slices of the neighbourhood in the subject's grid; ``lesion`` (label 2),
    ``core`` and ``gland`` are boolean masks (see the module); ``spacing`` is (dz, dy, dx) mm.
    """

    with_lesion: np.ndarray
    without_lesion: np.ndarray
    lesion: np.ndarray
    core: np.ndarray
    gland: np.ndarray
    box: tuple[slice, slice, slice]
    spacing: tuple[float, float, float]

    @property
    def signal(self) -> np.ndarray:
        """The expected signal ``s`` (float64 HU): with minus without."""
        return self.with_lesion.astype(np.float64) - self.without_lesion.astype(np.float64)


def generator_nps(shape_yx: tuple[int, int], *, grain_px: float) -> np.ndarray:
    """Unit-variance in-plane NPS ``(ny, nx)`` (DFT bins, numpy order) of the generator's noise.

    ``|H|^2 / mean |H|^2`` with ``H`` the DFT of the discrete Gaussian kernel exactly as
    ``scipy.ndimage.gaussian_filter`` applies it; needs a grid wider than the kernel.
    """
    ny, nx = (int(n) for n in shape_yx)
    radius = int(_TRUNCATE * float(grain_px) + 0.5)
    if min(ny, nx) < 2 * radius + 1:
        raise InputError(
            f"shape_yx must be at least {2 * radius + 1} wide for grain_px={grain_px}, "
            f"got {(ny, nx)}",
            code="bad_shape",
        )
    delta = np.zeros((ny, nx))
    delta[0, 0] = 1.0
    kern = ndimage.gaussian_filter(delta, float(grain_px), mode="wrap")
    power = np.abs(np.fft.fft2(kern)) ** 2
    return power / power.mean()


def _spectrum(signal: np.ndarray) -> np.ndarray:
    s = np.asarray(signal, np.float64)
    if s.ndim != 3:
        raise InputError(f"signal must be a 3-D (z, y, x) array, got shape {s.shape}")
    return np.abs(np.fft.fftn(s)) ** 2


def npw_dprime(
    signal: np.ndarray,
    *,
    nps: np.ndarray | float,
    amplitude: np.ndarray | float | None = None,
    white_var: float = 0.0,
) -> float:
    """Known-location NPW detectability ``d' = s.s / sqrt(s^T K s)`` (0 for a zero signal).

    ``signal``: ``(z, y, x)`` expected signal (HU).  ``nps``: noise power per DFT bin (HU^2,
    normalised so that stationary noise of variance sigma^2 has ``mean(nps) == sigma^2``), of
    shape ``(z, y, x)``, ``(y, x)`` (constant along z: independent slices) or a scalar (white).
    ``amplitude`` (broadcastable to the signal): the noise is ``amplitude`` times that stationary
    noise.  ``white_var``: an added independent white term (HU^2).  The transform is circular over
    the array: zero-pad the signal by more than the noise correlation length.
    """
    s = np.asarray(signal, np.float64)
    ss = float(np.sum(s * s))
    if ss == 0.0:
        return 0.0
    u = s if amplitude is None else s * np.asarray(amplitude, np.float64)
    power = _spectrum(u)
    sks = float(np.sum(power * np.asarray(nps, np.float64))) / s.size + white_var * ss
    if not sks > 0.0:
        raise InputError(f"noise variance along the signal must be > 0, got {sks}")
    return ss / np.sqrt(sks)


def prewhitening_dprime(signal: np.ndarray, *, nps: np.ndarray | float) -> float:
    """Known-location prewhitening (ideal, Gaussian noise) ``d' = sqrt(s^T K^-1 s)`` for stationary
    noise of power ``nps`` per DFT bin (as in :func:`npw_dprime`; must be > 0 everywhere)."""
    n = np.broadcast_to(np.asarray(nps, np.float64), np.shape(signal))
    if np.any(n <= 0):
        raise InputError("nps must be > 0 in every bin for the prewhitening observer")
    return float(np.sqrt(np.sum(_spectrum(signal) / n) / np.size(signal)))


def npw_sensitivity(dprime, *, specificity: float = 0.95) -> np.ndarray:
    """Sensitivity of a known-location observer with ``dprime`` at ``specificity``:
    ``Phi(d' - z_spec)`` (equal-variance Gaussian decision variable)."""
    if not 0.0 < specificity < 1.0:
        raise InputError(f"specificity must be in (0, 1), got {specificity!r}")
    return ndtr(np.asarray(dprime, np.float64) - float(ndtri(specificity)))


def _box(an: Anatomy, im: ImageFormation) -> tuple[slice, slice, slice]:
    """The lesion's painted box (as render pads it) plus the ring, PSF and slab margins."""
    les = an.lesion
    pad = 3.0 * les.soft_mm + 0.3 * max(les.semi)
    half = np.abs(np.asarray(les.rot, float)) @ (np.asarray(les.semi, float) + pad)
    c = np.asarray(les.center, float)
    dx = float(abs(im.gx[1] - im.gx[0])) if len(im.gx) > 1 else 1.0
    thk = float(im.gz[1] - im.gz[0]) if len(im.gz) > 1 else 1.0
    m_xy = RING_MM[1] + (_TRUNCATE * im.psf_sigma_px + 2) * dx
    m_z = RING_MM[1] + thk
    out = []
    for g, lo, hi in (
        (im.gz, c[2] - half[2] - m_z, c[2] + half[2] + m_z),
        (im.gy, c[1] - half[1] - m_xy, c[1] + half[1] + m_xy),
        (im.gx, c[0] - half[0] - m_xy, c[0] + half[0] + m_xy),
    ):
        out.append(slice(int(np.searchsorted(g, lo)), int(np.searchsorted(g, hi, "right"))))
    return tuple(out)


def _noise_free(an: Anatomy, im: ImageFormation, box) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image (after slab and PSF) and per-voxel sub-slice tissue on the box."""
    gz, gy, gx = im.gz[box[0]], im.gy[box[1]], im.gx[box[2]]
    sub = np.asarray(im.sub_offsets, float)
    zs = (gz[:, None] + sub[None, :]).ravel()
    tissue, fat, w = render(an, Canvas(zs, gy, gx))
    tex = an.fields["texture"].sample(zs, gy, gx)
    hu = attenuation(
        tissue, fat, w, tex, lut=im.lut, texture_lut=im.texture_lut, lesion_delta=im.lesion_delta
    )
    shape = (len(gz), len(sub), len(gy), len(gx))
    img = hu.reshape(shape).mean(axis=1)
    img = ndimage.gaussian_filter(img, (0, im.psf_sigma_px, im.psf_sigma_px), mode="nearest")
    return img.astype(np.float32), tissue.reshape(shape)


def lesion_images(an: Anatomy, im: ImageFormation) -> LesionImages:
    """Render the lesion's neighbourhood noise-free with and without the lesion (see module)."""
    if an.lesion is None:
        raise InputError("the anatomy has no lesion to observe", code="no_lesion")
    box = _box(an, im)
    with_img, tissue = _noise_free(an, im, box)
    without_img, _ = _noise_free(dataclasses.replace(an, lesion=None), im, box)
    les_frac = ((tissue == T.PDAC) | (tissue == T.CYST)).mean(axis=1)
    lesion = les_frac >= 0.5
    thk = float(im.gz[1] - im.gz[0]) if len(im.gz) > 1 else 1.0
    dx = float(abs(im.gx[1] - im.gx[0])) if len(im.gx) > 1 else 1.0
    spacing = (thk, dx, dx)
    if not lesion.any():  # partial volume left no lesion voxel: the centre's voxel (as labels do)
        c = np.asarray(an.lesion.center, float)
        kji = [
            int(np.argmin(np.abs(g[sl] - v)))
            for g, sl, v in ((im.gz, box[0], c[2]), (im.gy, box[1], c[1]), (im.gx, box[2], c[0]))
        ]
        lesion[tuple(kji)] = True
    margin = max(1.0, 2.0 * im.psf_sigma_px * dx)

    def deep(mask: np.ndarray) -> np.ndarray:  # farther than the blur margin in-plane
        return ndimage.distance_transform_edt(mask, sampling=(1e6, dx, dx)) > margin

    core = (les_frac == 1.0) & deep(les_frac == 1.0)
    dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    ring = ~lesion & (dist > RING_MM[0]) & (dist <= RING_MM[1])
    panc_frac = (tissue == T.PANC).mean(axis=1)
    parenchyma = ((tissue == T.PANC) | (tissue == T.PDAC)).all(axis=1)
    gland = ring & (panc_frac == 1.0) & deep(parenchyma)
    if not gland.any():
        gland = ring & (panc_frac >= 0.5)
    return LesionImages(
        with_img, without_img, lesion, core if core.any() else lesion, gland, box, spacing
    )


def lesion_visibility(an: Anatomy, im: ImageFormation) -> dict[str, float]:
    """``lesion_dprime`` (NPW, known location, see module) and ``lesion_effective_contrast_hu``
    of the anatomy's lesion in this phase; both NaN without a lesion."""
    if an.lesion is None:
        return {"lesion_dprime": float("nan"), "lesion_effective_contrast_hu": float("nan")}
    li = lesion_images(an, im)
    s = li.signal
    amp = np.asarray(im.noise_amp_hu, np.float64)[li.box[1], li.box[2]][None]
    r = int(_TRUNCATE * float(im.grain_px) + 0.5) + 1
    pad = ((0, 0), (r, r), (r, r))
    s_p, amp_p = np.pad(s, pad), np.pad(amp, pad, mode="edge")
    nps = generator_nps(s_p.shape[1:], grain_px=im.grain_px)
    dprime = npw_dprime(s_p, nps=nps, amplitude=amp_p, white_var=QUANTISATION_VAR)
    inside = float(li.with_lesion[li.core].mean())
    ref = li.with_lesion[li.gland] if li.gland.any() else li.without_lesion[li.lesion]
    return {
        "lesion_dprime": round(float(dprime), 4),
        "lesion_effective_contrast_hu": round(inside - float(ref.mean()), 3),
    }
