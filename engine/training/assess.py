"""Assess a model package on a held-out phantom archive (re-runnable quality numbers).

``pdacscreen assess --archive DIR --model PKG [--name NAME] [--update-card]``

For every study of the archive: load the non-contrast series from DICOM, run the detector, compare
with the truth table and label map.  Reports case-level AUROC (bootstrap 95% CI), sensitivity and
specificity at the package's operating threshold, sensitivity at >= 95% specificity (threshold
chosen on this archive), sensitivity for PDACs < 2 cm and >= 2 cm, the fraction of detected PDACs
localised (a predicted lesion component with IoU >= 0.1 against the true lesion, or containing the
true lesion centre), false-positive rates on cysts, fatty pancreases without PDAC, and the other
negatives, and sensitivity by band of the lesion's ideal-observer d' (< 2, 2-4, >= 4; the truth's
``lesion_dprime``, see :mod:`pdacscreen.io.phantom.observer`) and of its diameter (< 20, >= 20 mm).
``--update-card`` merges the result into the package's ``assessment.json`` and regenerates its
README (documentation only: model.json and its hashes are unchanged).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pdacscreen.engine.evidence import masks_in_series_grid
from pdacscreen.engine.inference import Detector
from pdacscreen.engine.metrics import case_metrics, roc_auc, sensitivity_by_band
from pdacscreen.engine.package import load_package
from pdacscreen.engine.training.dataset import StudyRecord, archive_records, load_study
from pdacscreen.engine.training.modelcard import write_model_card
from pdacscreen.io.phantom.archive import study_plan
from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.types import CTVolume, voxel_to_world, world_to_voxel

__all__ = [
    "Case",
    "archive_cases",
    "phantom_cases",
    "assess_cases",
    "summarise",
    "update_card",
]

log = logging.getLogger(__name__)

#: the detector's study scores (``StudyResult.diagnostics`` keys); see ``postprocessing.score``
STUDY_SCORES = (
    "cls_probability",
    "lesion_peak",
    "pancreas_peak",
    "pancreas_topk",
    "candidate_peak",
)


def _localised(result, volume, label: np.ndarray, truth: dict) -> bool:
    """A predicted lesion component hits the true lesion (IoU >= 0.1 or holds its centre)."""

    if result.masks is None or not result.masks.lesion.any():
        return False
    _, pred = masks_in_series_grid(result, volume)
    true = label == 2
    comps, n = ndimage.label(pred, structure=np.ones((3, 3, 3)))
    centre = np.array([truth.get(f"lesion_center_{a}_mm", np.nan) for a in "xyz"], float)
    kji = None
    if np.all(np.isfinite(centre)):
        kji = np.round(world_to_voxel(volume.affine, centre)).astype(int)
        if np.any(kji < 0) or np.any(kji >= np.array(volume.shape)):
            kji = None
    for c in range(1, n + 1):
        comp = comps == c
        inter = np.logical_and(comp, true).sum()
        union = np.logical_or(comp, true).sum()
        if union and inter / union >= 0.1:
            return True
        if kji is not None and comp[tuple(kji)]:
            return True
    return False


def _fraction_in_box(volume: CTVolume, label: np.ndarray, box_min, box_max) -> float:
    """Share of the true pancreas voxels (label >= 1) whose centres lie in the world box (NaN
    without a gland; 0 without a box)."""
    idx = np.argwhere(label >= 1)
    if len(idx) == 0:
        return float("nan")
    lo, hi = np.asarray(box_min, float), np.asarray(box_max, float)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        return 0.0
    xyz = voxel_to_world(volume.affine, idx.astype(float))
    return float(np.all((xyz >= lo - 1e-6) & (xyz <= hi + 1e-6), axis=1).mean())


def _box(diag: dict, name: str) -> list[float]:
    return [float(v) for v in diag.get(name, (np.nan,) * 3)]


#: localisation facts of the detector's diagnostics copied into assess rows (NaN when absent)
LOCALISATION_FIELDS = (
    "stage1_length_mm",
    "stage1_volume_ml",
    "stage1_outside_fraction",
    "gland_length_mm",
    "cls_probability_first",
)


@dataclass(frozen=True)
class Case:
    """One study to assess: the volume, its label map (series grid) and its truth row."""

    volume: CTVolume
    label: np.ndarray
    truth: dict

    @property
    def lesion_type(self) -> str:
        return str(self.truth.get("lesion_type", "none"))


def archive_cases(archive: Path, *, limit: int | None = None) -> Iterator[Case]:
    """Cases of a DICOM phantom archive (series loaded with ingest's ``load_series``)."""
    records: list[StudyRecord] = archive_records(archive)
    for rec in records[:limit] if limit else records:
        volume, label = load_study(rec)
        yield Case(volume, label, rec.truth)


def phantom_cases(
    *,
    seed: int,
    studies: int,
    matrix: int,
    cache: Path,
    slice_thickness_mm: list[float] | None = None,
    noise_hu: float | None = None,
    pdac_fraction: float = 0.5,
    start: int = 0,
) -> Iterator[Case]:
    """The subjects ``pdacscreen phantom --seed SEED`` would write, made in memory (no DICOM).

    Study ``k`` is ``make_subject(study_plan(seed, k))``, so these are the same patients as the
    archive's; ``slice_thickness_mm`` (cycled over studies) and ``noise_hu`` override the
    acquisition (the "hard" archive).  Volumes are cached as int16 under ``cache``.
    """

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + studies):
        thk = slice_thickness_mm[k % len(slice_thickness_mm)] if slice_thickness_mm else None
        tag = f"s{seed}-m{matrix}-k{k}-t{thk}-n{noise_hu}-f{pdac_fraction}"
        path = cache / f"{tag}.npz"
        if path.is_file():  # made before the truth carried the lesion's d': make it again
            with np.load(path) as z:
                if "lesion_dprime" not in json.loads(str(z["truth"])):
                    path.unlink()
        if not path.is_file():
            sub_seed, is_pdac = study_plan(seed, k, pdac_fraction)
            sub = make_subject(
                sub_seed,
                matrix=matrix,
                pdac=is_pdac,
                slice_thickness_mm=thk,
                noise_hu=noise_hu,
                observer=True,
            )
            tmp = path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                hu=sub.noncontrast.astype(np.int16),
                label=sub.labels,
                affine=sub.affine,
                spacing=np.array(sub.spacing),
                truth=np.str_(json.dumps(sub.truth, default=float)),
            )
            tmp.replace(path)
        with np.load(path) as z:
            truth = json.loads(str(z["truth"]))
            volume = CTVolume(
                z["hu"].astype(np.float32),
                tuple(z["spacing"]),
                z["affine"],
                series_instance_uid=f"phantom-{tag}",
            )
            yield Case(volume, z["label"], truth)


