"""Per-subject anatomy of the phantom: shapes and findings drawn from a seed (no voxels yet).

Coordinates are the *body frame* in mm: LPS axes (x to the patient's left, y posterior, z superior)
with the origin at the centre of the abdominal cavity at the level of the pancreatic body (about
L1).  :mod:`pdacscreen.io.phantom.subject` shifts the body frame into scanner coordinates.

Anatomy follows DOMAIN.md: the pancreas lies anterior to the aorta/IVC at L1-L2, head in the duodenal
C-loop right of the midline (below the body), neck anterior to the portal/superior mesenteric vein
confluence, body crossing anterior to the aorta and superior mesenteric artery, tail rising towards
the splenic hilum; the main duct runs inside it to the ampulla in the second part of the duodenum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pdacscreen.io.phantom.shapes import Ellipsoid, SmoothField, Tube, rotation
from pdacscreen.io.phantom.tissue import T
from pdacscreen.io.phantom.variation import Variation

__all__ = ["Anatomy", "Findings", "Lesion", "draw_anatomy", "REGION_T"]

# Pancreas centreline fractions separating head | body | tail (t = 0 uncinate ... 1 tail tip).
REGION_T = {"head": (0.04, 0.36), "body": (0.42, 0.68), "tail": (0.74, 0.95)}


@dataclass(frozen=True)
class Findings:
    """What the pancreas holds (drawn in :mod:`pdacscreen.io.phantom.subject`)."""

    lesion_type: str  # "pdac" | "cyst" | "none"
    lesion_diameter_mm: float
    lesion_location: str  # "head" | "body" | "tail" | ""
    fatty_pancreas: bool
    calcifications: bool
    duct_dilated: bool
    atrophy: bool


@dataclass(frozen=True)
class Lesion:
    """A focal lesion in the body frame. ``shape`` semi-axes in mm, rotation ``rot``."""

    kind: str
    center: np.ndarray
    semi: tuple[float, float, float]
    rot: np.ndarray
    t: float  # position along the pancreas centreline
    soft_mm: float  # width of the infiltrative margin (PDAC), 0 for a sharp edge
    delta_nc: float  # HU below parenchyma, non-contrast (PDAC)
    delta_pv: float  # HU below parenchyma, portal venous (PDAC)


@dataclass
class Anatomy:
    """All shapes of one subject plus what image formation needs (body frame, mm)."""

    cavity: tuple[float, float]  # semi-axes (A lateral, B antero-posterior) of the abdominal cavity
    muscle_mm: float
    fat_mm: float
    dome_z: tuple[float, float]  # right, left diaphragm dome height
    spine_y: float
    vertebrae: list[tuple[float, float]]  # (centre z, body height)
    z_range: tuple[float, float]  # scanned body-frame z interval (bottom, top)
    pancreas: Tube
    duct: Tube
    lesion: Lesion | None
    findings: Findings
    atrophy_t: float | None  # parenchyma thinned for t > atrophy_t (upstream of the tumour)
    atrophy_factor: float
    fat_base: float  # mean fat fraction in the pancreas (fatty infiltration)
    lobulation: float
    calcs: list[tuple[np.ndarray, float]]  # pancreatic calcifications (centre, radius mm)
    other_calcs: list[tuple[np.ndarray, float]]  # aortic wall calcifications
    n_pre: int  # organs[:n_pre] are painted before the pancreas, the rest (vessels) after
    organs: list[tuple[int, object, dict]] = field(default_factory=list)  # paint list
    fields: dict[str, SmoothField] = field(default_factory=dict)


def _jit(rng, p, s):
    return np.asarray(p, float) + rng.uniform(-s, s, size=3)


def draw_anatomy(
    rng: np.random.Generator, findings: Findings, variation: Variation | None = None
) -> Anatomy:
    """Draw one subject's anatomy (all shapes) for the given findings.

    ``variation`` (:mod:`pdacscreen.io.phantom.variation`) moves and reshapes the pancreas (the
    duodenal C-loop, portal confluence and bile duct follow) and widens the habitus; it draws
    nothing from ``rng``, so the subject's other shapes are those it has without it.
    """
    u = rng.uniform
    A, B = u(118, 150), u(82, 105)
    sx = A / 135.0
    ys = 0.47 * B  # vertebral body centre
    ay = ys - u(28, 33)  # aorta centre y
    ax = u(10, 20) * sx
    dome_r = u(105, 145)
    dome = (dome_r, dome_r - u(5, 20))
    top = dome_r + u(-10, 40)
    cover = u(180, 300)
    bottom = top - cover
    if bottom > -85:
        top, bottom = top - (bottom + 85 + u(0, 20)), -85 - u(0, 20)

    organs: list[tuple[int, object, dict]] = []

    def ell(t, c, s, rot=None, **kw):
        organs.append((t, Ellipsoid(tuple(c), tuple(s), rot), kw))

    def tube(t, pts, radii, zs=1.0, **kw):
        organs.append((t, Tube(pts, radii, z_scale=zs), kw))

    # Liver (right lobe + left lobe), gallbladder, hepatic cyst (sometimes).
    ell(
        T.LIVER,
        _jit(rng, (-72 * sx, 0.02 * B, dome_r - 65), 5),
        (u(55, 68) * sx, 0.85 * B, u(72, 85)),
        rotation(z_deg=u(-10, 10)),
        in_cavity=True,
    )
    ell(
        T.LIVER,
        _jit(rng, (-92 * sx, 0.1 * B, dome_r - 115), 5),
        (u(28, 38), u(45, 60), u(35, 50)),
        rotation(z_deg=u(-10, 10)),
        in_cavity=True,
    )  # inferior tip of the right lobe
    ell(
        T.LIVER,
        _jit(rng, (0, -0.5 * B, dome_r - 28), 6),
        (u(55, 75) * sx, 0.36 * B, u(30, 40)),
        rotation(z_deg=u(10, 25)),
        in_cavity=True,
    )  # left lobe
    if rng.random() < 0.1:
        ell(T.SIMPLE_FLUID, _jit(rng, (-75 * sx, -10, 60), 15), (u(6, 18),) * 3)
    gb = _jit(rng, (-48 * sx, -0.55 * B, 10), 6)
    ell(
        T.BILE,
        gb,
        (u(14, 20), u(16, 24), u(30, 45)),
        rotation(x_deg=u(15, 40), z_deg=u(-20, 20)),
        wall=(T.GWALL, 2.0),
    )
    # Spleen: crescent along the left posterior wall.
    sp = _jit(rng, (100 * sx, ys - 5, u(25, 55)), 5)
    ell(
        T.SPLEEN,
        sp,
        (u(20, 28), u(45, 60), u(45, 60)),
        rotation(z_deg=u(-45, -25)),
        bite=(np.array([sp[0] - 35, sp[1] - 25, sp[2]]), 30.0),
        in_cavity=True,
    )
    # Stomach: fundus under the left dome, body, antrum crossing to the pylorus; gas anteriorly.
    st = [
        (55 * sx, -5, dome[1] - 25),
        (65 * sx, -0.4 * B, 70),
        (45 * sx, -0.72 * B, 38),
        (12 * sx, -0.82 * B, 24),
        (-10 * sx, -0.78 * B, 18),
    ]
    st_r = [u(30, 45), u(32, 48), u(28, 38), u(18, 25), u(10, 13)]
    tube(
        T.GFLUID,
        [_jit(rng, p, 5) for p in st],
        st_r,
        wall=(T.GWALL, u(3, 5)),
        gas_frac=u(0.0, 0.5),
        content=T.GFLUID if rng.random() < 0.6 else T.STOOL,
        in_cavity=True,
    )
    # Colon (ascending, hepatic flexure, transverse, splenic flexure, descending).
    co = [
        (-100 * sx, -5, -170),
        (-95 * sx, -0.45 * B, -50),
        (-40 * sx, -0.82 * B, -60),
        (30 * sx, -0.82 * B, -52),
        (95 * sx, -0.3 * B, 0),
        (105 * sx, 5, -60),
        (100 * sx, 0, -170),
    ]
    tube(
        T.GAS,
        [_jit(rng, p, 8) for p in co],
        [u(17, 26) for _ in co],
        wall=(T.GWALL, 2.5),
        stool=u(0.2, 0.8),
        in_cavity=True,
    )
    # Small bowel loops in the lower abdomen (fluid or collapsed, sometimes gas).
    for _ in range(int(rng.integers(10, 22))):
        c = (u(-70, 70) * sx, u(-0.8, 0.0) * B, u(-190, -55))
        r = u(9, 16)
        ell(
            T.GFLUID,
            c,
            (r * u(0.8, 1.5), r * u(0.8, 1.2), r * u(0.8, 1.6)),
            rotation(z_deg=u(0, 180), x_deg=u(-30, 30)),
            wall=(T.GWALL, 2.5),
            gas_frac=u(0, 0.4) if rng.random() < 0.3 else 0.0,
            content=T.GFLUID if rng.random() < 0.7 else T.GWALL,
            in_cavity=True,
        )
    # Psoas and paraspinal muscles, quadratus lumborum.
    for s in (-1, 1):
        tube(
            T.MUSCLE,
            [(s * 28, ys, 30), (s * 40, ys - 5, -60), (s * 50, ys - 8, -200)],
            [3, u(14, 19), u(22, 28)],
        )
        ell(T.MUSCLE, (s * 40, ys + 45, 0), (u(26, 32), u(20, 25), 600))
        tube(T.MUSCLE, [(s * 62, ys + 28, -10), (s * 68, ys + 30, -200)], [6, u(12, 18)], zs=1.0)
    # Kidneys with sinus fat; left higher than right; sometimes a renal cyst.
    for s, zc in ((-1, u(-50, -25)), (1, u(-35, -10))):
        c = _jit(rng, (s * 72 * sx, ys + 6, zc), 4)
        rot = rotation(z_deg=-s * u(25, 40), y_deg=s * u(5, 15))
        semi = (u(24, 30), u(18, 24), u(48, 60))
        # bowel and kidneys stay inside the abdominal wall (in_cavity): the wall muscle is whole
        ell(T.VFAT, c, tuple(a + u(5, 12) for a in semi), rot, in_cavity=True)  # perirenal fat
        ell(T.KIDNEY, c, semi, rot, in_cavity=True)
        sinus = c + rot @ np.array([-s * semi[0] * 0.45, 0, 0]) + np.array([0, -6, 0])
        ell(T.VFAT, sinus, (semi[0] * 0.4, semi[1] * 0.45, semi[2] * 0.4), rot)
        if rng.random() < 0.12:
            ell(
                T.SIMPLE_FLUID,
                c + rot @ np.array([s * semi[0] * 0.6, 0, u(-25, 25)]),
                (u(5, 14),) * 3,
            )

    # Pancreas centreline: uncinate -> head -> neck -> body -> tail (towards the splenic hilum).
    P = [
        (-22, ay - 12, -40),
        (-40, ay - 20, -26),
        (-42, ay - 30, -10),
        (-24, ay - 40, 0),
        (-4, ay - 44, 6),
        (26, ay - 38, 12),
        (56, ay - 24, 18),
        (80, ay - 6, 26),
        (95 * sx, ys + 2, u(28, 38)),
    ]
    P = [(p[0] * (sx if i < 8 else 1), p[1], p[2]) for i, p in enumerate(P)]
    shift = rng.uniform(-4, 4, 3)
    P = [_jit(rng, p, 3) + shift for p in P]
    size = u(1.0, 1.3)
    R = [11, 15, 15, 11, 9.5, 10, 9.5, 9, 7]
    neck = np.asarray(P[4], float)

    def warp(points) -> np.ndarray:  # the variation's pancreas pose (identity without one)
        pts = np.atleast_2d(np.asarray(points, float))
        return pts if variation is None else variation.warp(pts, neck)

    if variation is not None:
        jitter = np.asarray(variation.point_jitter_mm, float).reshape(-1, 3)[: len(P)]
        P = list(warp(P) + jitter)
        P[-1] = P[-1] + [0.0, 0.0, variation.tail_rise_mm]
        P[-2] = P[-2] + [0.0, 0.0, 0.5 * variation.tail_rise_mm]
        size *= variation.thickness
    pancreas = Tube(P, [r * size for r in R], z_scale=0.72)
    # Duodenum: C-loop around the head (D1 from the pylorus, D2 down, D3 across, D4 up).
    du = [
        (-10 * sx, -0.78 * B, 18),
        (-45, ay - 55, 16),
        (-64, ay - 38, 8),
        (-66, ay - 28, -15),
        (-60, ay - 22, -48),
        (-30, ay - 18, -62),
        (0, ay - 20, -66),
        (28, ay - 24, -55),
        (36, ay - 30, -30),
    ]
    du_pts = list(warp([_jit(rng, p, 3) + shift * [1, 1, 1] for p in du]))
    tube(
        T.GFLUID,
        du_pts,
        [11, 13, 13, 13, 12, 10, 9, 10, 10],
        wall=(T.GWALL, 2.5),
        gas_frac=u(0, 0.3),
        content=T.GFLUID,
    )
    n_pre = len(organs)

    # Lesion and secondary signs.
    les = None
    atrophy_t = None
    t_l = None
    if findings.lesion_type != "none":
        lo, hi = REGION_T[findings.lesion_location]
        t_l = u(lo, hi)
        r = findings.lesion_diameter_mm / 2.0
        c = pancreas.point_at(t_l) + rng.uniform(-0.25, 0.25, 3) * pancreas.radius_at(t_l)
        ax3 = rng.uniform(0.8, 1.2, 3)
        ax3 = ax3 / np.prod(ax3) ** (1 / 3)
        rot = rotation(z_deg=u(0, 180), x_deg=u(-40, 40), y_deg=u(-40, 40))
        if findings.lesion_type == "pdac":
            les = Lesion("pdac", c, tuple(r * ax3), rot, t_l, u(1.0, 2.5), u(5, 20), u(30, 60))
        else:
            les = Lesion("cyst", c, (r, r, r), np.eye(3), t_l, 0.0, 0.0, 0.0)
    duct_r = np.full(len(pancreas.t), u(0.8, 1.4))
    if findings.duct_dilated:
        dil = u(2.2, 4.5)
        start = (t_l + 0.5 * findings.lesion_diameter_mm / pancreas.length) if t_l else u(0.1, 0.4)
        duct_r = np.where(pancreas.t > start, dil, duct_r)
        if findings.atrophy:
            atrophy_t = start
    elif findings.atrophy:
        atrophy_t = u(0.1, 0.5)
    # the duct runs from the tail to the head and out to the ampulla on D2's medial wall.
    sel = pancreas.t >= 0.12
    dpts = pancreas.points[sel][::-1] + [0, 2, 0]
    drad = duct_r[sel][::-1]
    amp = warp(np.array(du[3]) + shift)[0] + [8, 4, -2]
    duct = Tube(np.vstack([dpts, amp]), np.concatenate([drad, [drad[-1] * 0.7]]))
    calcs: list[tuple[np.ndarray, float]] = []
    if findings.calcifications:
        for _ in range(int(rng.integers(3, 16))):
            tt = u(0.05, 0.95)
            p = pancreas.point_at(tt) + rng.normal(0, 0.35, 3) * pancreas.radius_at(tt)
            calcs.append((p, u(0.6, 2.0)))

    # Vessels (painted after the pancreas): veins, arteries, IVC, hepatic veins, CBD.
    conf = warp(np.array((-8, ay - 36, 4)) + shift)[0]
    tube(T.VEIN, [conf, conf + [-3, -4, -40], conf + [-6, -8, -200]], [7, 6.5, 6])  # SMV
    pv_end = np.array((-50 * sx, ay - 30, 52))
    tube(T.VEIN, [conf, (-30, ay - 32, 30), pv_end], [7, 7.5, 7.5])  # portal vein
    tube(T.VEIN, [pv_end, (-85 * sx, ay - 20, 68)], [6, 4])
    tube(T.VEIN, [pv_end, (-20 * sx, ay - 60, 80), (20 * sx, -0.6 * B, 85)], [5, 4, 3])
    spv = (
        [conf]
        + [pancreas.point_at(t) + [0, 0.8 * pancreas.radius_at(t), 4] for t in (0.55, 0.7, 0.85)]
        + [sp + [-30, -20, -5]]
    )
    tube(T.VEIN, spv, [5, 5, 4.5, 4.5, 4.5])  # splenic vein behind the pancreas
    aorta_r = u(9, 12.5)
    tube(T.ARTERY, [(ax, ay, -250), (ax, ay, 90), (ax + 8, ay + 10, 400)], [aorta_r] * 3)
    other_calcs = []
    for _ in range(int(rng.integers(0, 7)) if rng.random() < 0.5 else 0):
        ang, zc = u(0, 2 * np.pi), u(-120, 60)
        other_calcs.append(
            (np.array([ax + aorta_r * np.cos(ang), ay + aorta_r * np.sin(ang), zc]), u(0.8, 2.0))
        )
    tube(
        T.ARTERY,
        [(ax, ay, 14), (ax - 2, ay - 14, 6), (ax - 4, ay - 24, -10), (ax - 6, ay - 26, -200)],
        [4.5, 4.5, 4, 3.5],
    )  # SMA
    tube(
        T.ARTERY,
        [(ax, ay, 30), (ax, ay - 16, 34), (60 * sx, ay - 14, 38), sp + [-25, -15, 0]],
        [4, 3, 2.8, 2.5],
    )  # celiac + splenic artery
    for _ in range(int(rng.integers(8, 16))):
        zb = u(-150, -25)
        start = (
            np.array((ax - 6, ay - 26, zb)) if rng.random() < 0.5 else conf + [-6, -8, zb - conf[2]]
        )
        ang = u(-2.6, -0.5)
        end = start + [70 * np.cos(ang) * u(0.5, 1.3), 60 * np.sin(ang) * u(0.4, 1.0), u(-30, 10)]
        kind = T.ARTERY if start[0] > ax - 10 else T.VEIN
        tube(kind, [start, (start + end) / 2 + rng.uniform(-8, 8, 3), end], [u(2, 3), 2, 1.5])
    ivc = (-25 * sx, ys - 30)
    ivc_top = (ivc[0] + 5, ivc[1] - 10, dome_r + 10)
    tube(
        T.IVC, [(ivc[0], ivc[1], -250), (ivc[0], ivc[1], dome_r - 20), ivc_top], [u(9, 12), 11, 11]
    )
    lrv_z = u(-30, -10)
    tube(
        T.IVC,
        [(60 * sx, ys - 2, lrv_z), (ax, ay - 14, lrv_z + 3), (ivc[0], ivc[1], lrv_z + 5)],
        [5, 3.5, 5],
    )  # left renal vein between the aorta and the SMA
    hv0 = np.array((ivc[0] + 5, ivc[1] - 8, dome_r - 18))
    for end in (
        (-95 * sx, -0.2 * B, dome_r - 45),
        (-45 * sx, -0.65 * B, dome_r - 40),
        (25 * sx, -0.7 * B, dome_r - 30),
    ):
        tube(T.HVEIN, [hv0, _jit(rng, end, 6)], [6, 3])
    cbd_r = u(2.5, 3.5) * (
        2.5
        if findings.duct_dilated and findings.lesion_location == "head" and rng.random() < 0.6
        else 1.0
    )
    tube(
        T.BILE,
        [(-40 * sx, ay - 28, 50), (-42, ay - 14, 15), P[1] + [-4, 10, 0], amp],
        [cbd_r, cbd_r, cbd_r, 1.5],
    )

    fat_base = u(0.08, 0.18) if findings.fatty_pancreas else u(0.0, 0.03)
    lob = u(0.10, 0.18) if (findings.fatty_pancreas or rng.random() < 0.4) else u(0.04, 0.10)
    if variation is not None:
        lob *= variation.lobulation_factor
    vert = []
    z = 10.0 + u(-12, 12) + 33.0 * 8
    for k in range(16):
        vert.append((z - 33.0 * k, 23.0 + 0.4 * k))
    box_lo, box_hi = (-230, -190, bottom - 10), (230, 190, top + 10)
    fields = {
        "texture": SmoothField(rng, box_lo, box_hi, 8.0),
        "lobule": SmoothField(rng, np.min(P, 0) - 30, np.max(P, 0) + 30, 2.5),
        "lesion": SmoothField(rng, np.min(P, 0) - 30, np.max(P, 0) + 30, 3.0),
        "bubbles": SmoothField(rng, (-150, -120, -200), (150, 60, 60), 4.0),
    }
    muscle_mm, fat_mm = u(7, 13), u(10, 45)
    if variation is not None:
        muscle_mm, fat_mm = variation.muscle_mm, variation.fat_mm
    return Anatomy(
        cavity=(A, B),
        muscle_mm=muscle_mm,
        fat_mm=fat_mm,
        dome_z=dome,
        spine_y=ys,
        vertebrae=vert,
        z_range=(bottom, top),
        pancreas=pancreas,
        duct=duct,
        lesion=les,
        findings=findings,
        atrophy_t=atrophy_t,
        atrophy_factor=u(0.55, 0.75),
        fat_base=fat_base,
        lobulation=lob,
        calcs=calcs,
        other_calcs=other_calcs,
        n_pre=n_pre,
        organs=organs,
        fields=fields,
    )
