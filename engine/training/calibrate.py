"""``pdacscreen calibrate``: operating thresholds from negatives made for the purpose.

Thresholds chosen on the validation split share that split with the choices it was used for (the
study score, the checkpoint), and a split of a few dozen negatives puts the 99%-specificity point
on its one or two highest scores.  Here the package's detector runs on ``negatives`` non-PDAC
phantoms of a dedicated seed (``study_plan(seed, k, pdac_fraction=0)``: normal glands, simple
cysts in about 1 of 4, fatty glands, chronic pancreatitis as the generator draws them), which no
training or design step has seen, and the thresholds are the lowest probabilities with
specificity >= 0.95 and >= 0.99 on them (operating = the 95% one).  ``model.json`` gets the new
``thresholds`` (with the method and the ones they replace) and a ``calibration`` record (seed,
studies, counts by finding, score quantiles); the file hashes are unchanged (weights untouched).

Parallel over ``workers`` processes, each with its own detector on a contiguous range of studies;
the scores do not depend on the number of workers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdacscreen.engine.errors import TrainingError
from pdacscreen.engine.package import REFERENCE_PACKAGE, load_package, write_manifest

__all__ = ["Calibration", "calibrate", "negative_scores"]

log = logging.getLogger(__name__)

#: the specificities the thresholds are set at
SPECIFICITIES = (0.95, 0.99)


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` found: thresholds, the scores and where they came from."""

    thresholds: dict
    scores: np.ndarray
    kinds: list[str]
    record: dict


def _chunk(args: tuple) -> list[tuple[float, str, bool]]:
    """Worker: (score, lesion type, fatty) of negatives ``start .. start+n-1`` of ``seed``."""
    from pdacscreen.engine.inference import Detector
    from pdacscreen.engine.training.assess import phantom_cases

    package, seed, start, n, matrix, cache, threads = args
    det = Detector(load_package(package), backend="onnxruntime", threads=threads)
    out = []
    for case in phantom_cases(
        seed=seed, studies=n, matrix=matrix, cache=Path(cache), pdac_fraction=0.0, start=start
    ):
        res = det.detect(case.volume)
        p = res.pdac_probability
        out.append(
            (
                float("nan") if p is None else float(p),
                case.lesion_type,
                bool(case.truth.get("fatty_pancreas", False)),
            )
        )
    return out


def negative_scores(
    package: Path | None,
    *,
    seed: int,
    negatives: int,
    matrix: int = 256,
    cache: Path,
    workers: int = 1,
    threads: int = 1,
) -> list[tuple[float, str, bool]]:
    """The package's study probability on each purpose-made negative (see module docstring)."""
    if negatives < 20:
        raise TrainingError(f"--negatives must be at least 20, got {negatives}")
    package = Path(package) if package is not None else REFERENCE_PACKAGE
    workers = max(1, min(int(workers), negatives))
    bounds = np.linspace(0, negatives, workers + 1).round().astype(int)
    jobs = [
        (str(package), int(seed), int(a), int(b - a), int(matrix), str(cache), int(threads))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    if workers == 1:
        parts = [_chunk(jobs[0])]
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            parts = list(pool.map(_chunk, jobs))
    return [row for part in parts for row in part]


def thresholds_at(scores: np.ndarray) -> dict[str, float]:
    """The lowest probability with specificity >= 0.95 (resp. 0.99) on the negatives ``scores``:
    just above the highest score allowed below the threshold (float32 steps)."""
    neg = np.sort(np.asarray(scores, np.float64))
    out = {}
    for spec in SPECIFICITIES:
        k = int(np.ceil(spec * len(neg))) - 1
        t = float(neg[min(k, len(neg) - 1)])
        out[f"specificity_{round(spec * 100)}"] = float(np.nextafter(np.float32(t), np.float32(1)))
    return out


def calibrate(
    package: Path | None,
    *,
    seed: int,
    negatives: int,
    matrix: int = 256,
    cache: Path,
    workers: int = 1,
    write: bool = False,
) -> Calibration:
    """Thresholds of ``package`` from ``negatives`` purpose-made negatives; ``write`` puts them
    into its ``model.json`` (and regenerates the model card)."""
    package = Path(package) if package is not None else REFERENCE_PACKAGE
    pkg = load_package(package)
    rows = negative_scores(
        package, seed=seed, negatives=negatives, matrix=matrix, cache=cache, workers=workers
    )
    scores = np.array([r[0] for r in rows])
    unscored = int(np.isnan(scores).sum())
    # a negative the detector could not score is never flagged: it stays below any threshold
    th = thresholds_at(np.where(np.isnan(scores), 0.0, scores))
    kinds = [r[1] for r in rows]
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    counts["fatty_pancreas"] = sum(r[2] for r in rows)
    previous = {
        k: float(pkg.thresholds[k]) for k in ("operating", "specificity_95", "specificity_99")
    }
    record = {
        "phantom_seed": int(seed),
        "studies": f"0-{negatives - 1}",
        "matrix": int(matrix),
        "negatives": len(rows),
        "by_finding": counts,
        "unscored": unscored,
        "score_quantiles": {
            q: float(np.nanquantile(scores, float(q))) for q in ("0.5", "0.9", "0.95", "0.99")
        },
        "previous_thresholds": previous,
        "command": f"pdacscreen calibrate --model {package} --phantom-seed {seed} "
        f"--negatives {negatives} --matrix {matrix} --write",
    }
    thresholds = {
        "operating": th["specificity_95"],
        "specificity_95": th["specificity_95"],
        "specificity_99": th["specificity_99"],
        "method": (
            f"pdacscreen calibrate: the lowest probability with specificity >= 0.95 (resp. >= 0.99) "
            f"on {len(rows)} non-PDAC phantoms made for the purpose (seed {seed}, studies "
            f"0-{negatives - 1}, matrix {matrix}: {counts}), used by no training or design step; "
            "operating = the 95%-specificity threshold; replaced "
            + ", ".join(f"{k} {v:.4f}" for k, v in previous.items())
            + f" ({pkg.thresholds.method[:60]}...)"
        ),
    }
    if write:
        manifest = json.loads((package / "model.json").read_text())
        manifest["thresholds"] = thresholds
        manifest["calibration"] = record
        write_manifest(package, manifest)
        load_package(package)  # still a valid package
        from pdacscreen.engine.training.modelcard import write_model_card

        write_model_card(package)
    log.info("calibrate: %s", thresholds)
    return Calibration(thresholds, scores, kinds, record)
