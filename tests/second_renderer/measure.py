"""Compare the shipped model on the second renderer and on the project's generator (issue 12).

``pdacscreen assess ... --out X.json`` writes one row per study; this module merges such files
(an archive may be assessed in chunks), summarises them with assess's own
:func:`pdacscreen.engine.training.assess.summarise`, adds the stage-1 pancreas-found rate and
breakdowns by the second renderer's acquisition facts (joined from its truth table), and measures
stage 1 on its own: whether the stage-1 box (public engine functions, the detector's own steps)
holds the true pancreas and the lesion centre.

    python -m tests.second_renderer.measure --rows A.json B.json [--archive DIR ...] \
        [--coverage-archive DIR ... | --coverage-phantom-seed S --studies N] --out summary.json

``--localisation-qc`` adds how the ``partial_localisation`` QC flag and the crop growth did on the
rows (:func:`localisation_qc_summary`: flags against the true gland coverage that assess records).

The shipped model is a reference model trained on synthetic phantoms, not a clinical device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pdacscreen.engine.package import load_package
from pdacscreen.engine.training.assess import (
    archive_cases,
    assess_cases,
    phantom_cases,
    summarise,
)

__all__ = [
    "load_rows",
    "summarise_rows",
    "stage1_coverage",
    "oracle_stage2",
    "variant_cases",
    "localisation_qc_summary",
    "main",
]

BANDS = ((-np.inf, 2.0, "<2"), (2.0, 4.0, "2-4"), (4.0, np.inf, ">=4"))


def load_rows(paths: list[Path], archives: list[Path] = ()) -> list[dict]:
    """Rows of ``pdacscreen assess --out`` files, with the archives' truth columns joined."""
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    truth = {}
    for a in archives:
        for t in pd.read_parquet(Path(a) / "truth.parquet").to_dict("records"):
            truth[str(t["noncontrast_series_uid"])] = t
    for r in rows:
        t = truth.get(r["series_uid"], {})
        for k in ("noise_kind", "hu_offset", "lesion_shape", "subcutaneous_fat_mm", "manufacturer"):
            if k in t:
                r[k] = t[k]
    return rows


def _sens(rows: list[dict], operating: float) -> dict:
    pd_rows = [r for r in rows if r["pdac"]]
    hits = [float(r["probability"] >= operating) for r in pd_rows if np.isfinite(r["probability"])]
    hits += [0.0 for r in pd_rows if not np.isfinite(r["probability"])]
    return {"pdac": len(pd_rows), "sensitivity": float(np.mean(hits)) if hits else float("nan")}


def summarise_rows(rows: list[dict], *, operating: float) -> dict:
    """assess's summary plus the pancreas-found rate and breakdowns (see module)."""
    out = summarise(rows, operating=operating)
    found = np.array(["pancreas_not_found" not in r["qc_flags"] for r in rows])
    out["pancreas_found_rate"] = float(found.mean()) if len(found) else float("nan")
    out["pancreas_not_found"] = int((~found).sum())
    kept = [r for r, f in zip(rows, found, strict=True) if f]
    if kept and 0 < sum(r["pdac"] for r in kept) < len(kept):
        sub = summarise(kept, operating=operating)
        out["found_only"] = {k: sub[k] for k in ("studies", "auroc", "auroc_ci")}
    out["pdac_band_counts"] = {
        name: int(sum(r["pdac"] and lo <= r["lesion_dprime"] < hi for r in rows))
        for lo, hi, name in BANDS
    }
    groups: dict[str, dict] = {}
    for key in ("noise_kind", "slice_thickness_mm", "lesion_shape", "fatty_pancreas"):
        vals = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
        if len(vals) > 1:
            groups[key] = {
                v: _sens([r for r in rows if str(r.get(key)) == v], operating) for v in vals
            }
    if any("hu_offset" in r for r in rows):
        groups["hu_offset_sign"] = {
            s: _sens([r for r in rows if np.sign(r.get("hu_offset", 0)) == sgn], operating)
            for s, sgn in (("negative", -1), ("positive", 1))
        }
    out["sensitivity_by"] = groups
    return out


