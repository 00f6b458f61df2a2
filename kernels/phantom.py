"""Synthetic abdominal CT phantom with known truth, for kernel tests, benchmarks and the GPU check.

One axial slice template (body of fat and soft tissue with a liver and gas pockets, vertebra with
cortex and canal, aorta and IVC in a fat collar, a patient table below the body, out-of-field
padding) repeated along z, intervertebral discs every 30 mm, plus seeded Gaussian noise.  Geometry
is standard axial LPS: array ``(z, y, x)``, ``j`` toward posterior (+y), ``i`` toward the patient's
left (+x), ``k`` toward the head (+z).  Not a substitute for real CT; see tests for what it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Phantom", "synthetic_ct"]


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT and its truth.

    Attributes:
        hu: ``(z, y, x)`` int16 HU.
        affine: 4x4 index ``(k, j, i, 1)`` -> LPS mm.
        spacing: ``(dz, dy, dx)`` mm.
        truth: bool ``(z, y, x)`` masks: ``body`` (inner gas included), ``table``, ``aorta``,
            ``ivc``, ``vertebra``.
        aorta_hu, noise_hu: the values drawn in.
    """

    hu: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    truth: dict[str, np.ndarray] = field(repr=False)
    aorta_hu: float
    noise_hu: float


def synthetic_ct(
    *,
    shape: tuple[int, int, int] = (48, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.5, 2.5),
    seed: int = 0,
    aorta_hu: float = 40.0,
    ivc_hu: float | None = None,
    noise_hu: float = 10.0,
    table: bool = True,
    body_slices: tuple[int, int] | None = None,
    vertebra: bool = True,
) -> Phantom:
    """Build a phantom; the field of view is ``shape[1] * spacing[1]`` mm (about 320 mm works best).

    ``ivc_hu`` defaults to ``aorta_hu`` (non-contrast) or 60% of it above 100 HU (portal phase);
    ``body_slices`` limits the body to slices ``[start, stop)`` (air elsewhere).
    """
    nz, ny, nx = shape
    dz, dy, dx = spacing
    if ivc_hu is None:
        ivc_hu = aorta_hu if aorta_hu < 100 else 0.6 * aorta_hu
    y = (np.arange(ny) - (ny - 1) / 2.0) * dy  # posterior positive
    x = (np.arange(nx) - (nx - 1) / 2.0) * dx  # patient left positive
    yy, xx = np.meshgrid(y, x, indexing="ij")
    fov_r = min(ny * dy, nx * dx) / 2.0
    a_lr, a_ap, c_ap = 0.40 * fov_r * 2 * 0.95, 0.30 * fov_r * 2 * 0.95, -0.04 * fov_r * 2
    body = ((xx / a_lr) ** 2 + ((yy - c_ap) / a_ap) ** 2) <= 1.0
    inner = ((xx / (a_lr - 15)) ** 2 + ((yy - c_ap) / (a_ap - 15)) ** 2) <= 1.0
    sl = np.full((ny, nx), -1000.0)
    sl[np.hypot(yy, xx) > fov_r] = -3024.0  # out of the reconstruction circle
    sl[body] = -100.0
    sl[inner] = 45.0
    liver = (
        ((xx + 0.45 * a_lr) / (0.4 * a_lr)) ** 2 + ((yy - c_ap + 0.2 * a_ap) / (0.5 * a_ap)) ** 2
    ) <= 1
    sl[liver & inner] = 60.0
    gas = np.zeros_like(body)
    for gx, gy, gr in ((0.35, -0.45, 0.10), (-0.05, -0.55, 0.08), (0.5, 0.0, 0.07)):
        gas |= np.hypot(xx - gx * a_lr, yy - c_ap - gy * a_ap) <= gr * a_ap
    sl[gas & inner] = -950.0
    v_ap = c_ap + 0.45 * a_ap  # vertebral body centre
    vr = 0.09 * a_lr * 2 * 0.9
    vert = np.hypot(xx, yy - v_ap) <= vr
    canal = np.hypot(xx, yy - (v_ap + vr + 8)) <= 8
    spinous = (np.abs(xx) <= 4) & (yy > v_ap + vr + 14) & (yy < c_ap + a_ap - 8)
    front = v_ap - vr
    ao_c = (12.0, front - 14.0)
    ivc_c = (-24.0, front - 16.0)
    collar = (np.hypot(xx - ao_c[0], yy - ao_c[1]) <= 17) | (
        np.hypot(xx - ivc_c[0], yy - ivc_c[1]) <= 15
    )
    sl[collar & inner] = -100.0
    aorta = np.hypot(xx - ao_c[0], yy - ao_c[1]) <= 11.0
    ivc = ((xx - ivc_c[0]) / 12.0) ** 2 + ((yy - ivc_c[1]) / 8.0) ** 2 <= 1.0
    sl[aorta] = aorta_hu
    sl[ivc] = ivc_hu
    vmask = vert | spinous
    table_m = np.zeros_like(body)
    if table:
        back = c_ap + a_ap
        table_m = (np.abs(xx) <= 0.9 * fov_r) & (yy >= back + 8) & (yy <= back + 13)
        sl[(yy > back + 2) & (yy < back + 8) & (np.abs(xx) <= 0.9 * fov_r)] = -700.0  # mattress
        sl[table_m] = 150.0
    rng = np.random.default_rng(seed)
    z0, z1 = body_slices if body_slices is not None else (0, nz)
    hu = np.empty(shape, dtype=np.int16)
    air = np.where(np.hypot(yy, xx) > fov_r, -3024.0, -1000.0)
    zpos = np.arange(nz) * dz
    for k in range(nz):
        s = sl.copy() if z0 <= k < z1 else air.copy()
        if z0 <= k < z1 and vertebra:
            disc = (zpos[k] % 30.0) >= 24.0
            s[vert] = 90.0 if disc else 250.0
            s[vert & (np.hypot(xx, yy - v_ap) > vr - 3)] = 90.0 if disc else 700.0
            s[spinous] = 500.0
            s[canal] = 15.0
        noise = rng.standard_normal((ny, nx)) * noise_hu
        s = np.where(s > -2000, s + noise, s)
        hu[k] = np.clip(np.rint(s), -3024, 3071).astype(np.int16)
    in_z = np.zeros(nz, dtype=bool)
    in_z[z0:z1] = True

    def stack(m: np.ndarray) -> np.ndarray:
        return in_z[:, None, None] & m[None]

    truth = {
        "body": stack(body),
        "table": stack(table_m),
        "aorta": stack(aorta),
        "ivc": stack(ivc),
        "vertebra": stack(vmask) if vertebra else stack(np.zeros_like(body)),
    }
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, dz)
    affine[:3, 1] = (0.0, dy, 0.0)
    affine[:3, 2] = (dx, 0.0, 0.0)
    affine[:3, 3] = (x[0], y[0], -100.0)
    return Phantom(
        hu=hu,
        affine=affine,
        spacing=(float(dz), float(dy), float(dx)),
        truth=truth,
        aorta_hu=float(aorta_hu),
        noise_hu=float(noise_hu),
    )
