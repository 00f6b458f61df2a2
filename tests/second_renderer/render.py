"""The second renderer's image formation: tissue map, HU calibration, slab, blur, noise, d'.

Deliberately unlike :mod:`pdacscreen.io.phantom.subject`:

* **HU calibration**: its own table (below), no organ texture (every organ is uniform), plus a
  global offset of 3-8 HU (either sign) on every tissue but air and gas (a miscalibrated scanner).
* **Slab profile**: three sub-slices at ``-thk/3, 0, +thk/3`` weighted 1/4, 1/2, 1/4 (triangular)
  instead of equal weights; slice thicknesses 2, 3, 4 or 6 mm (6 mm is outside the generator's).
* **Blur**: in-plane Gaussian of 0.4-1.1 mm sigma.
* **Noise**: stationary (no body-shaped amplitude map), either *white* (independent voxels) or
  *streaky* (white noise filtered along x only by a 1-D Gaussian of 1.5-3.5 pixels: horizontal
  streaks), 10-24 HU standard deviation, then rounded to integer HU.

**d'** is the same known-location NPW detectability as :mod:`pdacscreen.io.phantom.observer`,
computed with its :func:`~pdacscreen.io.phantom.observer.npw_dprime` on the noise-free signal
``s`` (the lesion's neighbourhood rendered with and without the lesion, after slab and blur) and this
noise's power spectrum: ``sigma^2`` in every bin for white noise, ``sigma^2 |H(f_x)|^2 / mean|H|^2``
for streaky noise (constant along ``f_y`` and ``f_z``), plus the rounding's white ``1/12 HU^2``.
For white noise the formula has the closed form ``d'^2 = sum(s^2) / (sigma^2 + 1/12)``; for a
uniform sphere of contrast ``C`` over ``N`` voxels (no blur) ``d'^2 = C^2 N / (sigma^2 + 1/12)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pdacscreen.io.phantom.observer import QUANTISATION_VAR, npw_dprime
from tests.second_renderer.anatomy import Blob, SRAnatomy

__all__ = [
    "TISSUES",
    "Acquisition",
    "draw_hu",
    "paint",
    "form_image",
    "add_noise",
    "noise_nps",
    "lesion_dprime",
    "SLAB_OFFSETS",
    "SLAB_WEIGHTS",
]

TISSUES = (
    "air sfat muscle vfat liver spleen kidney stomach bowel gas duodenum panc pdac cyst artery vein"
    " cortex vertebra canal psoas table"
).split()
ID = {name: i for i, name in enumerate(TISSUES)}
SLAB_OFFSETS = np.array([-1 / 3, 0.0, 1 / 3])  # in units of the slice thickness
SLAB_WEIGHTS = np.array([0.25, 0.5, 0.25])
_TRUNCATE = 4.0


@dataclass(frozen=True)
class Acquisition:
    """How one series is formed: grids (body frame, mm, ascending), slab, blur, noise."""

    gz: np.ndarray
    gy: np.ndarray
    gx: np.ndarray
    thickness_mm: float
    psf_sigma_mm: float
    noise_kind: str  # "white" | "streaky"
    noise_hu: float
    streak_px: float  # 1-D Gaussian sigma along x (pixels), streaky noise only

    @property
    def dx(self) -> float:
        return float(self.gx[1] - self.gx[0])


def draw_hu(rng: np.random.Generator, *, fatty: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-subject (non-contrast, portal-venous) HU per tissue id, and the global offset (HU)."""
    u = rng.uniform
    nc = np.zeros(len(TISSUES), np.float32)
    pv = np.zeros(len(TISSUES), np.float32)
    blood = u(30, 45)

    def put(name, n, p=None):
        nc[ID[name]] = n
        pv[ID[name]] = n if p is None else p

    fat = u(-105, -75)
    put("air", -1000.0)
    put("sfat", fat)
    put("vfat", fat + u(-5, 5))
    put("muscle", u(45, 60), u(58, 75))
    put("psoas", u(45, 60), u(58, 75))
    liver = u(50, 68)
    put("liver", liver, liver + u(40, 60))
    put("spleen", u(42, 52), u(105, 125))
    put("kidney", u(28, 38), u(140, 185))
    put("stomach", u(5, 20))
    put("bowel", u(10, 35), u(20, 50))
    put("duodenum", u(0, 18))
    put("gas", u(-990, -950))
    panc = u(12, 28) if fatty else u(32, 48)
    put("panc", panc, panc + u(50, 75))
    put("pdac", 0.0)  # the parenchyma plus the lesion's delta (form_image)
    put("cyst", u(2, 15))
    put("artery", blood, u(150, 200))
    put("vein", blood, u(140, 180))
    put("cortex", u(650, 950))
    put("vertebra", u(170, 320))
    put("canal", u(10, 25))
    put("table", u(-300, -200))
    offset = float(rng.choice([-1.0, 1.0]) * u(3, 8))
    for lut in (nc, pv):
        keep = np.isin(np.arange(len(TISSUES)), [ID["air"], ID["gas"]])
        lut[~keep] += offset
    return nc, pv, offset


