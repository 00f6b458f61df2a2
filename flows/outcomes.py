"""Typed seams of the sweep, and the ONE place a findings row is made (:func:`finding_row`).

A study travels: :class:`StudyTask` (what the loader reads) -> :class:`LoadedStudy` (a decoded
volume and its one phase measurement) or :class:`SkippedStudy` (the phase rule rejected it) ->
:class:`StudyOutcome` (what the engine actor or the pool says happened) -> :func:`finding_row`.
Every value that crosses a process boundary here is a frozen dataclass of plain values.

Status words mean what they say (:class:`~pdacscreen.io.errors.Status`): a study the engine could
not assess (no pancreas found: no probability) is ``not_assessable`` with the reason as its
``error_code``, never ``ok``.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from pdacscreen.engine.inference import FINDINGS_COLUMNS
from pdacscreen.io.dicom.export import ExportRecord
from pdacscreen.io.errors import ErrorCode, Status
from pdacscreen.io.select import StudySelection
from pdacscreen.io.types import CTVolume
from pdacscreen.kernels.bodycomp import BODYCOMP_COLUMNS
from pdacscreen.kernels.measure import Phase, PhaseMeasure

__all__ = [
    "Failure",
    "LoadedStudy",
    "SkippedStudy",
    "StudyOutcome",
    "StudyTask",
    "failure_row",
    "finding_row",
    "as_date",
    "phase_flags",
    "text_or_none",
]

#: engine result fields copied into a findings row (the engine's own columns, less the QC flags,
#: which the row merges with the loader's, and the gland's mean HU, which the store does not keep)
#: measurements made on the series beside the detector (kernels.bodycomp, L3 body composition);
#: filled whenever the series was loaded, whether or not the engine could assess it
MEASURE_FIELDS = BODYCOMP_COLUMNS
ENGINE_FIELDS = tuple(c for c in FINDINGS_COLUMNS if c not in ("qc_flags", "pancreas_mean_hu"))


@dataclass(frozen=True)
class StudyTask:
    """What a loader needs for one study (plain, picklable)."""

    study_instance_uid: str
    series_instance_uid: str | None
    files: tuple[str, ...]


@dataclass(frozen=True)
class LoadedStudy:
    """A decoded series ready for the engine, with its phase measured once (in the loader).

    ``headers``: the series' DICOM headers without pixel data, as file bytes
    (:func:`pdacscreen.io.dicom.export.source_headers`), read when the sweep writes DICOM
    results (the SEG and SR reference the source images); empty otherwise.
    ``patient_height_m``: PatientSize of the series' first file, when present: only for the
    skeletal muscle index; it is never written anywhere.
    """

    volume: CTVolume
    phase: PhaseMeasure
    load_s: float
    headers: tuple[bytes, ...] = ()
    patient_height_m: float | None = None


@dataclass(frozen=True)
class SkippedStudy:
    """A study the loader read but does not send to the engine (the phase rule said reject)."""

    code: ErrorCode
    message: str
    phase: PhaseMeasure | None = None


@dataclass(frozen=True)
class Failure:
    """One ``failures`` row's content for a study (stage, code, message)."""

    stage: str
    code: str
    message: str


@dataclass(frozen=True)
class StudyOutcome:
    """What happened to one study, as the actor or the pool reports it.

    ``findings``: the engine's values for :data:`ENGINE_FIELDS` (empty unless assessed).
    ``timings``: seconds per stage (load, stage1, stage2, postprocess ...).
    ``node``: where the engine ran (counted per node in the run manifest, not in findings rows).
    ``exports``: what became of the study's DICOM SEG and SR (``STORE/dicom_exports/`` rows; a
    failed export never changes the findings row).
    """

    status: Status
    error_code: str | None = None
    findings: dict[str, Any] = field(default_factory=dict)
    qc_flags: tuple[str, ...] = ()
    phase_estimate: str | None = None
    evidence_path: str | None = None
    engine_backend: str | None = None
    duration_s: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    failure: Failure | None = None
    node: str | None = None  # the Ray node that ran the engine (host name; no patient data)
    measures: dict[str, Any] = field(default_factory=dict)  # MEASURE_FIELDS (body composition)
    exports: tuple[ExportRecord, ...] = ()

    @classmethod
    def failed(cls, code: str, message: str, *, stage: str) -> StudyOutcome:
        return cls(Status.FAILED, code, failure=Failure(stage, code, message[:2000]))

    @classmethod
    def skipped(cls, skip: SkippedStudy, *, stage: str = "select") -> StudyOutcome:
        phase = skip.phase
        return cls(
            Status.SKIPPED,
            skip.code,
            qc_flags=phase_flags(phase),
            phase_estimate=str(phase.estimate) if phase else None,
            duration_s=0.0,
            failure=Failure(stage, skip.code, skip.message[:2000]),
        )

    @classmethod
    def from_engine(
        cls,
        findings: dict[str, Any],
        *,
        qc_flags: list[str],
        phase: PhaseMeasure,
        engine_backend: str,
        evidence_path: str | None,
        duration_s: float,
        timings: dict[str, float],
        node: str | None = None,
        measures: dict[str, Any] | None = None,
        exports: tuple[ExportRecord, ...] = (),
    ) -> StudyOutcome:
        """An engine result: ``ok`` with a probability, else ``not_assessable`` with the reason."""
        p = findings.get("pdac_probability")
        assessed = p is not None and not (isinstance(p, float) and math.isnan(p))
        qc = list(dict.fromkeys([*qc_flags, *phase_flags(phase)]))
        if assessed:
            status, code = Status.OK, None
        else:
            status = Status.NOT_ASSESSABLE
            code = ErrorCode.PANCREAS_NOT_FOUND if "pancreas_not_found" in qc else "not_scored"
            findings = {}
        return cls(
            status,
            code,
            findings=dict(findings),
            qc_flags=tuple(qc),
            phase_estimate=str(phase.estimate),
            evidence_path=evidence_path,
            engine_backend=engine_backend,
            duration_s=duration_s,
            timings=dict(timings),
            node=node,
            measures=dict(measures or {}),
            exports=tuple(exports),
        )


