"""Synthetic abdominal CT subjects with a pancreas, findings and ground truth (in memory).

Public API (stable; other stages code against it):

* :func:`make_subject` ``(seed, *, matrix=256, pdac=None, lesion_type=None, ...) -> Subject``: one
  patient, non-contrast and portal-venous volumes of the same anatomy on the same grid, a label map
  and the ground truth.  Deterministic for a seed; the anatomy depends only on ``seed`` (the matrix
  changes the sampling, not the patient).
* :func:`generate_archive` ``(out, *, studies, seed, matrix=256, compress="none",
  pdac_fraction=0.5, workers=None, start=0) -> ArchiveSummary``: the DICOM archive with
  ``truth.parquet`` and label maps (implemented in :mod:`pdacscreen.io.phantom.archive`).

Additions since the API was first published (no signature changed): ``Subject.tissue`` (tissue
class per voxel), ``make_subject`` keywords ``fatty_pancreas``, ``lesion_diameter_mm``,
``lesion_location``, ``slice_thickness_mm``, ``noise_hu``; ``generate_archive`` keywords ``start``,
``preview`` and ``progress``.

Image formation: tissues are painted at the voxel centres of the target grid with three sub-slices
per slice when slices are thick (slab integration = partial volume along z), organ textures are
added, the slab is averaged, blurred in-plane by the kernel's point-spread function, calcifications
are added as partial-volume point sources, then spatially correlated noise (8-25 HU, grain set by
the kernel) is added; values are rounded to integer HU and the outside of the circular
reconstruction field of view is set to -1024 (the DICOM writer stores the vendor's padding there).

Findings: PDAC diameter 5-45 mm (42% drawn from 5-20 mm), head 65% / body 22% / tail 13%,
5-20 HU below the parenchyma without contrast and 30-60 HU below it in the portal-venous phase, with
an infiltrative margin; upstream duct dilation (head 75%, body 60%, tail 15%), with atrophy in 60%
of those.  Non-PDAC subjects: a simple cyst (5-30 mm, fluid) in 1 of 4, chronic pancreatitis in 6%
of the rest (calcifications, often a dilated duct and atrophy: confounders).  Fatty pancreas in 20%
(interdigitated fat lowers the gland towards 0-25 HU; tumour holds no fat, so in a fatty gland a
PDAC may look iso- or hyperattenuating).  Incidental renal/hepatic cysts, aortic calcifications
and fatty liver occur as in a screening population.

Label map: 0 background, 1 pancreas (parenchyma and main duct), 2 the study's focal lesion (PDAC or
cyst; see ``truth["lesion_type"]``).  A voxel is labelled by the majority of its sub-slices.  The
truth lesion centre always lies in a voxel labelled 2 (the nominal centre, or the nearest lesion
voxel when a vessel runs through the nominal centre).

Slice counts are capped per matrix to keep generation quick (128: 100, 256: 160, 512: 320 slices);
with z-coverage 180-300 mm this means 2-5 mm slices at matrix 128, >= 1.25 mm at 256 and the full
0.625-5 mm range at 512.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pdacscreen.io.errors import InputError
from pdacscreen.io.phantom.anatomy import Findings, draw_anatomy
from pdacscreen.io.phantom.followup import Visit
from pdacscreen.io.phantom.levels import level_truth
from pdacscreen.io.phantom.observer import ImageFormation, lesion_visibility
from pdacscreen.io.phantom.render import attenuation, render
from pdacscreen.io.phantom.shapes import Canvas
from pdacscreen.io.phantom.tissue import N_TISSUES, T, draw_hu
from pdacscreen.io.phantom.variation import draw_variation
from pdacscreen.io.phantom.vendors import draw_vendor
from pdacscreen.io.types import affine_from_geometry

__all__ = [
    "Subject",
    "make_subject",
    "subject_findings",
    "MATRICES",
    "SLICE_CAP",
    "LESION_TYPES",
]

MATRICES = (128, 256, 512)
SLICE_CAP = {128: 100, 256: 160, 512: 320}
LESION_TYPES = ("pdac", "cyst", "none")
_SALT = 0x50444143  # "PDAC"
_CHUNK_VOXELS = 6_000_000


@dataclass(frozen=True)
class Subject:
    """One synthetic patient.

    Attributes:
        noncontrast: ``(z, y, x)`` float32 HU (integer-valued), non-contrast phase.
        contrast: ``(z, y, x)`` float32 HU, portal-venous phase, same anatomy and grid.
        labels: ``(z, y, x)`` uint8: 0 background, 1 pancreas, 2 lesion (PDAC or cyst).
        affine: 4x4, index ``(k, j, i, 1)`` -> patient LPS mm (pdacscreen convention); slices
            ascend in z (feet to head), rows run anterior to posterior, columns right to left.
        spacing: ``(dz, dy, dx)`` mm.
        fov_mask: ``(y, x)`` bool, True inside the circular reconstruction field of view.
        tissue: ``(z, y, x)`` uint8 tissue class at each voxel centre (ids in
            :class:`pdacscreen.io.phantom.tissue.T`: liver, aorta ...), for tests and auxiliary
            training targets.
        truth: ground-truth and acquisition facts (see :func:`make_subject`).
        seed: the subject seed.
    """

    noncontrast: np.ndarray
    contrast: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    fov_mask: np.ndarray
    tissue: np.ndarray
    truth: dict = field(default_factory=dict)
    seed: int = 0


def _subject_rngs(seed: int) -> list[np.random.Generator]:
    """The subject's four independent streams: findings, anatomy, acquisition, noise."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence([_SALT, int(seed)]).spawn(4)]


