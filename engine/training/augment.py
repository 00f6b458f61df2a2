"""Training patches with augmentation, from cached HU volumes and label maps (CPU, NumPy/SciPy).

Arrays are ``(z, y, x)``: HU float (any float dtype) and labels uint8 on a fixed isotropic grid.
One call of :func:`sample_patch` draws a patch of ``patch`` voxels with, in this order:

* a random geometric transform: rotation (about z up to ``rot_z_deg``, about x/y up to
  ``rot_xy_deg``), scale (spacing change, ``scale``), optional left-right flip; HU by trilinear,
  labels by nearest-neighbour interpolation;
* intensity: ``hu * a + b`` (``intensity_scale``, ``intensity_shift_hu``), a Gaussian blur of
  random width (slice-thickness / kernel variation) and white noise of random sigma
  (``noise_hu``) -- robustness beyond the phantom generator's own ranges.

Everything random comes from the ``numpy.random.Generator`` passed in (deterministic for a seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["AugmentConfig", "sample_patch", "NO_AUGMENT"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation (all symmetric about the identity)."""

    rot_z_deg: float = 10.0
    rot_xy_deg: float = 4.0
    scale: tuple[float, float] = (0.9, 1.12)
    flip_lr: float = 0.2
    intensity_scale: tuple[float, float] = (0.95, 1.05)
    intensity_shift_hu: float = 10.0
    noise_hu: tuple[float, float] = (0.0, 10.0)
    blur_sigma_vox: tuple[float, float] = (0.0, 0.6)
    p_blur: float = 0.2


NO_AUGMENT = AugmentConfig(
    rot_z_deg=0.0,
    rot_xy_deg=0.0,
    scale=(1.0, 1.0),
    flip_lr=0.0,
    intensity_scale=(1.0, 1.0),
    intensity_shift_hu=0.0,
    noise_hu=(0.0, 0.0),
    blur_sigma_vox=(0.0, 0.0),
    p_blur=0.0,
)


def _rotation_zyx(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A 3x3 rotation acting on (z, y, x) index vectors."""
    az, ay, ax = np.radians(
        [rng.uniform(-cfg.rot_z_deg, cfg.rot_z_deg)]
        + list(rng.uniform(-cfg.rot_xy_deg, cfg.rot_xy_deg, 2))
    )
    # rotation in the axial plane (about z) mixes y and x
    rz = np.array([[1, 0, 0], [0, np.cos(az), -np.sin(az)], [0, np.sin(az), np.cos(az)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rx = np.array([[np.cos(ax), -np.sin(ax), 0], [np.sin(ax), np.cos(ax), 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_patch(
    hu: np.ndarray,
    label: np.ndarray,
    *,
    centre: np.ndarray,
    patch: tuple[int, int, int],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    fill_hu: float = -1024.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``(patch)`` window centred near ``centre`` (float index ``(z, y, x)``).

    Returns ``(hu_patch float32, label_patch uint8)``.
    """
    rot = _rotation_zyx(rng, cfg)
    s = rng.uniform(*cfg.scale)
    aniso = rng.uniform(0.95, 1.05, 3) if cfg.scale != (1.0, 1.0) else np.ones(3)
    scale = np.diag(s * aniso)
    flip = np.diag([1.0, 1.0, -1.0 if rng.random() < cfg.flip_lr else 1.0])
    m = rot @ scale @ flip  # output index offset -> input index offset
    out_c = (np.asarray(patch, float) - 1.0) / 2.0
    offset = np.asarray(centre, float) - m @ out_c
    identity = np.allclose(m, np.eye(3))
    if identity:
        start = np.round(offset).astype(int)
        hu_p = _window(hu, start, patch, fill_hu).astype(np.float32)
        lab_p = _window(label, start, patch, 0)
    else:
        hu_p = ndimage.affine_transform(
            hu.astype(np.float32, copy=False),
            m,
            offset=offset,
            output_shape=patch,
            order=1,
            mode="constant",
            cval=fill_hu,
        )
        lab_p = ndimage.affine_transform(
            label, m, offset=offset, output_shape=patch, order=0, mode="constant", cval=0
        )
    a = rng.uniform(*cfg.intensity_scale)
    b = rng.uniform(-cfg.intensity_shift_hu, cfg.intensity_shift_hu)
    tissue = hu_p > -900.0  # leave air alone
    hu_p = np.where(tissue, hu_p * a + b, hu_p).astype(np.float32)
    if cfg.p_blur and rng.random() < cfg.p_blur:
        sigma = rng.uniform(*cfg.blur_sigma_vox)
        if sigma > 0.05:
            hu_p = ndimage.gaussian_filter(hu_p, sigma=(sigma, sigma * 0.5, sigma * 0.5))
    sigma_n = rng.uniform(*cfg.noise_hu)
    if sigma_n > 0:
        hu_p = hu_p + rng.normal(0.0, sigma_n, hu_p.shape).astype(np.float32)
    return hu_p.astype(np.float32, copy=False), lab_p.astype(np.uint8, copy=False)


def _window(a: np.ndarray, start: np.ndarray, patch: tuple[int, int, int], fill) -> np.ndarray:
    """Axis-aligned window with constant padding outside ``a``."""
    out = np.full(patch, fill, dtype=a.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch, a.shape, strict=True):
        lo, hi = max(s, 0), min(s + p, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = a[tuple(src)]
    return out