def phase_flags(phase: PhaseMeasure | None) -> tuple[str, ...]:
    """QC flags of a phase measurement: ``contrast_phase`` or ``phase_indeterminate``."""
    if phase is None:
        return ()
    if phase.estimate == Phase.CONTRAST:
        return ("contrast_phase",)
    if phase.estimate == Phase.INDETERMINATE:
        return ("phase_indeterminate",)
    return ()


def finding_row(
    sel: StudySelection,
    outcome: StudyOutcome,
    *,
    facts: dict[str, Any],
    model_name: str,
    model_version: str,
    config_hash: str,
    sweep_id: str,
    processed_at: dt.datetime,
) -> dict[str, Any]:
    """The findings row of one study: the only function that makes one.

    ``sel``: the study's selection (UIDs, patient key, date); ``facts``: header facts of the
    analysed series (manufacturer, slice thickness, study date, accession key; see
    ``flows.sweep.series_facts``); the rest comes from ``outcome`` and the sweep.
    """
    thickness = facts.get("slice_thickness")
    row: dict[str, Any] = {
        "study_instance_uid": sel.study_instance_uid,
        "series_instance_uid": sel.series_instance_uid,
        "patient_key": sel.patient_key,
        "accession_key": text_or_none(facts.get("accession_key")),
        "study_date": as_date(sel.study_date or facts.get("study_date")),
        "manufacturer": text_or_none(facts.get("manufacturer")),
        "slice_thickness_mm": float(thickness) if thickness not in (None, "") else None,
        "model_name": model_name,
        "model_version": model_version,
        "config_hash": config_hash,
        "engine_backend": outcome.engine_backend,
        **{k: None for k in ENGINE_FIELDS},
        **{k: outcome.measures.get(k) for k in MEASURE_FIELDS},
        "phase_estimate": outcome.phase_estimate,
        "qc_flags": list(outcome.qc_flags),
        "status": str(outcome.status),
        "error_code": str(outcome.error_code) if outcome.error_code else None,
        "evidence_path": outcome.evidence_path,
        "sweep_id": sweep_id,
        "processed_at": processed_at,
        "duration_s": outcome.duration_s,
    }
    if outcome.status == Status.OK:
        row.update({k: outcome.findings.get(k) for k in ENGINE_FIELDS})
    return row


def failure_row(
    sel: StudySelection, failure: Failure, *, occurred_at: dt.datetime, scope: str = "study"
) -> dict[str, Any]:
    """A ``failures`` row for a study-level failure (file-level rows come from the index)."""
    return {
        "stage": failure.stage,
        "scope": scope,
        "study_instance_uid": sel.study_instance_uid,
        "series_instance_uid": sel.series_instance_uid,
        "path": None,
        "error_code": str(failure.code),
        "message": failure.message,
        "occurred_at": occurred_at,
    }


def text_or_none(value: Any) -> str | None:
    """A string, or None for None / NaN / empty (pandas fills missing strings with NaN)."""
    if value is None or value != value or value == "":
        return None
    return str(value)


def as_date(value: Any) -> dt.date | None:
    """A DICOM DA / ISO date / datetime as a date, or None when absent or invalid."""
    if value is None or value == "" or value != value:  # NaN
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).replace("-", "")
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except (ValueError, IndexError):
        return None