def assess_cases(
    cases: Iterable[Case], package_dir: Path | None, *, threads: int | None = None
) -> list[dict]:
    """One row per study: truth, prediction, localisation hit, QC flags, seconds, and the
    localisation: the stage-1 box (``box_min_mm``/``box_max_mm``, world (x, y, z) mm), the box
    stage 2 ran on (``crop_box_*``; larger when the crop was grown), the share of the true gland
    inside each (``pancreas_in_box``, ``pancreas_in_crop``) and the QC check's inputs."""

    det = Detector(load_package(package_dir), backend="onnxruntime", threads=threads)
    rows = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        res = det.detect(case.volume)
        seconds = time.perf_counter() - t0
        truth = case.truth
        pdac = case.lesion_type == "pdac"
        hit = _localised(res, case.volume, case.label, truth) if pdac else False
        rows.append(
            {
                "series_uid": case.volume.series_instance_uid,
                "lesion_type": case.lesion_type,
                "pdac": int(pdac),
                "lesion_diameter_mm": float(truth.get("lesion_diameter_mm") or 0.0),
                "lesion_location": str(truth.get("lesion_location") or ""),
                "lesion_dprime": float(
                    np.nan if truth.get("lesion_dprime") is None else truth["lesion_dprime"]
                ),
                "predicted_location": res.lesion_location,
                "fatty_pancreas": bool(truth.get("fatty_pancreas", False)),
                "noise_hu": float(truth.get("noise_hu", np.nan)),
                "slice_thickness_mm": float(truth.get("slice_thickness_mm", np.nan)),
                "probability": res.pdac_probability,
                "flag": bool(res.pdac_flag),
                "localised": bool(hit),
                "lesion_count": res.lesion_count,
                "qc_flags": list(res.qc_flags),
                "qc_reasons": dict(res.diagnostics.get("qc_reasons", {})),
                "box_min_mm": _box(res.diagnostics, "box_min_mm"),
                "box_max_mm": _box(res.diagnostics, "box_max_mm"),
                "crop_box_min_mm": _box(res.diagnostics, "crop_box_min_mm"),
                "crop_box_max_mm": _box(res.diagnostics, "crop_box_max_mm"),
                "pancreas_in_box": _fraction_in_box(
                    case.volume,
                    case.label,
                    res.diagnostics.get("box_min_mm", (np.nan,) * 3),
                    res.diagnostics.get("box_max_mm", (np.nan,) * 3),
                ),
                "pancreas_in_crop": _fraction_in_box(
                    case.volume,
                    case.label,
                    res.diagnostics.get("crop_box_min_mm", (np.nan,) * 3),
                    res.diagnostics.get("crop_box_max_mm", (np.nan,) * 3),
                ),
                "crop_enlarged": bool(res.diagnostics.get("crop_enlarged", False)),
                "crop_faces_first": dict(res.diagnostics.get("crop_faces_first", {})),
                "crop_faces": dict(res.diagnostics.get("crop_faces", {})),
                **{k: float(res.diagnostics.get(k, np.nan)) for k in LOCALISATION_FIELDS},
                "seconds": seconds,
                # every study score the detector computes, for comparing them on the same cases
                "scores": {k: float(res.diagnostics.get(k, np.nan)) for k in STUDY_SCORES},
            }
        )
        log.info(
            "assess %d %s %.0fmm p=%.3f flag=%s localised=%s %.1fs",
            i + 1,
            case.lesion_type,
            rows[-1]["lesion_diameter_mm"],
            res.pdac_probability,
            res.pdac_flag,
            hit,
            seconds,
        )
    return rows