def _variation_rng(seed: int) -> np.random.Generator:
    """The fifth stream (``vary=True``): spawned after the four, so they are unchanged."""
    return np.random.default_rng(np.random.SeedSequence([_SALT, int(seed)]).spawn(5)[4])


def subject_findings(
    seed: int, *, pdac: bool | None = None, lesion_type: str | None = None
) -> Findings:
    """The findings :func:`make_subject` draws for ``seed`` (lesion type, size, fatty gland ...),
    without rendering the subject: microseconds instead of seconds."""
    return _draw_findings(_subject_rngs(seed)[0], pdac, lesion_type)


def _draw_findings(
    rng: np.random.Generator, pdac: bool | None, lesion_type: str | None
) -> Findings:
    """All draws happen in a fixed order so overrides do not shift the other findings."""
    u = rng.random
    p_pdac, p_cyst, d_small, d_big, d_cyst = u(), u(), rng.uniform(5, 20), None, rng.uniform(5, 30)
    d_big = rng.triangular(20, 26, 45)
    small = u() < 0.42
    loc_u, cyst_loc_u = u(), u()
    fatty_u, calc_u, cp_u, duct_u, atr_u = u(), u(), u(), u(), u()
    if lesion_type is None:
        is_pdac = (p_pdac < 0.5) if pdac is None else bool(pdac)
        lesion_type = "pdac" if is_pdac else ("cyst" if p_cyst < 0.25 else "none")
    elif lesion_type not in LESION_TYPES:
        raise InputError(
            f"lesion_type must be one of {LESION_TYPES}, got {lesion_type!r}",
            code="bad_lesion_type",
        )
    elif pdac is not None and bool(pdac) != (lesion_type == "pdac"):
        raise InputError(
            f"pdac={pdac} contradicts lesion_type={lesion_type!r}", code="bad_lesion_type"
        )
    fatty = fatty_u < 0.2
    if lesion_type == "pdac":
        diameter = d_small if small else d_big
        location = "head" if loc_u < 0.65 else ("body" if loc_u < 0.87 else "tail")
        duct = duct_u < {"head": 0.75, "body": 0.6, "tail": 0.15}[location]
        atrophy = duct and atr_u < 0.6
        calcs = calc_u < 0.06
    elif lesion_type == "cyst":
        diameter = d_cyst
        location = ("head", "body", "tail")[int(cyst_loc_u * 3)]
        duct, atrophy, calcs = duct_u < 0.05, False, calc_u < 0.05
    else:
        diameter, location = 0.0, ""
        chronic = cp_u < 0.06  # chronic pancreatitis: calcifications, dilated duct, atrophy
        calcs = chronic or calc_u < 0.03
        duct = chronic and duct_u < 0.7
        atrophy = chronic and atr_u < 0.6
    return Findings(
        lesion_type, float(diameter), location, fatty, bool(calcs), bool(duct), bool(atrophy)
    )


