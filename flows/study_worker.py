"""What runs on Ray workers: the study loader task and the engine actor.

Both take the sweep's :class:`~pdacscreen.flows.config.SweepConfig` explicitly (nothing here reads
the environment) and return the typed values of :mod:`pdacscreen.flows.outcomes`; every error a
study can raise becomes a :class:`StudyOutcome` with a status and an error code, so one bad study
never stops the sweep.  The loader decodes the chosen series and measures its phase ONCE
(:func:`pdacscreen.kernels.measure.measure_phase`, thresholds from the selection rules); the actor
owns one engine, loaded once in ``__init__``, and writes evidence for flagged studies.

DICOM results: with ``config.dicom_results`` ``all`` (default: every ``ok`` study, i.e. every
study with a pancreas) or ``flagged``, the actor writes a DICOM SEG and a TID 1500 SR into
``STORE/dicom/<study folder>/`` (:func:`export_results`).  The engine's masks live on the stage-2
crop grid (resampled at the model's fine spacing); they are mapped back onto the SOURCE series'
own slices by nearest neighbour at each slice's true position
(:func:`pdacscreen.engine.evidence.masks_on_slices`), so a series that ``load_series`` resampled
(uneven spacing) is referenced slice by slice as stored.  The loader reads the headers the SEG
references (no pixel data) while the files are at hand (a DICOMweb cache is deleted after it).
Any export failure becomes an ``ExportRecord`` with a code; the findings row is unchanged.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

import numpy as np
import pydicom

from pdacscreen.engine.evidence import (
    SliceGeometry,
    lesion_components,
    masks_on_slices,
    write_bodycomp_image,
    write_evidence,
)
from pdacscreen.engine.inference import Detector, StudyResult
from pdacscreen.engine.package import ModelPackage, load_package
from pdacscreen.flows.config import SweepConfig
from pdacscreen.flows.outcomes import LoadedStudy, SkippedStudy, StudyOutcome, StudyTask
from pdacscreen.io.dicom.export import (
    Algorithm,
    ExportRecord,
    LesionFinding,
    StudyFinding,
    export_uids,
    headers_to_datasets,
    sort_source,
    source_headers,
    write_seg,
    write_sr,
)
from pdacscreen.io.dicom.read import fs_path
from pdacscreen.io.errors import ErrorCode, PdacscreenError
from pdacscreen.io.volume import load_series
from pdacscreen.kernels.bodycomp import body_composition
from pdacscreen.kernels.measure import measure_phase

log = logging.getLogger(__name__)

__all__ = ["EngineActor", "evidence_folder_name", "export_results", "load_study"]


def load_study(task: StudyTask, config: SweepConfig) -> LoadedStudy | SkippedStudy:
    """Decode the chosen series and decide its phase from the image. Runs as a Ray task.

    Errors that make a study unreadable raise a :class:`~pdacscreen.io.errors.PdacscreenError`
    with a code (the pool turns it into a ``failed`` outcome).
    """
    t0 = time.perf_counter()
    volume = load_series(
        list(task.files),
        workers=1,
        series_instance_uid=task.series_instance_uid,
        key=config.key,
    )
    load_s = time.perf_counter() - t0
    rules = config.rules.phase_check
    phase = measure_phase(
        volume.array,
        volume.affine,
        noncontrast_max_hu=rules.noncontrast_max_hu,
        contrast_min_hu=rules.contrast_min_hu,
        backend="numpy",
    )
    if rules.action(phase.estimate) == "reject":
        return SkippedStudy(
            ErrorCode.PHASE_MISMATCH,
            f"{phase.reason}: the image shows contrast although the tags say non-contrast",
            phase,
        )
    headers: tuple[bytes, ...] = ()
    if config.dicom_results != "none" and volume.series_instance_uid:
        t1 = time.perf_counter()
        try:
            headers = source_headers(task.files, series_instance_uid=volume.series_instance_uid)
        except Exception as e:  # noqa: BLE001 - no headers: the export is skipped, with a code
            log.warning("source headers not read (%s): no DICOM results", type(e).__name__)
        load_s += time.perf_counter() - t1
    return LoadedStudy(
        volume=volume,
        phase=phase,
        load_s=load_s,
        headers=headers,
        patient_height_m=patient_height_m(task.files, volume.series_instance_uid),
    )


def patient_height_m(files, series_instance_uid: str) -> float | None:
    """PatientSize (metres) from the header of the first file of the series, or None when it
    is absent, unreadable or not a number (one small header read; the value is only used for
    the skeletal muscle index and never stored)."""
    for f in files:
        try:
            ds = pydicom.dcmread(
                fs_path(f),
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "PatientSize"],
            )
        except Exception:  # noqa: BLE001 - an unreadable file: try the next one
            continue
        if series_instance_uid and str(ds.get("SeriesInstanceUID", "")) != series_instance_uid:
            continue
        try:
            value = float(ds.get("PatientSize") or "nan")
        except (TypeError, ValueError):
            return None
        return value if np.isfinite(value) and value > 0 else None
    return None


_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def evidence_folder_name(study_instance_uid: str) -> str:
    """A file-system-safe folder name for a study's evidence (UIDs are digits and dots)."""
    return _SAFE.sub("_", study_instance_uid)[:128] or "unknown"


