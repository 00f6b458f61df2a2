"""The second renderer's anatomy: its own shapes, positions and habitus (no voxels yet).

Deliberately unlike :mod:`pdacscreen.io.phantom.anatomy`: the pancreas is not a tube swept along a
polyline but a *graph over x* (centreline ``y(x) = y0 + k (x - x_a)^2``, ``z(x)`` rising as a power
of the distance past the neck) with a superelliptic cross-section (exponent 2.6, squarer than an
ellipse) and a separate superellipsoid head/uncinate blob; no duct, no lobulation, no fat
interdigitation.  Lesions are uniform-contrast solids with a sharp edge (a sphere, a prolate
ellipsoid or a low-order "bumpy" sphere).  Body habitus runs from very thin (5 mm subcutaneous fat)
to obese (70 mm); organ positions are shifted against each other per subject.

Body frame (mm): LPS axes (x to the patient's left, y posterior, z superior), origin at the centre
of the abdominal cavity at the level of the pancreatic neck.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Blob", "Gland", "SRLesion", "SRAnatomy", "draw_anatomy", "REGIONS"]

#: pancreas regions along the gland's x extent, as fractions (0 = head's right edge, 1 = tail tip)
REGIONS = {"head": (0.1, 0.28), "body": (0.38, 0.65), "tail": (0.72, 0.95)}


@dataclass(frozen=True)
class Blob:
    """An axis-aligned superellipsoid ``sum(|(p - c) / s|^e) <= 1`` painted as ``tissue``."""

    tissue: str
    center: tuple[float, float, float]  # (x, y, z) mm
    semi: tuple[float, float, float]  # (x, y, z) mm
    exponent: float = 2.0


@dataclass(frozen=True)
class Gland:
    """The pancreas: a graph over ``x`` plus a head blob (see module)."""

    x0: float  # right end of the body part (joins the head), mm
    x1: float  # tail tip, mm
    x_apex: float  # where the anterior bulge over the aorta peaks
    y0: float  # centreline y at the apex
    k: float  # curvature of y(x) (1/mm, positive: the tail goes posterior)
    z_neck: float
    z_rise: float  # how far the tail rises (mm)
    rise_power: float
    r_body: float  # cross-section semi-axis (y) in the body, mm
    r_tail: float  # at the tail tip
    z_ratio: float  # cross-section semi-axis in z over that in y
    head: Blob
    exponent: float = 2.6

    def centre(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centreline ``(y, z)`` and cross-section semi-axis ``ry`` at ``x`` (mm)."""
        x = np.asarray(x, float)
        y = self.y0 + self.k * (x - self.x_apex) ** 2
        past = np.clip((x - self.x_apex) / max(self.x1 - self.x_apex, 1.0), 0.0, 1.0)
        z = self.z_neck + self.z_rise * past**self.rise_power
        f = np.clip((x - self.x0) / max(self.x1 - self.x0, 1.0), 0.0, 1.0)
        ry = self.r_body + (self.r_tail - self.r_body) * f**1.7
        return y, z, ry

    def point(self, fraction: float) -> np.ndarray:
        """A point ``(x, y, z)`` on the gland axis at ``fraction`` of the span (head .. tail)."""
        xh = self.head.center[0] - self.head.semi[0]
        x = xh + fraction * (self.x1 - xh)
        if x < self.x0:  # inside the head blob: its centre line along x
            c = self.head.center
            return np.array([x, c[1], c[2]])
        y, z, _ = self.centre(np.array([x]))
        return np.array([x, float(y[0]), float(z[0])])


@dataclass(frozen=True)
class SRLesion:
    """A focal lesion: a uniform solid with a sharp edge (body frame)."""

    kind: str  # "pdac" | "cyst"
    shape: str  # "sphere" | "ellipsoid" | "bumpy"
    center: np.ndarray
    radius: float  # mm (equivalent sphere)
    axes: tuple[float, float, float]  # relative semi-axes (x, y, z), product 1
    bumps: tuple[float, ...]  # bumpy: amplitudes of cos(2 phi), cos(3 theta), cos(phi + theta)
    delta_nc: float  # HU relative to the parenchyma (PDAC) in the non-contrast phase
    delta_pv: float
    location: str


@dataclass
class SRAnatomy:
    """All shapes of one subject plus the findings (body frame, mm)."""

    cavity: tuple[float, float]  # lateral, antero-posterior semi-axes
    muscle_mm: float
    fat_mm: float
    z_range: tuple[float, float]
    gland: Gland
    lesion: SRLesion | None
    lesion_type: str
    fatty_pancreas: bool
    blobs: list[Blob] = field(default_factory=list)  # painted in order before the gland
    vessels: list[Blob] = field(default_factory=list)  # painted after the gland
    spine_y: float = 0.0