def _point_sources(vol: np.ndarray, sources, hu_delta: float, *, origin, spacing, sigma_mm) -> None:
    """Add small bright objects with their true partial volume (Gaussian splat, in place)."""
    dz, dy, dx = spacing
    vox = dz * dy * dx
    for c, r in sources:
        f = np.array([(c[2] - origin[2]) / dz, (c[1] - origin[1]) / dy, (c[0] - origin[0]) / dx])
        sig = np.array(
            [
                max(sigma_mm[0], r / 2) / dz,
                max(sigma_mm[1], r / 2) / dy,
                max(sigma_mm[2], r / 2) / dx,
            ]
        )
        lo = np.floor(f - 3 * sig).astype(int)
        hi = np.ceil(f + 3 * sig).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, vol.shape)
        if np.any(hi <= lo):
            continue
        g = [np.exp(-0.5 * ((np.arange(lo[a], hi[a]) - f[a]) / sig[a]) ** 2) for a in range(3)]
        kern = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        s = kern.sum()
        if s <= 0:
            continue
        amount = hu_delta * (4.0 / 3.0 * np.pi * r**3) / vox
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += (amount * kern / s).astype(np.float32)


def _noise(rng, shape, sigma_px: float, amp: np.ndarray) -> np.ndarray:
    """White noise filtered in-plane (correlated), unit variance, times ``amp`` (y, x) in HU."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, (0, sigma_px, sigma_px), mode="wrap")
    delta = np.zeros((1, 41, 41), np.float32)
    delta[0, 20, 20] = 1.0
    k = ndimage.gaussian_filter(delta, (0, sigma_px, sigma_px))
    n *= np.float32(1.0 / np.sqrt(float((k**2).sum())))
    return n * amp[None].astype(np.float32)


def _lesion_center(labels, nominal, origin, spacing) -> np.ndarray:
    """Body-frame lesion centre: the nominal centre if its voxel is labelled lesion, else the
    nearest lesion voxel (a vessel may run through the nominal centre); when partial volume left
    no lesion voxel, the nominal centre's voxel is labelled lesion."""
    sp = np.asarray(spacing, float)
    kji = np.round((np.asarray(nominal) - origin)[::-1] / sp).astype(int)
    kji = np.clip(kji, 0, np.array(labels.shape) - 1)
    if labels[tuple(kji)] == 2:
        return np.asarray(nominal, float)
    idx = np.argwhere(labels == 2)
    if len(idx) == 0:
        labels[tuple(kji)] = 2
        return origin + (kji * sp)[::-1]
    d = (((idx - (np.asarray(nominal) - origin)[::-1] / sp) * sp) ** 2).sum(axis=1)
    return origin + (idx[int(np.argmin(d))] * sp)[::-1]