def _assigned_cpus() -> int | None:
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker: let the engine decide
        return None
    return max(1, int(cpus)) if cpus else None


def _node_name() -> str:
    """``host/node-id prefix`` of the Ray node this process runs on (several nodes may share a
    host, as in the tests); the plain host name outside Ray."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - a name for the manifest, never worth failing a study
        pass
    return host


def _body_composition(volume, height_m: float | None = None):
    """The L3 body composition of a loaded series and its findings columns: ``(bc, row)``;
    ``bc`` is None when it could not be measured (the row then says why, never an exception)."""
    try:
        bc = body_composition(volume, backend="numpy")
    except (PdacscreenError, ValueError) as e:
        log.debug("body composition not measured: %s", e)
        return None, {"bodycomp_qc": "not_measured"}
    return bc, bc.row(height_m)


def _geometry(src) -> SliceGeometry:
    """The slices of the sorted source datasets, as the engine's mapping takes them."""
    iop = [float(v) for v in src[0].ImageOrientationPatient]
    dy, dx = (float(v) for v in src[0].PixelSpacing)
    return SliceGeometry(
        positions=np.array([[float(v) for v in d.ImagePositionPatient] for d in src]),
        row_dir=tuple(iop[:3]),
        col_dir=tuple(iop[3:]),
        pixel_spacing=(dy, dx),
        rows=int(src[0].Rows),
        columns=int(src[0].Columns),
    )


def _scrub(text: str, src) -> str:
    """``text`` without the source's patient and accession values (for records and logs)."""
    for kw in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate"):
        value = str(src[0].get(kw, "") or "") if src else ""
        if len(value) >= 3:
            text = text.replace(value, "<redacted>")
    return text[:500]


def export_results(
    result: StudyResult,
    headers: tuple[bytes, ...],
    *,
    study_instance_uid: str,
    folder: Path,
    store: Path,
    package: ModelPackage,
    config: SweepConfig,
) -> tuple[ExportRecord, ...]:
    """Write the SEG and the SR of one assessed study into ``folder``; their records.

    Segments: the pancreas, then each lesion candidate of the engine (largest first) that
    reaches at least one source slice (a candidate thinner than the slice spacing may fall
    between slices and is left out of the SEG and the SR, said in the record's message).
    """
    source = config.source.archive if config.source is not None else None
    rel = Path(folder).relative_to(store)

    def records(status: str, *, code: str | None = None, message: str | None = None):
        """One record per object: ``written`` where its file is, else ``status`` with ``code``."""
        uids = export_uids(study_instance_uid, alg) if alg is not None else {}
        out = []
        for i, obj in enumerate(("seg", "sr")):
            path = paths[i] if i < len(paths) else None
            out.append(
                ExportRecord(
                    study_instance_uid=study_instance_uid,
                    object=obj,
                    action="write",
                    status="written" if path is not None else status,
                    sop_instance_uid=uids.get(obj),
                    series_instance_uid=uids.get(f"{obj}_series"),
                    path=(rel / path.name).as_posix() if path is not None else None,
                    source=source,
                    error_code=None if path is not None else code,
                    message=message,
                )
            )
        return tuple(out)

    alg = None
    src = []
    paths: list[Path] = []
    try:
        alg = Algorithm(
            name=config.model_name,
            version=config.model_version,
            model_sha256=config.model_sha256,
            config_hash=config.hash,
        )
        src = sort_source(headers_to_datasets(headers)) if headers else []
        if not src:
            return records("skipped", code="no_source_headers")
        if any(not str(d.get(k, "")) for d in src for k in ("StudyInstanceUID", "SOPInstanceUID")):
            return records("skipped", code="source_uids_missing")
        if str(src[0].StudyInstanceUID) != study_instance_uid:
            return records("skipped", code="source_uids_missing", message="study UID derived")
        masks = result.masks
        lesions, labels = lesion_components(result)
        planes = masks_on_slices(
            [masks.pancreas, *[(labels == les.label).astype(np.uint8) for les in lesions]],
            masks.affine,
            _geometry(src),
        )
        if not planes[0].any():
            return records("skipped", code="empty_on_source_slices")
        kept = [(les, m) for les, m in zip(lesions, planes[1:], strict=True) if m.any()]
        note = None
        if len(kept) < len(lesions):
            note = f"{len(lesions) - len(kept)} lesion candidate(s) lie between source slices"
        paths.append(
            write_seg(
                src,
                pancreas=planes[0],
                lesions=[m for _, m in kept],
                algorithm=alg,
                out_dir=folder,
            )
        )
        th = package.thresholds
        finding = StudyFinding(
            probability=float(result.pdac_probability),
            flagged=bool(result.pdac_flag),
            threshold=float(result.operating_threshold),
            threshold_provenance=f"operating threshold {th.operating:.4f} of model "
            f"{package.name} {package.version} ({th.method})",
            lesions=tuple(
                LesionFinding(
                    diameter_mm=les.diameter_mm,
                    volume_ml=les.volume_ml,
                    location=les.location,
                    center_lps_mm=les.center_mm,
                )
                for les, _ in kept
            ),
        )
        paths.append(write_sr(src, seg=paths[0], finding=finding, algorithm=alg, out_dir=folder))
        return records("written", message=note)
    except Exception as e:  # noqa: BLE001 - an export failure is a record; the row stays as it is
        message = _scrub(f"{type(e).__name__}: {e}", src)
        log.warning("DICOM export of a study failed: %s", message)
        return records("failed", code="dicom_export_failed", message=message)


