"""Paint an :class:`~pdacscreen.io.phantom.anatomy.Anatomy` into a tissue map on a canvas.

``render(anatomy, canvas)`` returns the tissue ids ``(z, y, x)`` uint8 (see
:class:`~pdacscreen.io.phantom.tissue.T`), the pancreatic fat fraction (0..1) and the PDAC weight
(0..1, 1 in the tumour core, fading over its infiltrative margin) on the same grid;
``attenuation(...)`` turns them into HU (the one formula: the subject and the observer use it).
The canvas axes are body-frame mm (see :mod:`pdacscreen.io.phantom.anatomy`).  Painting order sets
precedence: body wall, cavity fat, organs, pancreas (duct, lesion), lungs above the diaphragm,
heart, vessels, spine.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from pdacscreen.io.phantom.anatomy import Anatomy
from pdacscreen.io.phantom.shapes import Canvas, Ellipsoid, Tube
from pdacscreen.io.phantom.tissue import T

__all__ = ["attenuation", "render", "LUMBAR_Z", "RIB_HEAD_X"]

LUMBAR_Z = 30.0  # body-frame z (mm) below which a vertebra is lumbar (the first one is L1)
RIB_HEAD_X = 41.0  # lateral centre (mm) of the rib heads beside the thoracic vertebrae


def _dome(an: Anatomy, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Height (mm) of the diaphragm at (y, x); posterior recesses lower than the front."""
    A, B = an.cavity
    yy = (y + 0.1 * B) / B
    post = np.where(yy > 0, 1.6, 1.0)
    right = an.dome_z[0] - 55 * ((x + 0.4 * A) / A) ** 2 - 40 * post * yy**2
    left = an.dome_z[1] - 55 * ((x - 0.45 * A) / A) ** 2 - 40 * post * yy**2
    return np.maximum(right, left)


def _wall(an: Anatomy, cv: Canvas):
    """2-D maps (y, x): outward distance from the cavity edge (mm) and the wall/fat thicknesses."""
    A, B = an.cavity
    y = cv.gy[:, None]
    x = cv.gx[None, :]
    p = np.sqrt(x**2 + y**2) + 1e-6
    rho = np.sqrt((x / A) ** 2 + (y / B) ** 2) + 1e-6
    dist = p * (1.0 - 1.0 / rho)
    ant = np.clip(-y / p, 0, 1)
    lat = np.abs(x) / p
    tm = an.muscle_mm * (0.7 + 0.6 * ant + 0.5 * lat)
    tf = an.fat_mm * (0.45 + 0.75 * ant + 0.35 * lat)
    return dist, tm, tf, p, y, x


def _content(an, cv, sl, tissue, inner, kw, tube=None, tvals=None, shape_center=None, height=None):
    """Fill the lumen of a hollow organ: fluid/stool, gas rising anteriorly (small y)."""
    content = kw.get("content", tissue)
    sub = tissue_view = cv.tissue_out[sl]
    if "stool" in kw:
        z = cv.gz[sl[0]]
        bub = an.fields["bubbles"].sample(z, cv.gy[sl[1]], cv.gx[sl[2]])
        thr = float(ndtri(np.clip(kw["stool"], 0.01, 0.99)))
        fill = np.where(bub < thr, T.STOOL, T.GAS).astype(np.uint8)
        tissue_view[inner] = fill[inner]
    else:
        tissue_view[inner] = content
    gf = kw.get("gas_frac", 0.0)
    if gf > 0:
        y = cv.gy[sl[1]][None, :, None]
        if tube is not None:
            yc = np.interp(tvals, tube.t, tube.points[:, 1])
            rr = np.interp(tvals, tube.t, tube.radii)
            level = yc - rr + 2 * rr * gf
        else:
            level = shape_center[1] - height + 2 * height * gf
        gas = inner & (y < level)
        sub[gas] = T.GAS