def _box(g: np.ndarray, lo: float, hi: float) -> slice:
    return slice(int(np.searchsorted(g, lo)), int(np.searchsorted(g, hi, "right")))


def _blob(tissue, zs, gy, gx, b: Blob, value: int, *, only: np.ndarray | None = None) -> None:
    c, s = np.asarray(b.center, float), np.asarray(b.semi, float)
    sl = (_box(zs, c[2] - s[2], c[2] + s[2]), _box(gy, c[1] - s[1], c[1] + s[1]))
    sl = (*sl, _box(gx, c[0] - s[0], c[0] + s[0]))
    if any(x.stop <= x.start for x in sl):
        return
    e = b.exponent
    z = np.abs((zs[sl[0]] - c[2]) / s[2])[:, None, None] ** e
    y = np.abs((gy[sl[1]] - c[1]) / s[1])[None, :, None] ** e
    x = np.abs((gx[sl[2]] - c[0]) / s[0])[None, None, :] ** e
    inside = (z + y + x) <= 1.0
    view = tissue[sl]
    if only is not None:
        inside &= np.isin(view, only)
    view[inside] = value


def _gland(an: SRAnatomy, zs, gy, gx, *, scale: float = 1.0) -> tuple[np.ndarray, tuple]:
    """Mask of the gland (cross-sections times ``scale``) on its bounding box, and that box."""
    g = an.gland
    xs = gx[_box(gx, g.x0, g.x1)]
    if len(xs) == 0:
        return np.zeros((0, 0, 0), bool), (slice(0, 0),) * 3
    yc, zc, ry = g.centre(xs)
    ry = ry * scale
    rz = ry * g.z_ratio
    sx = _box(gx, g.x0, g.x1)
    sy = _box(gy, float((yc - ry).min()), float((yc + ry).max()))
    sz = _box(zs, float((zc - rz).min()), float((zc + rz).max()))
    e = g.exponent
    dz = np.abs((zs[sz][:, None, None] - zc[None, None, :]) / rz[None, None, :]) ** e
    dy = np.abs((gy[sy][None, :, None] - yc[None, None, :]) / ry[None, None, :]) ** e
    body = (dz + dy) <= 1.0
    return body, (sz, sy, sx)