def _auroc_by_score(rows: list[dict], y: np.ndarray) -> dict[str, float]:
    """AUROC of each study score on the same cases (a study without that score counts 0)."""
    out = {}
    for k in STUDY_SCORES:
        v = np.array([r.get("scores", {}).get(k, np.nan) for r in rows], float)
        if len(v) and np.isfinite(v).any():
            out[k] = roc_auc(y, np.nan_to_num(v, nan=0.0))
    return out


def summarise(rows: list[dict], *, operating: float) -> dict:
    """Case-level metrics of :func:`assess_archive` rows (NaN probability counts as 0)."""
    p = np.array([0.0 if np.isnan(r["probability"]) else r["probability"] for r in rows])
    y = np.array([r["pdac"] for r in rows])
    small = np.array([r["pdac"] == 1 and r["lesion_diameter_mm"] < 20.0 for r in rows])
    large = np.array([r["pdac"] == 1 and r["lesion_diameter_mm"] >= 20.0 for r in rows])
    flag = p >= operating
    cyst = np.array([r["lesion_type"] == "cyst" for r in rows])
    fatty_neg = np.array([r["fatty_pancreas"] and not r["pdac"] for r in rows])
    other_neg = (y == 0) & ~cyst & ~fatty_neg
    detected = flag & (y == 1)
    loc = np.array([r["localised"] for r in rows])
    # The same case metrics (and bootstrap) as `pdacscreen evaluate` reports.
    cm = case_metrics(y, p, threshold=operating, specificities=(0.95,), n_boot=500)
    at95 = cm.at_specificity[0]
    dprime = np.array([r.get("lesion_dprime", np.nan) for r in rows], float)
    size = np.array([r["lesion_diameter_mm"] for r in rows], float)
    bands = {
        name: {
            band: asdict(rate)
            for band, rate in sensitivity_by_band(
                p, y, values, threshold=operating, edges=edges, n_boot=500
            ).items()
        }
        for name, values, edges in (("dprime", dprime, (2.0, 4.0)), ("size_mm", size, (20.0,)))
    }
    qc: dict[str, int] = {}
    for r in rows:
        for f in r["qc_flags"]:
            qc[f] = qc.get(f, 0) + 1

    def rate(mask):
        return float(flag[mask].mean()) if mask.any() else float("nan")

    return {
        "studies": len(rows),
        "pdac": int(y.sum()),
        "cyst": int(cyst.sum()),
        "none": int(len(rows) - y.sum() - cyst.sum()),
        "operating_threshold": operating,
        "auroc": cm.auroc.value,
        "auroc_ci": [cm.auroc.ci_low, cm.auroc.ci_high],
        "sensitivity_operating": cm.at_threshold.sensitivity.value,
        "specificity_operating": cm.at_threshold.specificity.value,
        "threshold_spec95_here": at95.threshold,
        "sensitivity_at_spec95": at95.sensitivity.value,
        "sensitivity_small": float(flag[small].mean()) if small.any() else float("nan"),
        "small_pdac": int(small.sum()),
        "sensitivity_large": float(flag[large].mean()) if large.any() else float("nan"),
        "localised_fraction": float(loc[detected].mean()) if detected.any() else float("nan"),
        "fp_rate_cyst": rate(cyst),
        "fp_rate_fatty": rate(fatty_neg),
        "fatty_negatives": int(fatty_neg.sum()),
        "fp_rate_other": rate(other_neg),
        "sensitivity_by_dprime": bands["dprime"],
        "sensitivity_by_size_mm": bands["size_mm"],
        "qc_counts": dict(sorted(qc.items())),
        "auroc_by_score": _auroc_by_score(rows, y),
        "seconds_per_study": float(np.mean([r["seconds"] for r in rows])) if rows else float("nan"),
    }


def update_card(root: Path, *, name: str, summary: dict, notes: list[str] = ()) -> Path:
    """Merge one archive's summary into ``root/assessment.json`` and regenerate the README."""

    path = Path(root) / "assessment.json"
    if path.is_file():
        data = json.loads(path.read_text())
    else:
        data = {"archives": {}, "notes": [], "commands": []}
    data["archives"][name] = summary
    data["notes"] = sorted(set(data.get("notes", [])) | set(notes))
    cmd = f"pdacscreen assess {summary.get('source', '')} --name {name} --update-card"
    data["commands"] = sorted(set(data.get("commands", [])) | {cmd})
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return write_model_card(Path(root))
