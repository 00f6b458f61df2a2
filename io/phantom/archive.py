"""Generate a phantom DICOM archive with ground truth, in parallel, deterministically.

Layout of ``out/``::

    dicom/<xx>/<study>/...       DICOM files in nested opaque folders (see phantom_dicom)
    labels/<nc series uid>.nii.gz  label map on the non-contrast grid (0 bg, 1 pancreas, 2 lesion)
    truth.parquet                one row per study (see ``generate_archive``)
    phantom.json                 the parameters the archive was made with
    preview/                     PNG slices (``preview=True``)

Study ``k`` of seed ``S`` is the same patient, with the same UIDs and bytes, whatever the number of
studies, so an archive grows by calling again with a larger ``studies`` (existing studies are
skipped, their files untouched) or with ``start=K`` to write studies ``K..K+studies-1``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdacscreen.io.errors import InputError
from pdacscreen.io.nifti import write_labels
from pdacscreen.io.phantom.followup import follow_up_course
from pdacscreen.io.phantom.subject import MATRICES, make_subject

__all__ = ["ArchiveSummary", "generate_archive", "study_plan", "render_preview"]

log = logging.getLogger(__name__)
_SALT = 0x41524348  # "ARCH"
_GOLDEN = 0.6180339887498949
VERSION = 1
PREVIEW_STUDIES = 8  # preview=True renders the first few studies written


@dataclass(frozen=True)
class ArchiveSummary:
    """What :func:`generate_archive` did. Paths are absolute; ``seconds`` is wall time."""

    out: Path
    truth_path: Path
    labels_dir: Path
    studies_total: int
    studies_written: int
    studies_skipped: int
    files_written: int
    bytes_written: int
    seconds: float
    transfer_syntaxes: tuple[str, ...]
    pdac_studies: int


def study_plan(seed: int, index: int, pdac_fraction: float) -> tuple[int, bool]:
    """(subject seed, is PDAC) of study ``index``: independent of the archive size.

    PDAC studies follow a golden-ratio sequence, so every prefix of an archive holds close to
    ``pdac_fraction`` PDACs.
    """
    ss = np.random.SeedSequence([_SALT, int(seed), int(index)])
    sub_seed = int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(2))
    u0 = float(np.random.default_rng(np.random.SeedSequence([_SALT, int(seed)])).random())
    return sub_seed, ((u0 + index * _GOLDEN) % 1.0) < pdac_fraction


def _one_study(args: tuple) -> dict:
    """Worker: make subject ``index``, write its DICOM study and label map; return its truth row."""
    out, seed, index, matrix, compress, pdac_fraction, preview, months = args
    from pdacscreen.io.phantom.dicom import write_study

    out = Path(out)
    if months:  # study slot `index` is visit v of patient p
        p, v = divmod(int(index), len(months))
        sub_seed, is_pdac = study_plan(seed, p, pdac_fraction)
        course = "progressor" if is_pdac else "stable"
        visit = follow_up_course(course, tuple(months))[v]
        sub = make_subject(
            sub_seed, matrix=matrix, lesion_type="pdac" if is_pdac else "none",
            observer=True, visit=visit,
        )  # fmt: skip
        extra = {"patient_index": p, "course": course, "visit": (p, float(months[v]))}
    else:
        sub_seed, is_pdac = study_plan(seed, index, pdac_fraction)
        sub = make_subject(sub_seed, matrix=matrix, pdac=is_pdac, observer=True)
        extra = {}
    row = {"study_index": int(index), "seed": int(seed), "subject_seed": sub_seed}
    row.update(
        write_study(
            sub, root=out, seed=seed, index=index, matrix=matrix, compress=compress,
            visit=extra.pop("visit", None),
        )
    )  # fmt: skip
    row.update(sub.truth)
    row.update(extra)
    lab_path = out / "labels" / f"{row['noncontrast_series_uid']}.nii.gz"
    lab_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = lab_path.with_name(lab_path.name + ".part.nii.gz")
    write_labels(sub.labels, sub.affine, tmp)
    os.replace(tmp, lab_path)
    row["label_path"] = lab_path.relative_to(out).as_posix()
    if preview:
        render_preview(sub, out / "preview" / f"study{index:06d}_{row['lesion_type']}.png")
    return row


def render_preview(sub, path: Path) -> Path:
    """PNG of the axial slice through the lesion (or the middle of the pancreas), W400/L40.

    Panels: non-contrast, portal venous, non-contrast with the label outline (green pancreas,
    red lesion).  Pixels are repeated so the image is about 512 wide per panel.
    """
    from PIL import Image

    from pdacscreen.io.types import world_to_voxel

    t = sub.truth
    if t["lesion_type"] != "none":
        c = [t["lesion_center_x_mm"], t["lesion_center_y_mm"], t["lesion_center_z_mm"]]
        k = int(round(world_to_voxel(sub.affine, np.array(c))[0]))
    else:
        zs = np.nonzero((sub.labels >= 1).any(axis=(1, 2)))[0]
        k = (
            int(zs[np.argmax((sub.labels[zs] >= 1).sum(axis=(1, 2)))])
            if len(zs)
            else sub.labels.shape[0] // 2
        )

    def win(a):
        return (np.clip((a - (40 - 200)) / 400.0, 0, 1) * 255).astype(np.uint8)

    a, b, lab = win(sub.noncontrast[k]), win(sub.contrast[k]), sub.labels[k]
    rgb = np.stack([a, a, a], -1)
    over = rgb.copy()
    from scipy import ndimage

    for value, color in ((1, (0, 220, 0)), (2, (255, 40, 40))):
        m = lab == value
        edge = m & ~ndimage.binary_erosion(m)
        over[edge] = color
    img = np.concatenate([rgb, np.stack([b, b, b], -1), over], axis=1)
    rep = max(1, 512 // lab.shape[0])
    img = img.repeat(rep, 0).repeat(rep, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def _check(studies, seed, matrix, compress, pdac_fraction, workers, start) -> None:

    def bad(field, value, allowed):
        raise InputError(f"{field} must be {allowed}, got {value!r}", code=f"bad_{field}")

    if not isinstance(studies, (int, np.integer)) or studies < 0:
        bad("studies", studies, "a non-negative integer")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        bad("seed", seed, "a non-negative integer")
    if matrix not in MATRICES:
        bad("matrix", matrix, f"one of {MATRICES}")
    if compress not in ("none", "mixed"):
        bad("compress", compress, "'none' or 'mixed'")
    if not 0.0 <= float(pdac_fraction) <= 1.0:
        bad("pdac_fraction", pdac_fraction, "between 0 and 1")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        bad("workers", workers, "a positive integer or None")
    if not isinstance(start, (int, np.integer)) or start < 0:
        bad("start", start, "a non-negative integer")


def _write_truth(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["study_index"])
    keys = list(dict.fromkeys(k for r in rows for k in r))  # columns added later are kept
    table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})
    tmp = path.with_suffix(".parquet.part")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


#: a progressor's diagnosis date: this many days after its last visit
DIAGNOSIS_AFTER_LAST_VISIT_DAYS = 61


def _add_diagnoses(rows: list[dict], months: tuple[float, ...]) -> None:
    """A progressor's diagnosis date (last visit + 61 days) on each of its visit rows."""
    import datetime as dt

    last = {}
    for r in rows:
        if r.get("visit_index") == len(months) - 1:
            last[r["patient_index"]] = dt.datetime.strptime(r["study_date"], "%Y%m%d").date()
    for r in rows:
        d = last.get(r["patient_index"]) if r["course"] == "progressor" else None
        r["diagnosis_date"] = (
            (d + dt.timedelta(days=DIAGNOSIS_AFTER_LAST_VISIT_DAYS)).isoformat() if d else ""
        )