def make_subject(
    seed: int,
    *,
    matrix: int = 256,
    pdac: bool | None = None,
    lesion_type: str | None = None,
    fatty_pancreas: bool | None = None,
    lesion_diameter_mm: float | None = None,
    lesion_location: str | None = None,
    slice_thickness_mm: float | None = None,
    noise_hu: float | None = None,
    observer: bool = False,
    visit: Visit | None = None,
    vary: bool = False,
) -> Subject:
    """Make one synthetic patient (both phases, labels, truth); deterministic for ``seed``.

    ``pdac`` forces a PDAC (True) or no PDAC (False: a cyst in about 1 of 4, else normal);
    ``lesion_type`` ("pdac" | "cyst" | "none") forces the finding exactly.  The other keywords
    override single draws (the rest of the subject stays the same).

    ``truth`` holds: label (1 = PDAC), lesion_type, lesion_diameter_mm, lesion_center_x_mm /
    _y_mm / _z_mm (patient LPS, NaN without a lesion), lesion_location (head | body | tail | ""),
    fatty_pancreas, calcifications, duct_dilated, atrophy, lesion_delta_nc_hu (PDAC: HU below the
    parenchyma, non-contrast), parenchyma_hu, pancreas_volume_ml, manufacturer, model, kernel,
    slice_thickness_mm, noise_hu, matrix, pixel_spacing_mm, n_slices, z_coverage_mm, kvp; with
    ``observer=True`` also lesion_dprime and lesion_effective_contrast_hu (non-contrast phase, NaN
    without a lesion; :mod:`pdacscreen.io.phantom.observer`: renders the lesion's neighbourhood
    twice, noise-free, from the same streams; the images are unchanged).

    ``vary=True`` (training data only) widens anatomy and appearance beyond the generator's
    ranges (:mod:`pdacscreen.io.phantom.variation`: pancreas pose and shape, habitus, texture,
    per-tissue HU, noise grain), drawn from a fifth stream; ``truth["varied"]`` (True) records it.  The
    findings are those of the seed without variation.
    """
    if matrix not in MATRICES:
        raise InputError(f"matrix must be one of {MATRICES}, got {matrix!r}", code="bad_matrix")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}", code="bad_seed")
    fr, ar, qr, nr = _subject_rngs(seed)
    findings = _draw_findings(fr, pdac, lesion_type)
    if fatty_pancreas is not None or lesion_diameter_mm is not None or lesion_location is not None:
        kw = findings.__dict__.copy()
        if fatty_pancreas is not None:
            kw["fatty_pancreas"] = bool(fatty_pancreas)
        if findings.lesion_type != "none":
            if lesion_diameter_mm is not None:
                kw["lesion_diameter_mm"] = float(lesion_diameter_mm)
            if lesion_location is not None:
                if lesion_location not in ("head", "body", "tail"):
                    raise InputError(
                        f"lesion_location must be head, body or tail, got {lesion_location!r}",
                        code="bad_lesion_location",
                    )
                kw["lesion_location"] = lesion_location
        findings = Findings(**kw)
    variation = draw_variation(_variation_rng(seed), N_TISSUES) if vary else None
    an = draw_anatomy(ar, findings, variation)
    fatty_liver = bool(ar.random() < 0.12)
    nc_lut, pv_lut, tex_lut = draw_hu(ar, fatty_liver=fatty_liver)
    if variation is not None:
        shift = np.asarray(variation.tissue_offsets_hu, np.float32) + variation.global_offset_hu
        shift[[T.AIR, T.GAS, T.LUNG]] = 0.0  # air and gas keep their calibration
        nc_lut, pv_lut = nc_lut + shift, pv_lut + shift
        tex_lut = tex_lut * np.float32(variation.texture_factor)
    if visit is not None:  # a follow-up study: same anatomy, changed lesion/wall/gland
        an, findings = visit.apply(an, findings)
        qr, nr = visit.streams(seed, qr, nr)

    # Acquisition: vendor, kernel, geometry, noise.
    vendor = draw_vendor(qr)
    model = vendor.models[int(qr.integers(len(vendor.models)))]
    kernel, sharp = vendor.kernels[int(qr.integers(len(vendor.kernels)))]
    A, B = an.cavity
    half_w = A + an.muscle_mm + 0.85 * an.fat_mm
    cx, cy = qr.uniform(-10, 10), qr.uniform(-8, 15)
    need = max(half_w + abs(cx), B + 1.5 * an.muscle_mm + 1.25 * an.fat_mm + abs(cy)) + 8
    dx512 = max(qr.uniform(0.6, 0.9), need / 256.0)
    dx = round(dx512 * 512 / matrix, 4)
    cover = an.z_range[1] - an.z_range[0]
    options = [t for t in vendor.thicknesses if np.ceil(cover / t) <= SLICE_CAP[matrix]]
    thk = float(options[int(qr.integers(len(options)))]) if options else 5.0
    base_noise = qr.uniform(9, 17)
    offset = np.array([qr.uniform(-20, 20), qr.uniform(-40, 70), qr.uniform(-900, 150)])
    kvp = float(qr.choice([100, 120, 120, 140]))
    if slice_thickness_mm is not None:
        thk = float(slice_thickness_mm)
    noise = float(np.clip(base_noise * (2.5 / thk) ** 0.5 * (1.25 if sharp else 1.0), 8, 25))
    if noise_hu is not None:
        noise = float(noise_hu)
    n_sl = max(int(round(cover / thk)), 2)

    gx = cx + (np.arange(matrix) - (matrix - 1) / 2) * dx
    gy = cy + (np.arange(matrix) - (matrix - 1) / 2) * dx
    gz = an.z_range[0] + np.arange(n_sl) * thk
    ss = 3 if thk > 1.5 * dx and n_sl * 3 <= 2.5 * SLICE_CAP[matrix] else 1
    sub = (np.arange(ss) - (ss - 1) / 2) * (thk / ss) if ss > 1 else np.zeros(1)

    nc = np.empty((n_sl, matrix, matrix), np.float32)
    pv = np.empty_like(nc)
    labels = np.empty(nc.shape, np.uint8)
    tissue_c = np.empty(nc.shape, np.uint8)
    les = an.lesion
    per = max(1, _CHUNK_VOXELS // (matrix * matrix * ss))
    for k0 in range(0, n_sl, per):
        k1 = min(n_sl, k0 + per)
        zs = (gz[k0:k1, None] + sub[None, :]).ravel()
        cv = Canvas(zs, gy, gx)
        tissue, fatf, w = render(an, cv)
        tex = an.fields["texture"].sample(zs, gy, gx)
        for lut, out, delta in (
            (nc_lut, nc, les.delta_nc if les else 0.0),
            (pv_lut, pv, les.delta_pv if les else 0.0),
        ):
            hu = attenuation(tissue, fatf, w, tex, lut=lut, texture_lut=tex_lut, lesion_delta=delta)
            out[k0:k1] = hu.reshape(k1 - k0, ss, matrix, matrix).mean(axis=1)
        tissue_c[k0:k1] = tissue.reshape(k1 - k0, ss, matrix, matrix)[:, ss // 2]
        lab = np.zeros(tissue.shape, np.uint8)
        lab[(tissue == T.PANC) | (tissue == T.DUCT)] = 1
        lab[(tissue == T.PDAC) | (tissue == T.CYST)] = 2
        lab = lab.reshape(k1 - k0, ss, matrix, matrix)
        les_frac = (lab == 2).mean(axis=1)
        any_frac = (lab >= 1).mean(axis=1)
        lab_out = np.where(any_frac >= 0.5, 1, 0).astype(np.uint8)
        lab_out[les_frac >= 0.5] = 2
        labels[k0:k1] = lab_out

    origin_body = np.array([gx[0], gy[0], gz[0]])
    psf_mm = 0.6 if sharp else 1.0
    sigma_psf = float(np.clip(psf_mm / dx, 0.45, 1.4))
    calc_hu = ar.uniform(250, 700) if an.calcs else 0.0
    for vol in (nc, pv):
        _point_sources(
            vol,
            an.calcs,
            calc_hu - 40.0,
            origin=origin_body,
            spacing=(thk, dx, dx),
            sigma_mm=(thk / 2.355, psf_mm, psf_mm),
        )
        _point_sources(
            vol,
            an.other_calcs,
            500.0,
            origin=origin_body,
            spacing=(thk, dx, dx),
            sigma_mm=(thk / 2.355, psf_mm, psf_mm),
        )
    # In-plane point-spread function, correlated noise, rounding, field of view.
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    fov = ((xx - cx) ** 2 + (yy - cy) ** 2) <= (matrix * dx / 2.0) ** 2
    r_body = np.sqrt((xx / (A + 30)) ** 2 + (yy / (B + 30)) ** 2)
    amp = noise * np.where(r_body < 1.0, 1.1 - 0.25 * r_body**2, 0.75)
    grain = float(np.clip((0.9 if sharp else 1.4) / dx, 0.5, 2.0))
    if variation is not None:
        grain = variation.grain_px
    visibility = {}
    if observer:
        formation = ImageFormation(
            gz=gz,
            gy=gy,
            gx=gx,
            sub_offsets=sub,
            lut=nc_lut,
            texture_lut=tex_lut,
            lesion_delta=les.delta_nc if les else 0.0,
            psf_sigma_px=sigma_psf,
            grain_px=grain,
            noise_amp_hu=amp,
        )
        visibility = lesion_visibility(an, formation)
    out = []
    for vol, scale in ((nc, 1.0), (pv, float(nr.uniform(0.9, 1.1)))):
        vol = ndimage.gaussian_filter(vol, (0, sigma_psf, sigma_psf), mode="nearest")
        vol += _noise(nr, vol.shape, grain, amp * scale)
        np.round(vol, out=vol)
        np.clip(vol, -1024, 3071, out=vol)
        vol[:, ~fov] = -1024.0
        out.append(vol)
    nc, pv = out
    labels[:, ~fov] = 0
    tissue_c[:, ~fov] = T.AIR

    world_origin = origin_body + offset
    affine = affine_from_geometry(
        origin=world_origin,
        row_dir=np.array([1.0, 0, 0]),
        col_dir=np.array([0, 1.0, 0]),
        slice_dir=np.array([0, 0, 1.0]),
        spacing=(thk, dx, dx),
    )
    center = np.full(3, np.nan)
    if les is not None:
        center = _lesion_center(labels, les.center, origin_body, (thk, dx, dx)) + offset
    vvol = thk * dx * dx / 1000.0
    truth = {
        "label": int(findings.lesion_type == "pdac"),
        "lesion_type": findings.lesion_type,
        "lesion_diameter_mm": round(findings.lesion_diameter_mm, 2),
        "lesion_center_x_mm": float(center[0]),
        "lesion_center_y_mm": float(center[1]),
        "lesion_center_z_mm": float(center[2]),
        "lesion_location": findings.lesion_location,
        "fatty_pancreas": findings.fatty_pancreas,
        "calcifications": findings.calcifications,
        "duct_dilated": findings.duct_dilated,
        "atrophy": findings.atrophy,
        "fatty_liver": fatty_liver,
        "lesion_delta_nc_hu": round(float(les.delta_nc), 2) if les and les.kind == "pdac" else 0.0,
        "parenchyma_hu": round(float(nc_lut[T.PANC]), 1),
        "pancreas_volume_ml": round(float((labels >= 1).sum() * vvol), 1),
        "lesion_volume_ml": round(float((labels == 2).sum() * vvol), 2),
        "manufacturer": vendor.manufacturer,
        "model": model,
        "kernel": kernel,
        "slice_thickness_mm": thk,
        "noise_hu": round(noise, 2),
        "matrix": int(matrix),
        "pixel_spacing_mm": dx,
        "n_slices": int(n_sl),
        "z_coverage_mm": round(n_sl * thk, 1),
        "kvp": kvp,
        **visibility,
        **({"varied": True} if variation is not None else {}),
    }
    truth.update(
        level_truth(an.vertebrae, tissue_c, gz, z_offset=float(offset[2]), pixel_area_mm2=dx * dx)
    )
    if visit is not None:
        truth.update(visit_index=int(visit.index), visit_months=float(visit.months))
    return Subject(nc, pv, labels, affine, (thk, dx, dx), fov, tissue_c, truth, int(seed))