def stage1_coverage(
    cases, package_dir: Path | None = None, *, threads: int | None = 1
) -> list[dict]:
    """Per study: does stage 1's box (as the detector makes it) hold the true pancreas?

    Runs the detector's stage 1 only (coarse grid, model input, sliding window, ``localise``);
    reports ``found``, the fraction of true pancreas voxels (label >= 1) inside the box and
    whether the lesion's voxels are all inside.
    """
    from pdacscreen.engine.backends import open_backend
    from pdacscreen.engine.postprocess import localise, softmax
    from pdacscreen.engine.preprocess import coarse_grid, model_input
    from pdacscreen.engine.tiling import sliding_window
    from pdacscreen.io.types import voxel_to_world

    pkg = load_package(package_dir)
    st1, st2, post = pkg.stage1, pkg.stage2, pkg.postprocessing
    be = open_backend(st1, backend="onnxruntime", threads=threads, max_batch=4)
    out = []
    for case in cases:
        coarse, caff = coarse_grid(case.volume, st1.spacing_mm, backend="numpy")
        x = model_input(coarse, pkg.preprocessing, backend="numpy")
        pad = (pkg.preprocessing.window_hu[0] - pkg.preprocessing.mean) / pkg.preprocessing.std
        seg = sliding_window(
            x,
            patch=st1.patch,
            predict=lambda b: {k: np.asarray(v, np.float32) for k, v in be.predict(b).items()},
            overlap=st1.overlap,
            batch_size=4,
            pad_value=pad,
        )["seg"]
        loc = localise(
            softmax(seg)[1],
            caff,
            threshold=post.pancreas_threshold,
            min_ml=post.min_pancreas_ml,
            margin_mm=st2.margin_mm,
            max_box_mm=st2.max_box_mm,
        )
        row = {"series_uid": case.volume.series_instance_uid, "found": bool(loc.found)}
        row["lesion_type"] = case.lesion_type
        row["box_min_mm"], row["box_max_mm"] = list(loc.box_min), list(loc.box_max)
        gland = np.argwhere(case.label >= 1)
        if len(gland):
            xyz = voxel_to_world(case.volume.affine, gland.astype(float))
            row["gland_min_mm"], row["gland_max_mm"] = list(xyz.min(0)), list(xyz.max(0))
        for name, mask in (("pancreas", case.label >= 1), ("lesion", case.label == 2)):
            idx = np.argwhere(mask)
            if len(idx) == 0 or not loc.found:
                row[f"{name}_in_box"] = float("nan") if len(idx) == 0 else 0.0
                continue
            xyz = voxel_to_world(case.volume.affine, idx.astype(float))
            inside = np.all(
                (xyz >= np.asarray(loc.box_min) - 1e-6) & (xyz <= np.asarray(loc.box_max) + 1e-6),
                axis=1,
            )
            row[f"{name}_in_box"] = float(inside.mean())
        out.append(row)
    return out


def oracle_stage2(cases, package_dir: Path | None = None, *, threads: int | None = 1) -> list:
    """Per study: stage 2's PDAC probability on the *true* gland's box (an oracle stage 1).

    The box is the true pancreas (label >= 1) plus the package's stage-2 margin, capped at its
    ``max_box_mm`` about the centre, as ``localise`` does for stage 1's component; then the
    detector's own steps (``fine_crop``, ``model_input``, ``sliding_window``, sigmoid of the
    classification head).  Separates stage 2's failures from stage 1's.
    """
    from pdacscreen.engine.backends import open_backend
    from pdacscreen.engine.preprocess import fine_crop, model_input
    from pdacscreen.engine.tiling import sliding_window
    from pdacscreen.io.types import voxel_to_world

    pkg = load_package(package_dir)
    st2, pre = pkg.stage2, pkg.preprocessing
    be = open_backend(st2, backend="onnxruntime", threads=threads, max_batch=4)
    rows = []
    for case in cases:
        xyz = voxel_to_world(case.volume.affine, np.argwhere(case.label >= 1).astype(float))
        lo = xyz.min(0) - np.array(st2.margin_mm[::-1], float)
        hi = xyz.max(0) + np.array(st2.margin_mm[::-1], float)
        centre, half = (lo + hi) / 2, np.minimum((hi - lo) / 2, np.array(st2.max_box_mm[::-1]) / 2)
        crop, _ = fine_crop(
            case.volume.array, case.volume.affine, (centre - half, centre + half), st2.spacing_mm
        )
        x = model_input(np.asarray(crop, np.float32), pre, backend="numpy")
        out = sliding_window(
            x,
            patch=st2.patch,
            predict=lambda b: {k: np.asarray(v, np.float32) for k, v in be.predict(b).items()},
            overlap=st2.overlap,
            batch_size=4,
            pad_value=(pre.window_hu[0] - pre.mean) / pre.std,
        )
        p = 1.0 / (1.0 + np.exp(-float(out["cls"][0])))
        rows.append(
            {
                "series_uid": case.volume.series_instance_uid,
                "pdac": int(case.lesion_type == "pdac"),
                "lesion_type": case.lesion_type,
                "lesion_dprime": float(case.truth.get("lesion_dprime") or np.nan),
                "probability": float(p),
            }
        )
    return rows


