"""Training data from a phantom archive: truth table, DICOM series, label maps, a disk cache.

A phantom archive (``pdacscreen phantom``) holds DICOM files, ``truth.parquet`` (one row per study,
with ``noncontrast_series_uid``, ``lesion_type`` ...) and ``labels/<noncontrast_series_uid>.nii.gz``
(uint8: 0 background, 1 pancreas, 2 lesion, in the series' grid).

Each study becomes one cached ``.npz`` (preprocessed once, reused by every epoch and every run):

* ``coarse_hu`` float16 ``(z, y, x)``: the whole scan on the stage-1 grid, ``coarse_label`` uint8
  (1 = pancreas incl. lesion);
* ``fine_hu`` float16 ``(z, y, x)``: the true pancreas box plus ``FINE_MARGIN_MM`` at the stage-2
  spacing, ``fine_label`` uint8 (0 background, 1 pancreas, 2 PDAC; a cyst counts as pancreas, so
  the detector learns that a cyst is not a PDAC; applied when loading, so the cache holds the
  archive's labels unchanged);
* the truth (``pdac``, ``lesion_type`` ...) is not cached: it comes from the truth table's record.

Volumes are resampled with :mod:`pdacscreen.kernels` (labels by nearest neighbour, ``order=0``).

:func:`phantom_records` and :func:`make_phantom_studies` make the same arrays in memory from the phantom generator (no
DICOM, no disk cache), for ``pdacscreen train --phantoms N``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from pdacscreen.engine.errors import EngineInputError, TrainingError
from pdacscreen.engine.preprocess import box_around, coarse_grid, fine_crop
from pdacscreen.io.nifti import read_nifti
from pdacscreen.io.phantom.archive import study_plan
from pdacscreen.io.phantom.subject import make_subject, subject_findings
from pdacscreen.io.pseudonym import DEMO_KEY
from pdacscreen.io.types import CTVolume
from pdacscreen.io.volume import load_series
from pdacscreen.kernels import resample, to_host

__all__ = [
    "StudyRecord",
    "PhantomRecord",
    "phantom_records",
    "make_phantom_studies",
    "CachedStudy",
    "archive_records",
    "load_study",
    "build_cache",
    "load_cached",
    "cached_from_arrays",
]

log = logging.getLogger(__name__)

FINE_MARGIN_MM = 20.0  # the stage-2 margin_mm the detector adds to stage 1's box
CACHE_VERSION = 2


@dataclass(frozen=True)
class StudyRecord:
    """One training study of the archive."""

    study_uid: str
    series_uid: str
    lesion_type: str  # "pdac" | "cyst" | "none"
    lesion_diameter_mm: float
    fatty_pancreas: bool
    files: tuple[str, ...]
    label_path: Path
    truth: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def pdac(self) -> bool:
        return self.lesion_type == "pdac"


@dataclass(frozen=True)
class CachedStudy:
    """A preprocessed study (see module docstring)."""

    series_uid: str
    coarse_hu: np.ndarray
    coarse_label: np.ndarray
    fine_hu: np.ndarray
    fine_label: np.ndarray
    pdac: bool
    lesion_type: str
    lesion_diameter_mm: float
    fatty_pancreas: bool


def _series_files(folder: Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> files, from a header-only read of every file under ``folder``."""

    out: dict[str, list[str]] = defaultdict(list)
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix in (".parquet", ".gz", ".json", ".md", ".csv"):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM: skip (truth tables, labels, notes)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if uid:
            out[uid].append(str(path))
    return out


def _col(row, *names, default=None):
    for n in names:
        if n in row and row[n] is not None and not (isinstance(row[n], float) and np.isnan(row[n])):
            return row[n]
    return default


def archive_records(archive: Path) -> list[StudyRecord]:
    """Every study of a phantom archive with its non-contrast series files and label map."""

    archive = Path(archive)
    truth_path = archive / "truth.parquet"
    if not truth_path.is_file():
        raise TrainingError(
            f"{archive}: truth.parquet not found; is this a `pdacscreen phantom` archive?"
        )
    truth = pd.read_parquet(truth_path)
    if "noncontrast_series_uid" not in truth.columns:
        raise TrainingError(
            f"{truth_path}: column noncontrast_series_uid missing; has {list(truth.columns)}"
        )
    everything: dict[str, list[str]] | None = None
    records = []
    for row in truth.to_dict("records"):
        uid = str(row["noncontrast_series_uid"])
        label = archive / "labels" / f"{uid}.nii.gz"
        study_dir = row.get("study_dir")
        if study_dir and (archive / str(study_dir)).is_dir():
            files = _series_files(archive / str(study_dir))  # the study's own folder only
        else:
            everything = everything if everything is not None else _series_files(archive)
            files = everything
        if uid not in files or not label.is_file():
            log.warning(
                "study %s: series files or label map missing, skipped",
                row.get("study_instance_uid"),
            )
            continue
        lesion_type = str(_col(row, "lesion_type", default="none") or "none")
        records.append(
            StudyRecord(
                study_uid=str(_col(row, "study_instance_uid", default=uid)),
                series_uid=uid,
                lesion_type=lesion_type,
                lesion_diameter_mm=float(_col(row, "lesion_diameter_mm", default=0.0) or 0.0),
                fatty_pancreas=bool(_col(row, "fatty_pancreas", default=False)),
                files=tuple(sorted(files[uid])),
                label_path=label,
                truth=dict(row),
            )
        )
    if not records:
        raise TrainingError(f"{archive}: no usable studies (series files + labels) found")
    return records