def _paint_organ(an: Anatomy, cv: Canvas, dist2d, tissue_id: int, shape, kw: dict) -> None:
    if isinstance(shape, Tube):
        res = shape.evaluate(cv)
        if res is None:
            return
        sl, dn, tv = res
        rr = np.interp(tv, shape.t, shape.radii)
        inside = dn <= 1.0
    else:
        res = shape.evaluate(cv)
        if res is None:
            return
        sl, r = res
        tv = None
        inside = r <= 1.0
        if "bite" in kw:
            c, rad = kw["bite"]
            z = cv.gz[sl[0]][:, None, None]
            y = cv.gy[sl[1]][None, :, None]
            x = cv.gx[sl[2]][None, None, :]
            inside &= (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 > rad**2
    if kw.get("in_cavity"):
        inside &= (dist2d[sl[1], sl[2]] < -1.0)[None]
    if not inside.any():
        return
    view = cv.tissue_out[sl]
    if "wall" in kw:
        wall_t, th = kw["wall"]
        if tv is not None:
            inner = inside & (dn * rr <= rr - th)
        else:
            inner = inside & (r <= 1.0 - th / min(shape.semi))
        view[inside] = wall_t
        _content(
            an,
            cv,
            sl,
            tissue_id,
            inner,
            kw,
            tube=shape if tv is not None else None,
            tvals=tv,
            shape_center=getattr(shape, "center", None),
            height=min(getattr(shape, "semi", (1, 1, 1))[:2]),
        )
    else:
        view[inside] = tissue_id


def _paint_pancreas(an: Anatomy, cv: Canvas, fat: np.ndarray, w: np.ndarray) -> None:
    pan = an.pancreas
    res = pan.evaluate(cv, r_max=float(pan.radii.max()) * (1 + 2.5 * an.lobulation))
    if res is None:
        return
    sl, dn, tv = res
    z, y, x = cv.gz[sl[0]], cv.gy[sl[1]], cv.gx[sl[2]]
    lob = an.fields["lobule"].sample(z, y, x)
    g = 1.0 + an.lobulation * np.clip(lob, -1.8, 1.8)
    if an.atrophy_t is not None:
        ramp = np.clip((tv - an.atrophy_t) / 0.04, 0, 1)
        g = g * (1.0 - (1.0 - an.atrophy_factor) * ramp)
    inside = dn <= g
    view = cv.tissue_out[sl]
    view[inside] = T.PANC
    if an.fat_base > 0:
        f = np.clip(an.fat_base * (1.0 + 1.3 * lob) + 0.05 * (dn / g) ** 6, 0, 0.9)
    else:
        f = np.clip(0.05 * (dn / g) ** 6, 0, 0.9)
    fat[sl][inside] = f[inside]
    # main duct (and its course to the ampulla)
    dres = an.duct.evaluate(cv)
    if dres is not None:
        dsl, ddn, _ = dres
        cv.tissue_out[dsl][ddn <= 1.0] = T.DUCT
    les = an.lesion
    if les is None:
        return
    pad = 3.0 * les.soft_mm + 0.3 * max(les.semi)
    lres = Ellipsoid(tuple(les.center), les.semi, les.rot).evaluate(cv, pad=0.0)
    big = Ellipsoid(tuple(les.center), tuple(s + pad for s in les.semi), les.rot).evaluate(cv)
    if lres is None or big is None:
        return
    bsl, _ = big
    z, y, x = cv.gz[bsl[0]], cv.gy[bsl[1]], cv.gx[bsl[2]]
    e = Ellipsoid(tuple(les.center), les.semi, les.rot)
    # normalised radius on the padded box
    c = np.asarray(les.center)
    dz, dy, dx = z[:, None, None] - c[2], y[None, :, None] - c[1], x[None, None, :] - c[0]
    r2 = 0.0
    for i in range(3):
        uu = e.rot[0, i] * dx + e.rot[1, i] * dy + e.rot[2, i] * dz
        r2 = r2 + (uu / e.semi[i]) ** 2
    rn = np.sqrt(r2)
    mean_r = float(np.mean(les.semi))
    view = cv.tissue_out[bsl]
    if les.kind == "pdac":
        irr = an.fields["lesion"].sample(z, y, x)
        rn = rn * (1.0 - 0.12 * np.clip(irr, -2.5, 2.5))
        core = rn <= 1.0
        wt = 1.0 / (1.0 + np.exp(-(1.0 - rn) * mean_r / les.soft_mm))
        wv = w[bsl]
        np.maximum(wv, wt.astype(np.float32), out=wv)
        view[core] = T.PDAC
        fat[bsl][core] = 0.0
    else:
        view[rn <= 1.0] = T.CYST


def _paint_thorax(an: Anatomy, cv: Canvas, dist2d) -> None:
    y, x = cv.gy[:, None], cv.gx[None, :]
    dome = _dome(an, y, x)
    cav = dist2d < 0
    zmax = float(dome.max())
    k0 = int(np.searchsorted(cv.gz, float(dome[cav].min()) if cav.any() else zmax))
    A, B = an.cavity
    for k in range(k0, len(cv.gz)):
        v = cv.tissue_out[k]
        lung = cav & (cv.gz[k] > dome) & (v != T.MUSCLE)
        v[lung] = T.LUNG
    heart = Ellipsoid((0.18 * A, -0.35 * B, an.dome_z[0] + 55), (0.5 * A, 0.55 * B, 60.0))
    res = heart.evaluate(cv, pad=6.0)
    if res is not None:
        sl, r = res
        above = cv.gz[sl[0]][:, None, None] > dome[sl[1], sl[2]][None] - 4
        view = cv.tissue_out[sl]
        s_in = heart.semi[0]
        view[above & (r <= 1.0 + 6.0 / s_in)] = T.VFAT
        view[above & (r <= 1.0)] = T.HEART


def _bone(view, inside, r_norm, shell):
    view[inside] = T.CANCELLOUS
    view[inside & (r_norm > 1.0 - shell)] = T.CORTEX


def _paint_spine(an: Anatomy, cv: Canvas) -> None:
    ys = an.spine_y
    y, x = cv.gy[:, None], cv.gx[None, :]
    canal = (x**2 + (y - ys - 27) ** 2) <= 9.0**2
    ring_r = np.sqrt(x**2 + (y - ys - 27) ** 2)
    spin_r = np.sqrt((x / 5.0) ** 2 + ((y - ys - 48) / 14.0) ** 2)
    for k, (zc, h) in enumerate(an.vertebrae):
        a, b = 16.0 + 0.55 * k, 13.0 + 0.35 * k
        rb = np.sqrt((x / a) ** 2 + ((y - ys) / b) ** 2)
        z0, z1 = zc - h / 2, zc + h / 2
        nxt = (
            an.vertebrae[k + 1][0] + an.vertebrae[k + 1][1] / 2
            if k + 1 < len(an.vertebrae)
            else None
        )
        k0, k1 = np.searchsorted(cv.gz, z0), np.searchsorted(cv.gz, z1)
        for kk in range(k0, k1):
            v = cv.tissue_out[kk]
            _bone(v, rb <= 1.0, rb, 2.0 / b)
            ring = (ring_r > 9.0) & (ring_r <= 15.0) & (y > ys + 10)
            v[ring] = T.CORTEX
            _bone(v, spin_r <= 1.0, spin_r, 0.25)
            lumbar = zc < LUMBAR_Z
            tr = np.sqrt(
                ((np.abs(x) - (26 if lumbar else 20)) / (13 if lumbar else 9)) ** 2
                + ((y - ys - 24) / 5.0) ** 2
            )
            v[tr <= 1.0] = T.CANCELLOUS
        if nxt is not None:
            d0, d1 = np.searchsorted(cv.gz, nxt), k0
            for kk in range(d0, d1):
                cv.tissue_out[kk][rb <= 1.0] = T.DISC
    for kk in range(len(cv.gz)):
        cv.tissue_out[kk][canal] = T.CSF
    # Rib heads and necks beside each thoracic vertebra (none beside the lumbar ones), a few mm
    # lateral to the transverse process: the lowest vertebra bearing them is T12.
    head = np.sqrt(((np.abs(x) - RIB_HEAD_X) / 8.0) ** 2 + ((y - ys - 26) / 4.5) ** 2) <= 1.0
    for zc, _ in an.vertebrae:
        if zc < LUMBAR_Z:
            continue
        k0, k1 = np.searchsorted(cv.gz, zc - 5.0), np.searchsorted(cv.gz, zc + 5.0)
        for kk in range(k0, k1):
            cv.tissue_out[kk][head] = T.RIB


def _paint_ribs(an: Anatomy, cv: Canvas, dist, tm, p, y, x) -> None:
    phi = np.arccos(np.clip(y / p, -1, 1)) / np.pi  # 0 posterior midline .. 1 anterior
    band = (dist > 0.2 * tm) & (dist < 0.2 * tm + 5.5) & (phi > 0.12)
    zc = -75 + 120 * phi
    ys = an.spine_y
    for k, z in enumerate(cv.gz):
        stripe = np.mod(z + 100 * phi + 7.0, 30.0) < 9.0
        rib = band & stripe & (z > zc) & ~((np.abs(x) < 45) & (y > ys - 10))
        if not rib.any():
            continue
        v = cv.tissue_out[k]
        v[rib & (phi <= 0.82)] = T.RIB
        v[rib & (phi > 0.82)] = T.CARTILAGE


def attenuation(
    tissue: np.ndarray,
    fat: np.ndarray,
    weight: np.ndarray,
    texture: np.ndarray,
    *,
    lut: np.ndarray,
    texture_lut: np.ndarray,
    lesion_delta: float,
) -> np.ndarray:
    """HU at the painted points (float32, the shape of ``tissue``), before slab averaging and blur.

    Each tissue gets its phase value plus its texture; parenchyma and PDAC get the gland's value
    mixed with fat by the fat fraction, minus ``lesion_delta`` (HU) times the PDAC weight.
    """
    hu = lut[tissue] + texture_lut[tissue] * texture
    panc = (tissue == T.PANC) | (tissue == T.PDAC)
    base = lut[T.PANC] + texture_lut[T.PANC] * texture[panc]
    fat_hu = float(lut[T.VFAT])
    hu[panc] = base * (1.0 - fat[panc]) + fat_hu * fat[panc] - lesion_delta * weight[panc]
    return hu


def render(an: Anatomy, cv: Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue map (uint8), pancreatic fat fraction and PDAC weight (float32), all ``(z, y, x)``."""
    cv.tissue_out = np.zeros(cv.shape, np.uint8)
    fat = np.zeros(cv.shape, np.float32)
    w = np.zeros(cv.shape, np.float32)
    dist, tm, tf, p, y, x = _wall(an, cv)
    A, B = an.cavity
    back = B + an.muscle_mm + 0.45 * an.fat_mm
    body = (dist < tm + tf) & (y < back)
    # table top (and its base) below the patient
    table = ((y > back + 3) & (y < back + 9) & (np.abs(x) < 230)) | (
        (y > back + 40) & (y < back + 45) & (np.abs(x) < 170)
    )
    plane = np.full(body.shape, T.AIR, np.uint8)
    plane[table] = T.TABLE
    plane[body] = T.SFAT
    plane[body & (dist < tm)] = T.MUSCLE
    plane[dist < 0] = T.VFAT
    cv.tissue_out[:] = plane[None]
    for tid, shape, kw in an.organs[: an.n_pre]:
        _paint_organ(an, cv, dist, tid, shape, kw)
    _paint_pancreas(an, cv, fat, w)
    _paint_thorax(an, cv, dist)
    for tid, shape, kw in an.organs[an.n_pre :]:
        _paint_organ(an, cv, dist, tid, shape, kw)
    _paint_spine(an, cv)
    _paint_ribs(an, cv, dist, tm, p, y, x)
    tissue = cv.tissue_out
    del cv.tissue_out
    w[(tissue != T.PANC) & (tissue != T.PDAC)] = 0.0
    fat[(tissue != T.PANC)] = 0.0
    return tissue, fat, w
