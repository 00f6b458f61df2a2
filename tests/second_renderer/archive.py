"""Second-renderer studies and archives (DICOM + labels + truth.parquet, the phantom layout).

:func:`make_study` renders one subject with :mod:`tests.second_renderer.anatomy` and
:mod:`tests.second_renderer.render` and returns a :class:`pdacscreen.io.phantom.subject.Subject`
(the generator's plain container), so the archive is written by the generator's own DICOM writer
(:func:`pdacscreen.io.phantom.dicom.write_study`: headers, vendors, layouts; a plain writer) and
label writer; everything the images show comes from this package.

Layout of ``out/`` (what ``pdacscreen assess --archive`` reads)::

    dicom/...                        DICOM studies (nested opaque folders)
    labels/<nc series uid>.nii.gz    0 background, 1 pancreas, 2 lesion, non-contrast grid
    truth.parquet                    one row per study (the phantom archive's columns it needs)
    second_renderer.json             the parameters

Study ``k`` of seed ``S`` is deterministic; UIDs are keyed on ``SEED_BASE + S`` so they never
collide with a ``pdacscreen phantom`` archive of seed ``S``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pdacscreen.io.nifti import write_labels
from pdacscreen.io.phantom.subject import Subject
from pdacscreen.io.phantom.vendors import VENDORS
from pdacscreen.io.types import affine_from_geometry
from tests.second_renderer.anatomy import draw_anatomy
from tests.second_renderer.render import (
    ID,
    Acquisition,
    add_noise,
    draw_hu,
    form_image,
    lesion_dprime,
)

__all__ = ["make_study", "write_archive", "study_lesion_type", "SEED_BASE", "THICKNESSES"]

SEED_BASE = 7_000_000
THICKNESSES = (2.0, 3.0, 4.0, 6.0)
_SALT = 0x5345434E  # "SECN"
_GOLDEN = 0.6180339887498949


def study_lesion_type(seed: int, index: int, pdac_fraction: float = 0.5) -> str:
    """PDAC on a golden-ratio sequence (every prefix near ``pdac_fraction``); 1 in 4 of the rest
    holds a cyst."""
    u0 = float(np.random.default_rng([_SALT, int(seed)]).random())
    if (u0 + index * _GOLDEN) % 1.0 < pdac_fraction:
        return "pdac"
    r = float(np.random.default_rng([_SALT, int(seed), int(index), 1]).random())
    return "cyst" if r < 0.25 else "none"


def make_study(
    seed: int,
    index: int,
    *,
    matrix: int = 256,
    lesion_type: str | None = None,
    hu_offset: float | None = None,
    noise_hu: float | None = None,
    noise_kind: str | None = None,
):
    """Study ``index`` of archive ``seed``: ``(Subject, truth dict)``; see the module.

    ``hu_offset``, ``noise_hu`` and ``noise_kind`` ("white" | "streaky") override single draws
    (the rest of the study stays the same), for ablations of where failures come from.
    """
    lt = study_lesion_type(seed, index) if lesion_type is None else lesion_type
    ar, qr, nr = (
        np.random.default_rng(s) for s in np.random.SeedSequence([_SALT, seed, index]).spawn(3)
    )
    an = draw_anatomy(ar, lt)
    nc_lut, pv_lut, offset = draw_hu(ar, fatty=an.fatty_pancreas)
    if hu_offset is not None:
        shift = np.float32(float(hu_offset) - offset)
        for lut in (nc_lut, pv_lut):
            lut[[i for i in range(len(lut)) if i not in (ID["air"], ID["gas"])]] += shift
        offset = float(hu_offset)
    vendor = VENDORS[int(qr.integers(len(VENDORS)))]
    model = vendor.models[int(qr.integers(len(vendor.models)))]
    kernel, _ = vendor.kernels[int(qr.integers(len(vendor.kernels)))]
    A, B = an.cavity
    cx, cy = qr.uniform(-25, 25), qr.uniform(-10, 30)
    half = max(A + an.muscle_mm + an.fat_mm + abs(cx), B + an.muscle_mm + an.fat_mm + 20 + abs(cy))
    dx = round(max(2.0 * half + 10.0, 300.0) / matrix, 4)
    thk = float(THICKNESSES[int(qr.integers(len(THICKNESSES)))])
    n_sl = max(int(round((an.z_range[1] - an.z_range[0]) / thk)), 2)
    gx = cx + (np.arange(matrix) - (matrix - 1) / 2) * dx
    gy = cy + (np.arange(matrix) - (matrix - 1) / 2) * dx
    gz = an.z_range[0] + np.arange(n_sl) * thk
    kind = "white" if qr.random() < 0.5 else "streaky"
    kind = kind if noise_kind is None else noise_kind
    acq = Acquisition(
        gz=gz,
        gy=gy,
        gx=gx,
        thickness_mm=thk,
        psf_sigma_mm=float(qr.uniform(0.4, 1.1)),
        noise_kind=kind,
        noise_hu=float(qr.uniform(10, 24)) if noise_hu is None else float(noise_hu),
        streak_px=float(qr.uniform(1.5, 3.5)),
    )
    world_shift = np.array([qr.uniform(-25, 25), qr.uniform(-30, 60), qr.uniform(-800, 200)])
    kvp = float(qr.choice([100, 120, 140]))
    delta_nc = an.lesion.delta_nc if an.lesion is not None else 0.0
    delta_pv = an.lesion.delta_pv if an.lesion is not None else 0.0
    nc, tissue = form_image(an, acq, nc_lut, delta=delta_nc)
    pv, _ = form_image(an, acq, pv_lut, delta=delta_pv)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    fov = (xx - cx) ** 2 + (yy - cy) ** 2 <= (matrix * dx / 2.0) ** 2
    for vol in (nc, pv):
        add_noise(vol, acq, nr)
        np.round(vol, out=vol)
        np.clip(vol, -1024, 3071, out=vol)
        vol[:, ~fov] = -1024.0
    labels = np.zeros(tissue.shape, np.uint8)
    labels[tissue == ID["panc"]] = 1
    labels[(tissue == ID["pdac"]) | (tissue == ID["cyst"])] = 2
    labels[:, ~fov] = 0
    affine = affine_from_geometry(
        origin=np.array([gx[0], gy[0], gz[0]]) + world_shift,
        row_dir=np.array([1.0, 0, 0]),
        col_dir=np.array([0, 1.0, 0]),
        slice_dir=np.array([0, 0, 1.0]),
        spacing=(thk, dx, dx),
    )
    les = an.lesion
    centre = np.full(3, np.nan) if les is None else np.asarray(les.center) + world_shift
    vvol = thk * dx * dx / 1000.0
    truth = {
        "renderer": "second_renderer",
        "label": int(lt == "pdac"),
        "lesion_type": lt,
        "lesion_diameter_mm": round(2 * les.radius, 2) if les else 0.0,
        "lesion_center_x_mm": float(centre[0]),
        "lesion_center_y_mm": float(centre[1]),
        "lesion_center_z_mm": float(centre[2]),
        "lesion_location": les.location if les else "",
        "lesion_shape": les.shape if les else "",
        "lesion_delta_nc_hu": round(float(delta_nc), 2),
        "fatty_pancreas": an.fatty_pancreas,
        "parenchyma_hu": round(float(nc_lut[ID["panc"]]), 1),
        "hu_offset": round(offset, 2),
        "subcutaneous_fat_mm": round(an.fat_mm, 1),
        "pancreas_volume_ml": round(float((labels >= 1).sum() * vvol), 1),
        "lesion_volume_ml": round(float((labels == 2).sum() * vvol), 2),
        "manufacturer": vendor.manufacturer,
        "model": model,
        "kernel": kernel,
        "slice_thickness_mm": thk,
        "noise_hu": round(acq.noise_hu, 2),
        "noise_kind": kind,
        "streak_px": round(acq.streak_px, 3) if kind == "streaky" else 0.0,
        "psf_sigma_mm": round(acq.psf_sigma_mm, 3),
        "matrix": int(matrix),
        "pixel_spacing_mm": dx,
        "n_slices": int(n_sl),
        "kvp": kvp,
        **lesion_dprime(an, acq, nc_lut),
    }
    sub = Subject(nc, pv, labels, affine, (thk, dx, dx), fov, tissue, truth, int(index))
    return sub, truth


def _write_truth(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["study_index"])
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})
    tmp = path.with_suffix(".parquet.part")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_archive(out: Path, *, studies: int, seed: int, matrix: int = 256, start: int = 0) -> Path:
    """Write studies ``start .. start + studies - 1``; returns the truth table's path.

    Studies already in ``out/truth.parquet`` are kept (an archive grows by calling again).
    """
    import pyarrow.parquet as pq

    from pdacscreen.io.phantom.dicom import write_study

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = {"generator": "tests.second_renderer", "seed": int(seed), "matrix": int(matrix)}
    manifest = out / "second_renderer.json"
    if manifest.exists() and json.loads(manifest.read_text()) != params:
        raise ValueError(f"{out} holds a second-renderer archive made with other parameters")
    manifest.write_text(json.dumps(params, indent=1))
    truth_path = out / "truth.parquet"
    rows = pq.read_table(truth_path).to_pylist() if truth_path.exists() else []
    done = {r["study_index"] for r in rows}
    for k in range(start, start + studies):
        if k in done:
            continue
        sub, truth = make_study(seed, k, matrix=matrix)
        row = {"study_index": k, "seed": int(seed)}
        row.update(
            write_study(
                sub, root=out, seed=SEED_BASE + int(seed), index=k, matrix=matrix, compress="none"
            )
        )
        row.update(truth)
        lab = out / "labels" / f"{row['noncontrast_series_uid']}.nii.gz"
        lab.parent.mkdir(parents=True, exist_ok=True)
        write_labels(sub.labels, sub.affine, lab)
        row["label_path"] = lab.relative_to(out).as_posix()
        rows.append(row)
        _write_truth(truth_path, rows)
    return truth_path