def _draw_lesion(rng, gland: Gland, kind: str) -> SRLesion:
    u = rng.uniform
    if kind == "pdac":
        loc_u = rng.random()
        location = "head" if loc_u < 0.55 else ("body" if loc_u < 0.85 else "tail")
        diameter = u(6, 20) if rng.random() < 0.45 else rng.triangular(20, 24, 40)
        delta_nc = -u(6, 26)
        delta_pv = -u(25, 55)
    else:
        location = ("head", "body", "tail")[int(rng.integers(3))]
        diameter = u(6, 28)
        delta_nc = delta_pv = 0.0  # a cyst is fluid: its HU is absolute (render.py)
    lo, hi = REGIONS[location]
    centre = gland.point(u(lo, hi)) + rng.normal(0, 1.5, 3)
    shape = ("sphere", "ellipsoid", "bumpy")[int(rng.integers(3))] if kind == "pdac" else "sphere"
    if shape == "ellipsoid":
        a = np.array([u(1.0, 1.6), u(0.7, 1.0), u(0.7, 1.2)])
        a = a / np.prod(a) ** (1 / 3)
    else:
        a = np.ones(3)
    bumps = tuple(float(v) for v in u(0.08, 0.2, 3)) if shape == "bumpy" else ()
    return SRLesion(
        kind, shape, centre, diameter / 2, tuple(a), bumps, delta_nc, delta_pv, location
    )


def draw_anatomy(rng: np.random.Generator, lesion_type: str) -> SRAnatomy:
    """One subject's shapes; ``lesion_type`` is "pdac", "cyst" or "none"."""
    u = rng.uniform
    A, B = u(115, 165), u(85, 125)
    muscle = u(6, 16)
    fat = float(np.exp(u(np.log(5), np.log(70))))  # thin to obese, log-uniform
    spine_y = B * u(0.5, 0.62)
    aorta = (u(8, 22), spine_y - u(28, 36), 0.0)
    ivc = (-u(18, 30), spine_y - u(22, 30), 0.0)
    y0 = aorta[1] - u(24, 34)
    x_apex = aorta[0] + u(-8, 6)
    x1 = u(75, 105)
    hc = (u(-48, -38), y0 + u(0, 10), u(-22, -10))
    hs = (u(13, 19), u(11, 16), u(18, 28))
    gland = Gland(
        x0=hc[0] + 0.6 * hs[0],
        x1=x1,
        x_apex=x_apex,
        y0=y0,
        k=u(0.002, 0.006),
        z_neck=u(-6, 6),
        z_rise=u(5, 30),
        rise_power=u(1.0, 2.2),
        r_body=u(7.5, 11.5),
        r_tail=u(5.0, 8.0),
        z_ratio=u(0.8, 1.25),
        head=Blob("panc", hc, hs, 2.6),
    )
    lt = lesion_type
    lesion = _draw_lesion(rng, gland, lt) if lt in ("pdac", "cyst") else None
    zr_lo, zr_hi = -u(90, 130), u(90, 150)
    hx, hy, hz = gland.head.center
    blobs = [
        # liver (right upper), spleen (left upper), kidneys (left higher), stomach, duodenum, bowel
        Blob("liver", (-u(55, 80), -u(0, 20), u(40, 70)), (u(70, 90), u(70, 90), u(75, 100))),
        Blob("spleen", (u(85, 105), B * 0.35, u(35, 65)), (u(28, 38), u(38, 50), u(45, 60))),
        Blob("kidney", (-u(65, 80), spine_y - u(0, 15), -u(20, 40)), (25, 22, u(45, 55))),
        Blob("kidney", (u(65, 80), spine_y - u(0, 15), -u(0, 20)), (25, 22, u(45, 55))),
        Blob("stomach", (u(25, 55), -u(45, 65), u(35, 60)), (u(45, 60), u(28, 38), u(40, 55))),
        Blob("gas", (u(25, 55), -u(70, 80), u(60, 80)), (u(25, 40), u(10, 16), u(14, 22))),
        Blob("duodenum", (hx - u(18, 24), hy + u(-6, 6), hz - 5), (u(9, 13), u(9, 13), u(28, 40))),
    ]
    for _ in range(int(rng.integers(4, 8))):  # bowel loops, below the pancreas
        blobs.append(
            Blob(
                "bowel" if rng.random() < 0.7 else "gas",
                (u(-0.7, 0.7) * A, u(-0.8, 0.2) * B, u(zr_lo + 10, -30)),
                (u(15, 30), u(12, 22), u(15, 30)),
            )
        )
    blobs += [
        Blob("psoas", (-u(30, 40), spine_y + 5, zr_lo), (u(14, 20), u(14, 18), 400)),
        Blob("psoas", (u(30, 40), spine_y + 5, zr_lo), (u(14, 20), u(14, 18), 400)),
        Blob("vertebra", (0.0, spine_y, 0.0), (u(19, 24), u(16, 20), 1000)),
        Blob("canal", (0.0, spine_y + u(28, 32), 0.0), (8, 8, 1000)),
    ]
    vessels = [
        Blob("artery", aorta, (u(9, 13), u(9, 13), 1000)),
        Blob("vein", ivc, (u(11, 15), u(8, 11), 1000)),
        Blob("vein", (x_apex - u(14, 22), y0 + u(12, 16), -80), (u(5, 7), u(5, 7), 80)),  # SMV
        Blob("artery", (aorta[0] + u(-4, 2), y0 + u(18, 22), -80), (3.5, 3.5, 75)),  # SMA
    ]
    return SRAnatomy(
        cavity=(A, B),
        muscle_mm=muscle,
        fat_mm=fat,
        z_range=(zr_lo, zr_hi),
        gland=gland,
        lesion=lesion,
        lesion_type=lt,
        fatty_pancreas=bool(rng.random() < 0.2),
        blobs=blobs,
        vessels=vessels,
        spine_y=spine_y,
    )
