"""What runs on Ray workers: the study loader task and the engine actor.

Both return plain values; every error a study can raise is turned into a row (status + error_code)
here, so one bad study never stops the sweep.  The loader decodes and checks the series (CPU); the
actor owns one engine (loaded once in ``__init__``) and writes evidence for flagged studies.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["StudyPayload", "load_study", "EngineActor"]


@dataclass(frozen=True)
class StudyPayload:
    """Everything a loader needs for one study (plain, picklable)."""

    study_instance_uid: str
    series_instance_uid: str | None
    files: tuple[str, ...]
    rules: Any = None


def load_study(payload: StudyPayload) -> dict[str, Any]:
    """Decode the chosen series and check its phase from the image. Runs as a Ray task.

    Returns ``{"volume": CTVolume, "phase": dict, "load_s": float}`` or, when the phase rule
    rejects the series, ``{"skip": code, "message": str, "phase": dict}``.  Errors that make a
    study unreadable raise a :class:`~pdacscreen.io.errors.PdacscreenError` with a code.
    """
    from pdacscreen.io.select import check_phase
    from pdacscreen.io.volume import load_series

    t0 = time.perf_counter()
    volume = load_series(
        list(payload.files), workers=1, series_instance_uid=payload.series_instance_uid
    )
    load_s = time.perf_counter() - t0
    phase = check_phase(volume, payload.rules)
    phase_d = _as_dict(phase)
    action = phase_d.get("action")
    if action == "reject":
        return {
            "skip": "phase_mismatch",
            "message": phase_d.get("reason", "tags say non-contrast, the aorta says contrast"),
            "phase": phase_d,
        }
    return {"volume": volume, "phase": phase_d, "load_s": load_s}


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else dict(vars(obj))


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


class EngineActor:
    """One detection engine per actor; ``process`` maps one loaded study to a findings row."""

    def __init__(self, model: str | None, backend: str, evidence_root: str) -> None:
        from pdacscreen.engine.inference import Detector
        from pdacscreen.engine.package import load_package

        self.package = load_package(Path(model) if model else None)
        # As many engine threads as CPUs Ray gave this actor, so actors and loaders share cores.
        self.detector = Detector(self.package, backend=backend, threads=_assigned_cpus())
        self.evidence_root = Path(evidence_root)

    def backend_name(self) -> str:
        return str(self.detector.backend_name)

    def process(self, key: str, loaded: dict[str, Any]) -> dict[str, Any]:
        from pdacscreen.engine.evidence import write_evidence
        from pdacscreen.io.errors import PdacscreenError

        t0 = time.perf_counter()
        phase = loaded.get("phase", {})
        phase_estimate = phase.get("phase_estimate") or phase.get("estimate")
        if "skip" in loaded:
            return {
                "row": {
                    "status": "skipped",
                    "error_code": loaded["skip"],
                    "phase_estimate": phase_estimate,
                    "qc_flags": ["contrast_phase"],
                    "duration_s": 0.0,
                },
                "failure": {
                    "stage": "select",
                    "code": loaded["skip"],
                    "message": loaded["message"],
                },
            }
        volume = loaded["volume"]
        try:
            result = self.detector.detect(volume)
            row = dict(result.to_row())
            qc = list(row.get("qc_flags") or [])
            for flag in volume.flags:
                if flag not in qc:
                    qc.append(flag)
            if phase.get("mismatch") and "phase_mismatch" not in qc:
                qc.append("phase_mismatch")
            row["qc_flags"] = qc
            row["phase_estimate"] = phase_estimate
            row["status"] = "ok"
            row["error_code"] = None
            if row.get("pdac_flag"):
                folder = self.evidence_root / evidence_folder_name(key)
                write_evidence(result, volume, folder)
                row["evidence_path"] = str(Path("evidence") / folder.name)
            else:
                row["evidence_path"] = None
        except PdacscreenError as e:
            return {
                "row": {"status": "failed", "error_code": e.code, "duration_s": None},
                "failure": {"stage": "inference", "code": e.code, "message": str(e)[:2000]},
            }
        row["duration_s"] = loaded.get("load_s", 0.0) + (time.perf_counter() - t0)
        timings = {"load": float(loaded.get("load_s", 0.0))}
        timings.update({k: float(v) for k, v in (result.timings or {}).items()})
        return {"row": row, "timings": timings}
