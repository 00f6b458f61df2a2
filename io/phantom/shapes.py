"""Geometric primitives for the phantom, evaluated on an axis-aligned world grid.

The phantom's anatomy is a list of analytic shapes in patient LPS millimetres (x to the patient's
left, y posterior, z superior).  A :class:`Canvas` covers a box of voxel centres given by three
ascending 1-D axes (``gz``, ``gy``, ``gx``, in mm); its arrays are ``(z, y, x)``.  Every primitive
evaluates only inside its own bounding box, so a small organ costs little on a large grid.

Primitives: rotated ellipsoids, tubes along polylines with a varying radius (nearest-point queries
on a densely resampled centreline, which also gives the position along the tube), and smooth random
fields anchored to world coordinates (same texture whatever the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["Canvas", "Ellipsoid", "SmoothField", "Tube", "rotation"]


def rotation(*, z_deg: float = 0.0, y_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation (applied as R @ v): about x, then y, then z; angles in degrees."""
    a, b, c = np.radians([x_deg, y_deg, z_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


class Canvas:
    """Voxel centres ``gz x gy x gx`` (ascending mm axes) and helpers to address a world box."""

    def __init__(self, gz: np.ndarray, gy: np.ndarray, gx: np.ndarray) -> None:
        self.gz, self.gy, self.gx = (np.asarray(g, np.float64) for g in (gz, gy, gx))
        self.shape = (len(self.gz), len(self.gy), len(self.gx))

    def box(self, lo, hi):
        """Slices and broadcastable coordinates (Z, Y, X) of the voxels inside ``[lo, hi]`` (x,y,z).

        Returns None when the box misses the canvas.
        """
        sl = []
        for g, a, b in ((self.gz, lo[2], hi[2]), (self.gy, lo[1], hi[1]), (self.gx, lo[0], hi[0])):
            i0, i1 = int(np.searchsorted(g, a, "left")), int(np.searchsorted(g, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        z = self.gz[sl[0]][:, None, None]
        y = self.gy[sl[1]][None, :, None]
        x = self.gx[sl[2]][None, None, :]
        return tuple(sl), z, y, x


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid with semi-axes ``semi`` (mm) along the columns of rotation ``rot``."""

    center: tuple[float, float, float]
    semi: tuple[float, float, float]
    rot: np.ndarray | None = None

    def evaluate(self, canvas: Canvas, pad: float = 0.0):
        """(slices, r) where r is the normalised radius (<= 1 inside) on the shape's box, or None."""
        c = np.asarray(self.center, float)
        s = np.asarray(self.semi, float) + pad
        rot = np.eye(3) if self.rot is None else np.asarray(self.rot, float)
        half = np.abs(rot) @ s
        hit = canvas.box(c - half, c + half)
        if hit is None:
            return None
        sl, z, y, x = hit
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        r2 = 0.0
        for i in range(3):
            u = rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz
            r2 = r2 + (u / s[i]) ** 2
        return sl, np.sqrt(r2)


class Tube:
    """A tube of varying radius along a polyline (x, y, z mm).

    ``z_scale`` < 1 stretches the cross-section in z (a flat, tall organ such as the pancreas).
    """

    def __init__(self, points, radii, *, z_scale: float = 1.0, step: float = 0.75) -> None:
        pts = np.asarray(points, float)
        rad = np.asarray(radii, float)
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        arc = np.concatenate([[0.0], np.cumsum(seg)])
        n = max(int(arc[-1] / step) + 2, 2)
        s = np.linspace(0.0, arc[-1], n)
        self.points = np.stack([np.interp(s, arc, pts[:, i]) for i in range(3)], axis=1)
        self.radii = np.interp(s, arc, rad)
        self.t = s / max(arc[-1], 1e-9)
        self.length = float(arc[-1])
        self.z_scale = float(z_scale)
        scaled = self.points * np.array([1.0, 1.0, self.z_scale])
        self._tree = cKDTree(scaled)
        self._rmax = float(self.radii.max())

    def point_at(self, t: float) -> np.ndarray:
        """World point at fraction ``t`` (0..1) of the arc length."""
        return np.stack([np.interp(t, self.t, self.points[:, i]) for i in range(3)])

    def radius_at(self, t: float) -> float:
        return float(np.interp(t, self.t, self.radii))

    def evaluate(self, canvas: Canvas, pad: float = 0.0, r_max: float | None = None):
        """(slices, d_norm, t) on the tube's box, or None.

        ``d_norm`` = distance to the centreline / local radius (<= 1 inside; inf far away), ``t`` the
        arc fraction of the nearest centreline point. ``r_max`` bounds the radius a caller may later
        enlarge to (default: the largest radius).
        """
        rmax = (self._rmax if r_max is None else r_max) + pad
        lo = self.points.min(axis=0) - [rmax, rmax, rmax / self.z_scale]
        hi = self.points.max(axis=0) + [rmax, rmax, rmax / self.z_scale]
        hit = canvas.box(lo, hi)
        if hit is None:
            return None
        sl, z, y, x = hit
        z, y, x = z.ravel(), y.ravel(), x.ravel()
        dn = np.full((len(z), len(y), len(x)), np.inf)
        tt = np.zeros(dn.shape)
        ext = np.array([rmax, rmax, rmax / self.z_scale])
        # Query only near each piece of the centreline (a curved tube's box is mostly empty), each
        # voxel once; the nearest point comes from the whole tree, so the result is exact.
        per = max(
            2, int(max(25.0, 2.0 * rmax) / max(self.length / max(len(self.points) - 1, 1), 1e-6))
        )
        done = np.zeros(dn.shape, bool)
        for c0 in range(0, len(self.points), per):
            pts = self.points[c0 : c0 + per + 1]
            plo, phi = pts.min(axis=0) - ext, pts.max(axis=0) + ext
            iz = slice(np.searchsorted(z, plo[2]), np.searchsorted(z, phi[2], "right"))
            iy = slice(np.searchsorted(y, plo[1]), np.searchsorted(y, phi[1], "right"))
            ix = slice(np.searchsorted(x, plo[0]), np.searchsorted(x, phi[0], "right"))
            need = ~done[iz, iy, ix]
            if not need.any():
                continue
            kk, jj, ii = np.nonzero(need)
            q = np.stack([x[ix][ii], y[iy][jj], z[iz][kk] * self.z_scale], axis=1)
            d, idx = self._tree.query(q, distance_upper_bound=rmax)
            far = ~np.isfinite(d)
            idx[far] = 0
            local = d / (self.radii[idx] + pad)
            local[far] = np.inf
            dn[iz, iy, ix][need] = local
            tt[iz, iy, ix][need] = self.t[idx]
            done[iz, iy, ix] = True
        return sl, dn, tt


class SmoothField:
    """Zero-mean, unit-variance smooth random field on a world-anchored lattice.

    ``scale`` (mm) is the lattice spacing (the correlation length is about 1.5 * scale).  Values at
    any voxel depend only on the seed and the world position, not on the grid sampled.
    """

    def __init__(self, rng: np.random.Generator, lo, hi, scale: float) -> None:
        self.lo = np.asarray(lo, float)
        self.scale = float(scale)
        n = np.ceil((np.asarray(hi, float) - self.lo) / scale).astype(int) + 2
        lat = rng.standard_normal((n[2], n[1], n[0])).astype(np.float32)
        lat = ndimage.gaussian_filter(lat, 1.0, mode="wrap")
        self.lattice = lat / max(float(lat.std()), 1e-6)

    def sample(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Field on the grid ``z x y x x`` (1-D or broadcastable axes, mm) -> (nz, ny, nx) float32."""
        out = self.lattice
        for axis, coords, lo in ((0, z, self.lo[2]), (1, y, self.lo[1]), (2, x, self.lo[0])):
            c = np.ravel(coords)
            f = np.clip((c - lo) / self.scale, 0.0, out.shape[axis] - 1.001)
            i0 = np.floor(f).astype(int)
            w = (f - i0).astype(np.float32)
            a = np.take(out, i0, axis=axis)
            b = np.take(out, i0 + 1, axis=axis)
            shp = [1, 1, 1]
            shp[axis] = -1
            w = w.reshape(shp)
            out = a * (1.0 - w) + b * w
        return out