class EngineActor:
    """One detection engine per actor; ``process`` maps one loaded study to a StudyOutcome."""

    def __init__(self, config: SweepConfig) -> None:
        self.package = load_package(config.model)
        # As many engine threads as CPUs Ray gave this actor, so actors and loaders share cores.
        self.detector = Detector(self.package, config=config.engine, threads=_assigned_cpus())
        self.config = config
        self.evidence_root = Path(config.store) / "evidence"
        self.dicom_root = Path(config.store) / "dicom"
        self.node = _node_name()

    def engine_backend(self) -> str:
        return str(self.detector.engine_backend)

    def process(self, key: str, loaded: LoadedStudy | SkippedStudy) -> StudyOutcome:
        if isinstance(loaded, SkippedStudy):
            return StudyOutcome.skipped(loaded)
        t0 = time.perf_counter()
        volume = loaded.volume
        try:
            result = self.detector.detect(volume)
            flagged = bool(result.pdac_flag) and result.pdac_probability == result.pdac_probability
            evidence = None
            bc, measures = _body_composition(volume, loaded.patient_height_m)
            if flagged:
                folder = self.evidence_root / evidence_folder_name(key)
                write_evidence(result, volume, folder)
                if bc is not None and np.isfinite(bc.skeletal_muscle_area_cm2):
                    write_bodycomp_image(volume, bc, folder)
                evidence = str(Path("evidence") / folder.name)
        except PdacscreenError as e:
            return StudyOutcome.failed(e.code, str(e), stage="inference")
        timings = {"load": float(loaded.load_s)}
        timings.update({k: float(v) for k, v in (result.timings or {}).items()})
        exports: tuple[ExportRecord, ...] = ()
        mode = self.config.dicom_results
        assessed = result.pdac_probability == result.pdac_probability and result.masks is not None
        if assessed and (mode == "all" or (mode == "flagged" and flagged)):
            t1 = time.perf_counter()
            exports = export_results(
                result,
                loaded.headers,
                study_instance_uid=key,
                folder=self.dicom_root / evidence_folder_name(key),
                store=Path(self.config.store),
                package=self.package,
                config=self.config,
            )
            timings["dicom_export"] = time.perf_counter() - t1
        return StudyOutcome.from_engine(
            result.to_row(),
            qc_flags=[*result.qc_flags, *(f for f in volume.flags if f not in result.qc_flags)],
            phase=loaded.phase,
            engine_backend=self.engine_backend(),
            evidence_path=evidence,
            duration_s=loaded.load_s + (time.perf_counter() - t0),
            timings=timings,
            node=self.node,
            measures=measures,
            exports=exports,
        )