def _oracle_summary(rows: list[dict]) -> dict:
    from pdacscreen.engine.metrics import case_metrics

    op = load_package(None).thresholds.operating
    y = np.array([r["pdac"] for r in rows])
    p = np.array([r["probability"] for r in rows])
    cm = case_metrics(y, p, threshold=op, specificities=(0.95,), n_boot=500)
    return {
        "studies": len(rows),
        "pdac": int(y.sum()),
        "auroc": cm.auroc.value,
        "auroc_ci": [cm.auroc.ci_low, cm.auroc.ci_high],
        "sensitivity_operating": cm.at_threshold.sensitivity.value,
        "specificity_operating": cm.at_threshold.specificity.value,
        "rows": rows,
    }


def variant_cases(seed: int, indices, *, matrix: int = 256, **overrides):
    """Second-renderer studies made in memory with ``make_study`` overrides (no DICOM)."""
    from pdacscreen.engine.training.assess import Case
    from pdacscreen.io.types import CTVolume
    from tests.second_renderer.archive import make_study

    for k in indices:
        sub, truth = make_study(seed, int(k), matrix=matrix, **overrides)
        vol = CTVolume(
            sub.noncontrast, sub.spacing, sub.affine, series_instance_uid=f"second-{seed}-{k}"
        )
        yield Case(vol, sub.labels, truth)


def _auroc(rows: list[dict], key: str) -> float:
    from pdacscreen.engine.metrics import roc_auc

    y = np.array([r["pdac"] for r in rows])
    p = np.array([r[key] for r in rows], float)
    return float(roc_auc(y, np.nan_to_num(p, nan=0.0))) if 0 < y.sum() < len(y) else float("nan")


def _final_faces(r: dict) -> dict:
    """Faces the final gland reached, for rows written before assess kept ``crop_faces``: the
    first pass's when the crop was not grown (they were flagged as they are either way)."""
    return {} if r.get("crop_enlarged") else dict(r.get("crop_faces_first", {}))