def load_study(record: StudyRecord) -> tuple[CTVolume, np.ndarray]:
    """The study's non-contrast volume and its label map ``(z, y, x)`` uint8 in the same grid."""

    # Training writes no patient keys anywhere: the demo key only names the volume in memory.
    volume = load_series(
        list(record.files), workers=1, series_instance_uid=record.series_uid, key=DEMO_KEY
    )
    label, affine = read_nifti(record.label_path)
    if label.shape != volume.shape or not np.allclose(affine, volume.affine, atol=1e-3):
        raise TrainingError(
            f"{record.label_path}: label map grid {label.shape} does not match series {volume.shape}"
        )
    return volume, np.asarray(label, dtype=np.uint8)


def preprocess_study(
    volume: CTVolume,
    label: np.ndarray,
    *,
    coarse_mm: tuple,
    fine_mm: tuple,
    margin_mm: float = FINE_MARGIN_MM,
) -> dict[str, np.ndarray]:
    """The cached arrays of one study (see module docstring), made by :mod:`..preprocess`.

    The HU grids are the ones the detector builds at inference (the same functions); only the
    stage-2 box differs: here the true pancreas box plus ``margin_mm``, there stage 1's box.
    """
    coarse, _ = coarse_grid(volume, coarse_mm)
    organ = (label > 0).astype(np.float32)
    coarse_organ, _ = resample(organ, volume.affine, coarse_mm, order=1, fill=0.0, backend="numpy")
    try:
        box = box_around(label, volume.affine, margin_mm)
    except EngineInputError as e:
        raise TrainingError(f"label map of {volume.series_instance_uid}: {e}") from e
    fine, _ = fine_crop(volume.array, volume.affine, box, fine_mm)
    fine_label, _ = fine_crop(label, volume.affine, box, fine_mm, labels=True)
    return {
        "coarse_hu": np.asarray(to_host(coarse)).astype(np.float16),
        "coarse_label": (np.asarray(to_host(coarse_organ)) >= 0.5).astype(np.uint8),
        "fine_hu": np.asarray(to_host(fine)).astype(np.float16),
        "fine_label": np.asarray(to_host(fine_label)).astype(np.uint8),
    }