def _write_diagnoses(path: Path, rows: list[dict]) -> None:
    """``diagnoses.csv`` in the study form of ``pdacscreen evaluate --diagnoses``."""
    import csv

    tmp = path.with_suffix(".csv.part")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_instance_uid", "label", "diagnosis_date", "study_date"])
        for r in sorted(rows, key=lambda r: r["study_index"]):
            sd = r["study_date"]
            w.writerow(
                [
                    r["study_instance_uid"],
                    int(r["course"] == "progressor"),
                    r["diagnosis_date"],
                    f"{sd[:4]}-{sd[4:6]}-{sd[6:]}",
                ]
            )
    os.replace(tmp, path)


def generate_archive(
    out: Path,
    *,
    studies: int,
    seed: int,
    matrix: int = 256,
    compress: str = "none",
    pdac_fraction: float = 0.5,
    workers: int | None = None,
    start: int = 0,
    preview: bool = False,
    progress: Callable[[int, int], None] | None = None,
    follow_up_months: tuple[float, ...] = (),
) -> ArchiveSummary:
    """Write studies ``start .. start+studies-1`` of the phantom archive ``seed`` into ``out``.

    Studies already listed in ``out/truth.parquet`` are skipped (so a larger ``studies`` extends
    an archive); an existing archive made with other parameters is refused (``archive_mismatch``).
    ``workers``: processes (default: CPU count, at most 8; 1 = in this process).

    ``truth.parquet`` columns: study_index, seed, subject_seed, patient_id, study_instance_uid,
    label, lesion_type, lesion_diameter_mm, lesion_center_x_mm/_y_mm/_z_mm (LPS), lesion_location,
    fatty_pancreas, calcifications, duct_dilated, atrophy, noncontrast_series_uid,
    contrast_series_uid, localizer/reformat/secondary_capture series uids, manufacturer, model,
    kernel, slice_thickness_mm, noise_hu, matrix, pixel_spacing_mm, transfer syntaxes, series
    descriptions, contrast-agent tags, language, layout, study_dir, label_path, lesion_dprime and
    lesion_effective_contrast_hu (the lesion's known-location NPW detectability and its contrast
    to the surrounding gland, non-contrast phase, NaN without a lesion: see
    :mod:`pdacscreen.io.phantom.observer`; about 12% of a subject's CPU time), patient_height_m
    (the PatientSize written, NaN for the 30% of patients without one), and more.

    ``follow_up_months`` (e.g. ``(0, 12, 24)``): ``studies`` counts *patients*, each scanned at
    these months (:func:`pdacscreen.io.phantom.followup.follow_up_course`: a PDAC patient is a
    ``progressor`` whose lesion appears half-way and grows, the others are ``stable`` with no
    lesion), one DICOM study per visit with the patient's PatientID and the dates moved on; the
    truth gains patient_index, course, visit_index, visit_months and diagnosis_date (a
    progressor's, two months after the last visit), and ``diagnoses.csv`` (study form of
    ``pdacscreen evaluate --diagnoses``) is written beside it.
    """
    import pyarrow.parquet as pq

    _check(studies, seed, matrix, compress, pdac_fraction, workers, start)
    months = tuple(float(m) for m in follow_up_months)
    if months:
        follow_up_course("stable", months)  # validates the months (ascending from 0)
    t0 = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "generator": "pdacscreen-phantom",
        "version": VERSION,
        "seed": int(seed),
        "matrix": int(matrix),
        "compress": compress,
        "pdac_fraction": float(pdac_fraction),
        **({"follow_up_months": list(months)} if months else {}),
    }
    manifest = out / "phantom.json"
    truth_path = out / "truth.parquet"
    rows: list[dict] = []
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old != params:
            raise InputError(
                f"{out} holds a phantom archive made with {old}, not {params}; use another folder",
                code="archive_mismatch",
            )
        if truth_path.exists():
            rows = pq.read_table(truth_path).to_pylist()
    elif any(out.iterdir()):
        raise InputError(
            f"{out} is not empty and holds no phantom.json; use an empty folder",
            code="archive_mismatch",
        )
    manifest.write_text(json.dumps(params, indent=1))
    done = {r["study_index"] for r in rows}
    per = max(1, len(months))  # study slots per patient
    todo = [k for k in range(start * per, (start + studies) * per) if k not in done]
    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    jobs = [
        (
            str(out),
            int(seed),
            k,
            int(matrix),
            compress,
            float(pdac_fraction),
            preview and i < PREVIEW_STUDIES,
            months,
        )
        for i, k in enumerate(todo)
    ]
    new: list[dict] = []
    last_save = time.perf_counter()

    def collect(row: dict) -> None:
        nonlocal last_save
        new.append(row)
        if progress is not None:
            progress(len(new), len(jobs))
        if time.perf_counter() - last_save > 60:  # checkpoint so a crash loses little
            _write_truth(truth_path, rows + new)
            last_save = time.perf_counter()

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            collect(_one_study(job))
    else:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            for row in pool.map(_one_study, jobs, chunksize=1):
                collect(row)
    if months:
        _add_diagnoses(rows + new, months)
    if new or not truth_path.exists():
        _write_truth(truth_path, rows + new)
    all_rows = rows + new
    if months:
        _write_diagnoses(out / "diagnoses.csv", all_rows)
    ts = sorted(
        {
            r[c]
            for r in all_rows
            for c in ("noncontrast_transfer_syntax", "contrast_transfer_syntax")
        }
    )
    summary = ArchiveSummary(
        out=out,
        truth_path=truth_path,
        labels_dir=out / "labels",
        studies_total=len(all_rows),
        studies_written=len(new),
        studies_skipped=studies * per - len(todo),
        files_written=sum(r["n_files"] for r in new),
        bytes_written=sum(r["n_bytes"] for r in new),
        seconds=time.perf_counter() - t0,
        transfer_syntaxes=tuple(ts),
        pdac_studies=sum(int(r["label"]) for r in all_rows),
    )
    log.info(
        "phantom archive %s: %d studies written, %d skipped in %.1f s",
        out,
        summary.studies_written,
        summary.studies_skipped,
        summary.seconds,
    )
    return summary