def localisation_qc_summary(rows: list[dict], *, partial_below: float = 0.9) -> dict:
    """How the ``partial_localisation`` QC flag and the crop growth did on assess rows.

    A study's stage-1 box is *partial* when it holds less than ``partial_below`` of the true
    gland (``pancreas_in_box``, truth: assess only); ``first_probability`` is the study's score
    before the crop was grown (``cls_probability_first``), so AUROC with and without the fix
    come from the same run.  Also sweeps ``min_length_mm`` with the engine's own rule
    (:func:`~pdacscreen.engine.postprocess.partial_localisation`) on the rows' recorded inputs.
    """
    from pdacscreen.engine.postprocess import LocalisationQC, partial_localisation

    for r in rows:
        first = r.get("cls_probability_first", np.nan)
        r["first_probability"] = first if r.get("crop_enlarged") else r["probability"]
    found = [r for r in rows if "pancreas_not_found" not in r["qc_flags"]]
    flagged = [r for r in found if "partial_localisation" in r["qc_flags"]]
    partial = [r for r in found if r["pancreas_in_box"] < partial_below]
    whole = [r for r in found if r["pancreas_in_box"] >= partial_below]
    enlarged = [r for r in found if r.get("crop_enlarged")]
    reasons = {"crop face": 0, "mm long": 0, "outside": 0}
    for r in flagged:
        text = r.get("qc_reasons", {}).get("partial_localisation", "")
        for k in reasons:
            reasons[k] += int(k in text)

    def mean(key, group):
        v = np.array([r[key] for r in group], float)
        return float(np.nanmean(v)) if len(v) else float("nan")

    sweep = {}
    for length in (60.0, 70.0, 80.0, 90.0, 100.0, 110.0, 120.0):
        qc = LocalisationQC(min_length_mm=length)
        hits = [
            bool(
                partial_localisation(
                    stage1_length_mm=r["stage1_length_mm"],
                    outside_fraction=r["stage1_outside_fraction"],
                    gland_length_mm=r["gland_length_mm"],
                    open_faces=tuple(r.get("crop_faces", _final_faces(r))),
                    grown_faces=tuple(r["crop_faces_first"]) if r.get("crop_enlarged") else (),
                    qc=qc,
                )
            )
            for r in found
        ]
        sweep[f"{length:.0f}"] = {
            "flag_rate": float(np.mean(hits)) if hits else float("nan"),
            "partial_flagged": int(
                sum(h for h, r in zip(hits, found, strict=True) if r in partial)
            ),
        }
    return {
        "studies": len(rows),
        "found": len(found),
        "partial_localisation": len(flagged),
        "flag_rate": len(flagged) / len(rows) if rows else float("nan"),
        "flag_rate_found": len(flagged) / len(found) if found else float("nan"),
        "reasons": reasons,
        f"partial_boxes_below_{partial_below:g}": len(partial),
        "partial_boxes_flagged": sum("partial_localisation" in r["qc_flags"] for r in partial),
        "whole_boxes_flagged": sum("partial_localisation" in r["qc_flags"] for r in whole),
        "crop_enlarged": len(enlarged),
        "pancreas_in_box_mean": mean("pancreas_in_box", found),
        "pancreas_in_crop_mean": mean("pancreas_in_crop", found),
        "enlarged_pancreas_in_box_mean": mean("pancreas_in_box", enlarged),
        "enlarged_pancreas_in_crop_mean": mean("pancreas_in_crop", enlarged),
        "crop_90pct_rate_found": float(np.mean([r["pancreas_in_crop"] >= 0.9 for r in found]))
        if found
        else float("nan"),
        "box_90pct_rate_found": float(np.mean([r["pancreas_in_box"] >= 0.9 for r in found]))
        if found
        else float("nan"),
        "auroc": _auroc(rows, "probability"),
        "auroc_without_growth": _auroc(rows, "first_probability"),
        "stage1_length_mm_median": float(np.nanmedian([r["stage1_length_mm"] for r in found])),
        "gland_length_mm_median": float(np.nanmedian([r["gland_length_mm"] for r in found])),
        "min_length_sweep": sweep,
    }


