"""What runs on Ray workers: the study loader task and the engine actor.

Both take the sweep's :class:`~pdacscreen.flows.config.SweepConfig` explicitly (nothing here reads
the environment) and return the typed values of :mod:`pdacscreen.flows.outcomes`; every error a
study can raise becomes a :class:`StudyOutcome` with a status and an error code, so one bad study
never stops the sweep.  The loader decodes the chosen series and measures its phase ONCE
(:func:`pdacscreen.kernels.measure.measure_phase`, thresholds from the selection rules); the actor
owns one engine, loaded once in ``__init__``, and writes evidence for flagged studies.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path

from pdacscreen.engine.evidence import write_evidence
from pdacscreen.engine.inference import Detector
from pdacscreen.engine.package import load_package
from pdacscreen.flows.config import SweepConfig
from pdacscreen.flows.outcomes import LoadedStudy, SkippedStudy, StudyOutcome, StudyTask
from pdacscreen.io.errors import ErrorCode, PdacscreenError
from pdacscreen.io.volume import load_series
from pdacscreen.kernels.bodycomp import body_composition
from pdacscreen.kernels.measure import measure_phase

log = logging.getLogger(__name__)

__all__ = ["EngineActor", "evidence_folder_name", "load_study"]


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
    return LoadedStudy(volume=volume, phase=phase, load_s=load_s)


_SAFE = re.compile(r"[^0-9A-Za-z._-]")


def evidence_folder_name(study_instance_uid: str) -> str:
    """A file-system-safe folder name for a study's evidence (UIDs are digits and dots)."""
    return _SAFE.sub("_", study_instance_uid)[:128] or "unknown"


def _assigned_cpus() -> int | None:
    try:
        import ray

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


def _body_composition(volume) -> dict:
    """The L3 body-composition columns of a loaded series (a QC reason, never an exception)."""
    try:
        return body_composition(volume, backend="numpy").row()
    except (PdacscreenError, ValueError) as e:
        log.debug("body composition not measured: %s", e)
        return {"bodycomp_qc": "not_measured"}


class EngineActor:
    """One detection engine per actor; ``process`` maps one loaded study to a StudyOutcome."""

    def __init__(self, config: SweepConfig) -> None:
        self.package = load_package(config.model)
        # As many engine threads as CPUs Ray gave this actor, so actors and loaders share cores.
        self.detector = Detector(self.package, config=config.engine, threads=_assigned_cpus())
        self.evidence_root = Path(config.store) / "evidence"
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
            if flagged:
                folder = self.evidence_root / evidence_folder_name(key)
                write_evidence(result, volume, folder)
                evidence = str(Path("evidence") / folder.name)
        except PdacscreenError as e:
            return StudyOutcome.failed(e.code, str(e), stage="inference")
        timings = {"load": float(loaded.load_s)}
        timings.update({k: float(v) for k, v in (result.timings or {}).items()})
        return StudyOutcome.from_engine(
            result.to_row(),
            qc_flags=[*result.qc_flags, *(f for f in volume.flags if f not in result.qc_flags)],
            phase=loaded.phase,
            engine_backend=self.engine_backend(),
            evidence_path=evidence,
            duration_s=loaded.load_s + (time.perf_counter() - t0),
            timings=timings,
            node=self.node,
            measures=_body_composition(volume),
        )