def _lesion_mask(an: SRAnatomy, zs, gy, gx) -> tuple[np.ndarray, tuple]:
    les = an.lesion
    r = les.radius * np.asarray(les.axes, float) * (1.0 + sum(les.bumps))
    c = les.center
    sl = (_box(zs, c[2] - r[2], c[2] + r[2]), _box(gy, c[1] - r[1], c[1] + r[1]))
    sl = (*sl, _box(gx, c[0] - r[0], c[0] + r[0]))
    z = (zs[sl[0]] - c[2])[:, None, None]
    y = (gy[sl[1]] - c[1])[None, :, None]
    x = (gx[sl[2]] - c[0])[None, None, :]
    a = les.radius * np.asarray(les.axes, float)
    rho = np.sqrt((x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2)
    bound = 1.0
    if les.bumps:
        phi = np.arctan2(y, x)
        norm = np.sqrt(x**2 + y**2 + z**2)
        theta = np.arccos(np.clip(z / np.maximum(norm, 1e-9), -1.0, 1.0))
        b = les.bumps
        bound = 1.0 + b[0] * np.cos(2 * phi) + b[1] * np.cos(3 * theta) + b[2] * np.cos(phi + theta)
    return rho <= bound, sl


def paint(
    an: SRAnatomy, zs: np.ndarray, gy: np.ndarray, gx: np.ndarray, *, with_lesion: bool = True
) -> np.ndarray:
    """Tissue ids ``(z, y, x)`` uint8 at the points ``zs x gy x gx`` (body frame mm).

    The tumour enlarges the gland: the lesion's voxels (inside the gland's envelope, its
    cross-sections times 1.35) are lesion tissue, or parenchyma with ``with_lesion=False`` (the
    lesion-absent image of the d' signal, which so holds only the lesion's contrast to the gland).
    """
    tissue = np.zeros((len(zs), len(gy), len(gx)), np.uint8)
    A, B = an.cavity
    fat, mus = an.fat_mm, an.muscle_mm
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    table_y = B + mus + fat + 12
    tissue[:, (yy > table_y) & (yy < table_y + 8)] = ID["table"]
    for name, add in (("sfat", mus + fat), ("muscle", mus), ("vfat", 0.0)):
        # a flatter back: the posterior half is a superellipse of exponent 3
        e = np.where(yy > 0, 3.0, 2.0)
        r = np.abs(xx / (A + add)) ** e + np.abs(yy / (B + add)) ** e
        tissue[:, r <= 1.0] = ID[name]
    for b in an.blobs:
        if b.tissue == "vertebra":
            _blob(tissue, zs, gy, gx, dataclasses.replace(b, tissue="cortex"), ID["cortex"])
            b = dataclasses.replace(b, semi=tuple(np.asarray(b.semi) - (2.5, 2.5, 0)))
        only = [ID["vfat"], ID["bowel"], ID["gas"]] if b.tissue in ("bowel", "gas") else None
        _blob(tissue, zs, gy, gx, b, ID[b.tissue], only=only)
    _blob(tissue, zs, gy, gx, an.gland.head, ID["panc"])
    body, sl = _gland(an, zs, gy, gx)
    tissue[sl][body] = ID["panc"]
    if an.lesion is not None:
        hull, hsl = _gland(an, zs, gy, gx, scale=1.35)
        envelope = np.zeros(tissue.shape, bool)
        envelope[hsl] = hull
        head = dataclasses.replace(an.gland.head, semi=tuple(1.35 * np.asarray(an.gland.head.semi)))
        hmask = np.zeros(tissue.shape, np.uint8)
        _blob(hmask, zs, gy, gx, head, 1)
        envelope |= hmask.astype(bool)
        les, lsl = _lesion_mask(an, zs, gy, gx)
        les &= envelope[lsl]
        kind = ID["pdac" if an.lesion.kind == "pdac" else "cyst"]
        tissue[lsl][les] = kind if with_lesion else ID["panc"]
    for v in an.vessels:
        _blob(tissue, zs, gy, gx, v, ID[v.tissue])
    return tissue


def form_image(
    an: SRAnatomy,
    acq: Acquisition,
    lut: np.ndarray,
    *,
    delta: float,
    with_lesion: bool = True,
    gz=None,
    gy=None,
    gx=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image ``(z, y, x)`` float32 HU (slab + blur) and the centre sub-slice tissue.

    ``gz``/``gy``/``gx`` default to the acquisition's grid (pass a sub-grid for a box).
    """
    gz = acq.gz if gz is None else gz
    gy = acq.gy if gy is None else gy
    gx = acq.gx if gx is None else gx
    zs = (gz[:, None] + SLAB_OFFSETS[None, :] * acq.thickness_mm).ravel()
    tissue = paint(an, zs, gy, gx, with_lesion=with_lesion).reshape(
        len(gz), len(SLAB_OFFSETS), len(gy), len(gx)
    )
    lut = lut.copy()
    lut[ID["pdac"]] = lut[ID["panc"]] + delta
    img = np.zeros((len(gz), len(gy), len(gx)), np.float32)
    for k, w in enumerate(SLAB_WEIGHTS):
        img += np.float32(w) * lut[tissue[:, k]]
    s = acq.psf_sigma_mm / acq.dx
    img = ndimage.gaussian_filter(img, (0, s, s), mode="nearest")
    return img, tissue[:, len(SLAB_OFFSETS) // 2]


def _streak_kernel_power(nx: int, sigma_px: float) -> np.ndarray:
    delta = np.zeros(nx)
    delta[0] = 1.0
    k = ndimage.gaussian_filter1d(delta, sigma_px, mode="wrap", truncate=_TRUNCATE)
    return np.abs(np.fft.fft(k)) ** 2


def noise_nps(acq: Acquisition, nx: int) -> np.ndarray | float:
    """Noise power per DFT bin (HU^2, mean = variance): a scalar (white) or ``(nx,)`` along x."""
    var = float(acq.noise_hu) ** 2
    if acq.noise_kind == "white":
        return var
    p = _streak_kernel_power(nx, acq.streak_px)
    return var * p / p.mean()


def add_noise(img: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """``img`` plus this acquisition's noise (unit-variance shape times ``noise_hu``), in place."""
    n = rng.standard_normal(img.shape, dtype=np.float32)
    if acq.noise_kind == "streaky":
        n = ndimage.gaussian_filter1d(n, acq.streak_px, axis=2, mode="wrap", truncate=_TRUNCATE)
        n /= np.float32(np.sqrt(_streak_kernel_power(4096, acq.streak_px).mean()))
    img += np.float32(acq.noise_hu) * n
    return img


def lesion_dprime(an: SRAnatomy, acq: Acquisition, lut: np.ndarray) -> dict[str, float]:
    """NPW d' (known location) of the lesion in this acquisition and its contrast (HU)."""
    les = an.lesion
    if les is None:
        return {"lesion_dprime": float("nan"), "lesion_effective_contrast_hu": float("nan")}
    r = les.radius * float(max(les.axes)) * (1.0 + sum(les.bumps)) + 4 * acq.psf_sigma_mm + 6
    c = les.center
    gz = acq.gz[_box(acq.gz, c[2] - r - acq.thickness_mm, c[2] + r + acq.thickness_mm)]
    gy = acq.gy[_box(acq.gy, c[1] - r, c[1] + r)]
    gx = acq.gx[_box(acq.gx, c[0] - r, c[0] + r)]
    delta = les.delta_nc
    with_l, tissue = form_image(an, acq, lut, delta=delta, gz=gz, gy=gy, gx=gx)
    without, _ = form_image(an, acq, lut, delta=delta, with_lesion=False, gz=gz, gy=gy, gx=gx)
    s = with_l.astype(np.float64) - without.astype(np.float64)
    pad = int(_TRUNCATE * acq.streak_px + 1) + 1 if acq.noise_kind == "streaky" else 0
    s = np.pad(s, ((0, 0), (0, 0), (pad, pad)))
    d = npw_dprime(s, nps=noise_nps(acq, s.shape[2]), white_var=QUANTISATION_VAR)
    inside = (tissue == ID["pdac"]) | (tissue == ID["cyst"])
    contrast = float(s[:, :, pad : s.shape[2] - pad][inside].mean()) if inside.any() else 0.0
    return {"lesion_dprime": round(float(d), 4), "lesion_effective_contrast_hu": round(contrast, 3)}