def _stage1_summary(cov: list[dict]) -> dict:
    pan = np.array([c["pancreas_in_box"] for c in cov], float)
    les = np.array([c["lesion_in_box"] for c in cov], float)
    return {
        "studies": len(cov),
        "found_rate": float(np.mean([c["found"] for c in cov])),
        "pancreas_fully_in_box_rate": float(np.mean(pan >= 0.999)),
        "pancreas_90pct_in_box_rate": float(np.mean(pan >= 0.9)),
        "pancreas_in_box_mean": float(np.nanmean(pan)),
        "lesion_half_in_box_rate": float(np.mean(les[np.isfinite(les)] >= 0.5))
        if np.isfinite(les).any()
        else float("nan"),
        "rows": cov,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.second_renderer.measure")
    ap.add_argument("--rows", type=Path, nargs="*", default=[], help="assess --out files")
    ap.add_argument("--archive", type=Path, nargs="*", default=[], help="truth tables to join")
    ap.add_argument("--coverage-archive", type=Path, nargs="*", default=[])
    ap.add_argument("--coverage-phantom-seed", type=int, default=None)
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=Path("work/engine/assess-cache"))
    ap.add_argument(
        "--variant",
        nargs=4,
        metavar=("SEED", "STUDIES", "HU_OFFSET", "NOISE_HU"),
        help="stage 1 on second-renderer studies 0..STUDIES-1 made in memory with this HU offset "
        "and white noise of NOISE_HU",
    )
    ap.add_argument(
        "--oracle",
        nargs=2,
        metavar=("SEED", "STUDIES"),
        help="stage 2 on the true gland box of second-renderer studies 0..STUDIES-1 (in memory)",
    )
    ap.add_argument(
        "--oracle-variant",
        nargs=2,
        type=float,
        metavar=("HU_OFFSET", "NOISE_HU"),
        help="with --oracle: this HU offset and white noise of NOISE_HU",
    )
    ap.add_argument(
        "--oracle-phantom-seed",
        type=int,
        default=None,
        help="the same oracle on the project generator's studies 0..--studies-1 (the control)",
    )
    ap.add_argument(
        "--localisation-qc",
        action="store_true",
        help="with --rows: how partial_localisation and the crop growth did (needs rows with "
        "pancreas_in_box, written by assess since the localisation QC)",
    )
    ap.add_argument(
        "--second",
        nargs=2,
        metavar=("SEED", "STUDIES"),
        help="stage 1 on second-renderer studies 0..STUDIES-1 made in memory as the archive's",
    )
    ap.add_argument(
        "--detect",
        nargs=3,
        type=int,
        metavar=("SEED", "START", "STUDIES"),
        help="the full detector (assess rows and summary) on second-renderer studies "
        "START..START+STUDIES-1 made in memory as the archive's",
    )
    ap.add_argument(
        "--package",
        type=Path,
        default=None,
        help="model package for the stage-1 and oracle runs (default: the shipped one)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    pkg = args.package
    result: dict = {"note": "reference model trained on synthetic phantoms; not a clinical device"}
    if args.package is not None:
        result["package"] = str(args.package)
    if args.rows:
        op = load_package(pkg).thresholds.operating
        rows = load_rows(args.rows, args.archive)
        result["summary"] = summarise_rows(rows, operating=op)
        if args.localisation_qc:
            result["localisation_qc"] = localisation_qc_summary(rows)
    cov = []
    for a in args.coverage_archive:
        cov += stage1_coverage(archive_cases(a), pkg)
    if args.coverage_phantom_seed is not None:
        cov += stage1_coverage(
            phantom_cases(
                seed=args.coverage_phantom_seed,
                studies=args.studies,
                matrix=args.matrix,
                cache=args.cache,
            ),
            pkg,
        )
    if cov:
        result["stage1"] = _stage1_summary(cov)
    if args.variant:
        seed, n, off, noise = args.variant
        cases = variant_cases(
            int(seed),
            range(int(n)),
            matrix=args.matrix,
            hu_offset=float(off),
            noise_hu=float(noise),
            noise_kind="white",
        )
        result["variant"] = {"seed": int(seed), "hu_offset": float(off), "noise_hu": float(noise)}
        result["stage1_variant"] = _stage1_summary(stage1_coverage(cases, pkg))
    if args.second:
        seed, n = (int(v) for v in args.second)
        result["second"] = {"seed": seed, "studies": n}
        result["stage1_second"] = _stage1_summary(
            stage1_coverage(variant_cases(seed, range(n), matrix=args.matrix), pkg)
        )
    if args.detect:
        seed, start, n = args.detect
        rows = assess_cases(
            variant_cases(seed, range(start, start + n), matrix=args.matrix), pkg, threads=1
        )
        op = load_package(pkg).thresholds.operating
        result["detect"] = {"seed": seed, "start": start, "studies": n, "operating": op}
        result["rows"] = rows  # readable again with --rows (merge chunks)
        result["detect_summary"] = summarise_rows(rows, operating=op)
    if args.oracle or args.oracle_phantom_seed is not None:
        if args.oracle:
            seed, n = args.oracle
            kw = {}
            if args.oracle_variant:
                kw = dict(
                    hu_offset=args.oracle_variant[0],
                    noise_hu=args.oracle_variant[1],
                    noise_kind="white",
                )
            cases = variant_cases(int(seed), range(int(n)), matrix=args.matrix, **kw)
            result["oracle_source"] = {"second_renderer_seed": int(seed), "studies": int(n), **kw}
        else:
            cases = phantom_cases(
                seed=args.oracle_phantom_seed,
                studies=args.studies,
                matrix=args.matrix,
                cache=args.cache,
            )
            result["oracle_source"] = {"phantom_seed": args.oracle_phantom_seed}
        result["oracle_stage2"] = _oracle_summary(oracle_stage2(cases, pkg))
    args.out.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