def _cache_key(record: StudyRecord, settings: dict) -> str:
    blob = json.dumps({"uid": record.series_uid, "v": CACHE_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_cache(
    records: list[StudyRecord],
    *,
    cache_dir: Path,
    coarse_mm: tuple,
    fine_mm: tuple,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Preprocess every record once into ``cache_dir`` (existing entries are reused)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"coarse_mm": list(coarse_mm), "fine_mm": list(fine_mm), "margin": FINE_MARGIN_MM}
    paths = []
    for i, rec in enumerate(records):
        path = cache_dir / f"{_cache_key(rec, settings)}.npz"
        if not path.is_file():
            volume, label = load_study(rec)
            arrays = preprocess_study(volume, label, coarse_mm=coarse_mm, fine_mm=fine_mm)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays, series_uid=np.str_(rec.series_uid))
            tmp.replace(path)
        paths.append(path)
        if progress is not None:
            progress(i + 1, len(records))
    return paths


def load_cached(path: Path, record: StudyRecord) -> CachedStudy:
    """A cached study with the truth of ``record`` (the cache holds arrays only).

    Label 2 is kept only for PDAC: a cyst becomes pancreas (label 1).
    """
    keys = ("coarse_hu", "coarse_label", "fine_hu", "fine_label")
    with np.load(path) as z:
        return cached_from_arrays({k: z[k] for k in keys}, record)


@dataclass(frozen=True)
class PhantomRecord:
    """A training study made in memory by the phantom generator (no DICOM round trip).

    Study ``index`` of ``seed`` is the subject ``pdacscreen phantom --seed SEED`` writes as its
    study ``index`` (:func:`pdacscreen.io.phantom.archive.study_plan`), so ``--phantoms N`` trains
    on the same patients as an archive of N studies made with that seed.
    """

    study_uid: str
    series_uid: str
    lesion_type: str
    lesion_diameter_mm: float
    fatty_pancreas: bool
    index: int
    truth: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def pdac(self) -> bool:
        return self.lesion_type == "pdac"


def phantom_records(*, seed: int, studies: int, pdac_fraction: float = 0.5) -> list[PhantomRecord]:
    """The records of studies ``0..studies-1`` of ``seed`` from their drawn findings alone
    (no subject is rendered), so the split can be made before the studies are."""

    if studies < 4:
        raise TrainingError(f"--phantoms needs at least 4 studies, got {studies}")
    records = []
    for k in range(studies):
        sub_seed, is_pdac = study_plan(seed, k, pdac_fraction)
        f = subject_findings(sub_seed, pdac=is_pdac)
        records.append(
            PhantomRecord(
                study_uid=f"phantom-s{seed}-k{k}",
                series_uid=f"phantom-s{seed}-k{k:05d}",
                lesion_type=f.lesion_type,
                lesion_diameter_mm=float(f.lesion_diameter_mm or 0.0),
                fatty_pancreas=bool(f.fatty_pancreas),
                index=k,
                truth=dict(f.__dict__, subject_seed=sub_seed),
            )
        )
    return records


def _phantom_study(args: tuple) -> tuple[str, dict[str, np.ndarray], tuple | None]:
    """Worker: render one subject and preprocess it like a cached study; the raw volume
    ``(hu int16, spacing, affine)`` only when asked for (validation), so training scans stay
    in the worker."""

    sub_seed, lesion_type, matrix, coarse_mm, fine_mm, keep_volume, vary = args
    # pdac=, as `pdacscreen phantom` does: the same subject as the archive's study
    sub = make_subject(sub_seed, matrix=matrix, pdac=lesion_type == "pdac", vary=vary)
    volume = CTVolume(sub.noncontrast, sub.spacing, sub.affine, series_instance_uid="phantom")
    arrays = preprocess_study(volume, sub.labels, coarse_mm=coarse_mm, fine_mm=fine_mm)
    raw = None
    if keep_volume:
        raw = (sub.noncontrast.astype(np.int16), tuple(sub.spacing), np.asarray(sub.affine))
    return str(sub.truth.get("lesion_type")), arrays, raw


def make_phantom_studies(
    records: list[PhantomRecord],
    *,
    matrix: int,
    coarse_mm: tuple,
    fine_mm: tuple,
    keep_volumes: set[int] = frozenset(),
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    vary: bool = False,
) -> tuple[list[dict[str, np.ndarray]], dict[int, tuple]]:
    """Render and preprocess the subjects of ``records`` (see :class:`PhantomRecord`).

    Returns the cached-study arrays of :func:`preprocess_study` (index-aligned with
    ``records``) and ``{record.index: (hu int16, spacing, affine)}`` for the indices in
    ``keep_volumes``.  Parallel over ``workers`` processes; the result does not depend on it.
    ``vary`` renders each subject with ``make_subject(..., vary=True)`` (anatomy and appearance
    randomisation, :mod:`pdacscreen.io.phantom.variation`).
    """

    jobs = [
        (
            int(r.truth["subject_seed"]),
            r.lesion_type,
            matrix,
            tuple(coarse_mm),
            tuple(fine_mm),
            r.index in keep_volumes,
            bool(vary),
        )
        for r in records
    ]
    if workers <= 1:
        results = map(_phantom_study, jobs)
    else:
        # fork: the workers use NumPy only (the caller has not initialised CUDA yet).
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        results = pool.map(_phantom_study, jobs, chunksize=1)
    arrays, volumes = [], {}
    try:
        for i, (rec, (lesion_type, arr, raw)) in enumerate(zip(records, results, strict=True)):
            if lesion_type != rec.lesion_type:  # the findings draw and the subject disagree
                raise TrainingError(
                    f"{rec.series_uid}: made a {lesion_type!r} subject, planned {rec.lesion_type!r}"
                )
            arrays.append(arr)
            if raw is not None:
                volumes[rec.index] = raw
            if progress is not None:
                progress(i + 1, len(records))
    finally:
        if workers > 1:
            pool.shutdown()
    return arrays, volumes


def cached_from_arrays(arrays: dict[str, np.ndarray], record) -> CachedStudy:
    """A :class:`CachedStudy` from the arrays of :func:`preprocess_study` and ``record``'s truth.

    Label 2 is kept only for PDAC: a cyst becomes pancreas (label 1).
    """
    fine_label = arrays["fine_label"]
    if not record.pdac:
        fine_label = np.where(fine_label == 2, 1, fine_label).astype(np.uint8)
    return CachedStudy(
        series_uid=record.series_uid,
        coarse_hu=arrays["coarse_hu"],
        coarse_label=arrays["coarse_label"],
        fine_hu=arrays["fine_hu"],
        fine_label=fine_label,
        pdac=record.pdac,
        lesion_type=record.lesion_type,
        lesion_diameter_mm=record.lesion_diameter_mm,
        fatty_pancreas=record.fatty_pancreas,
    )
