"""A synthetic findings store, generated directly (vectorised) for the query/evaluate/worklist tests
and the query benchmark: ``make_synthetic_findings(store, n_rows, seed=...)``.

Cases follow a binormal model on the logit scale (positives shifted by ``separation``), so the
evaluation has a known truth; truth labels come back as an Arrow table shaped like a phantom
archive's ``truth.parquet``. Everything is a function of ``seed`` (no clock, no random UIDs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pdacscreen.io.store import FindingsStore

__all__ = ["SyntheticStore", "make_synthetic_findings", "VENDORS", "BASE_DATE"]

VENDORS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA")
THICKNESSES = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
LOCATIONS = ("head", "body", "tail")
PHASES = ("non_contrast", "non_contrast", "non_contrast", "portal_venous", "arterial")
QC = ("gantry_tilt", "uneven_spacing", "fatty_pancreas_suspected", "partial_pancreas")
ERRORS = ("truncated", "bad_geometry", "not_dicom", "unsupported_transfer_syntax")
SITES = ("site-A", "site-B", "site-C")
BASE_DATE = dt.date(2025, 3, 1)
MODEL_NAME, MODEL_VERSION, THRESHOLD = "pdacscreen-reference", "0.1.0", 0.5


@dataclass(frozen=True)
class SyntheticStore:
    """What :func:`make_synthetic_findings` wrote: the store, its files and the truth table."""

    store: FindingsStore
    files: tuple[Path, ...]
    truth: pa.Table
    config_hash: str
    model_version: str = MODEL_VERSION


def _strings(prefix: str, ints: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(ints).cast(pa.string()), "")


def _OBJ(choices: tuple) -> np.ndarray:
    return np.asarray(choices, dtype=object)


def _pick(choices: tuple, idx: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(choices)).cast(
        pa.string()
    )


def make_synthetic_findings(
    store: Path | FindingsStore,
    n_rows: int,
    *,
    seed: int,
    n_files: int = 4,
    n_days: int = 3,
    prevalence: float = 0.1,
    separation: float = 2.5,
    failed_fraction: float = 0.03,
    evidence: bool = False,
    index: bool = False,
) -> SyntheticStore:
    """Write ``n_rows`` findings rows (one per study) over ``n_days`` sweep dates, ``n_files`` files.

    Args:
        store: the store folder (or store).
        n_rows: number of studies.
        seed: all values derive from it.
        prevalence: fraction of PDAC-positive studies.
        separation: shift of positives' logit in SDs (AUROC = Phi(separation / sqrt 2)).
        failed_fraction: fraction of rows with status failed (2/3) or skipped (1/3).
        evidence: write ``evidence/<n>/key.png`` for flagged rows (keep n small).
        index: write a small archive index in ``STORE/index``.
    """
    st = store if isinstance(store, FindingsStore) else FindingsStore(store)
    rng = np.random.default_rng(seed)
    n = int(n_rows)
    i = np.arange(n, dtype=np.int64)
    config_hash = hashlib.sha256(f"synthetic-{seed}".encode()).hexdigest()[:16]
    label = rng.random(n) < prevalence
    logit = rng.normal(-2.0, 1.0, n) + separation * label
    prob = 1.0 / (1.0 + np.exp(-logit))
    # True lesions (positives): size, location, centre (patient LPS mm).
    true_diam = np.where(label, rng.uniform(8.0, 45.0, n), np.nan)
    loc_idx = rng.choice(3, n, p=[0.65, 0.2, 0.15])
    true_c = np.stack([rng.normal(m, 8.0, n) for m in (20.0, 10.0, -400.0)], axis=1)
    true_c[~label] = np.nan
    # Predicted top candidate: present when prob >= 0.3; near the truth for positives.
    has_pred = prob >= 0.3
    near = label & (rng.random(n) < 0.9)
    pred_c = np.where(
        near[:, None],
        true_c + rng.normal(0.0, 3.0, (n, 3)),
        np.stack([rng.normal(m, 25.0, n) for m in (20.0, 10.0, -400.0)], axis=1),
    )
    pred_c[~has_pred] = np.nan
    pred_diam = np.where(label, true_diam * rng.normal(1.0, 0.1, n), rng.uniform(5.0, 15.0, n))
    pred_diam[~has_pred] = np.nan
    # Status: a few failed / skipped rows with codes and no scores.
    u = rng.random(n)
    failed, skipped = (
        u < failed_fraction * 2 / 3,
        (u >= failed_fraction * 2 / 3) & (u < failed_fraction),
    )
    ok = ~(failed | skipped)
    status_idx = np.where(ok, 0, np.where(failed, 1, 2))
    err = np.where(skipped, 4, rng.integers(0, 4, n))
    vendor = rng.integers(0, len(VENDORS), n)
    thick = rng.integers(0, len(THICKNESSES), n)
    # Patients: 80% of studies own a patient; the rest repeat an earlier patient (follow-ups).
    patient = np.where(rng.random(n) < 0.8, i, (rng.random(n) * np.maximum(i, 1)).astype(np.int64))
    study_days = rng.integers(0, 3650, n)
    pancreas = rng.normal(70.0, 12.0, n) - 0.002 * study_days
    qc_idx = np.where(rng.random(n) < 0.1, rng.integers(0, len(QC), n), -1)
    qc_offsets = np.concatenate([[0], np.cumsum(qc_idx >= 0)]).astype(np.int32)
    flag = ok & (prob >= THRESHOLD)

    def masked(values: np.ndarray, keep: np.ndarray) -> pa.Array:
        return pa.array(values, mask=~keep)

    days = (np.datetime64(BASE_DATE) - np.datetime64("1970-01-01")).astype(np.int64)
    cand = ok & has_pred
    pred_loc = np.where(label, loc_idx, rng.integers(0, 3, n))
    table = pa.table(
        {
            "study_instance_uid": _strings(f"1.2.826.0.1.3680043.10.999.{seed}.", i),
            "series_instance_uid": _strings(f"1.2.826.0.1.3680043.10.998.{seed}.", i),
            "patient_key": _strings("pk", patient),
            "accession_key": _strings("ak", i),
            "study_date": pa.array((days - study_days).astype(np.int32)).cast(pa.date32()),
            "manufacturer": _pick(VENDORS, vendor),
            "slice_thickness_mm": pa.array(np.asarray(THICKNESSES)[thick]),
            "model_name": pa.repeat(pa.scalar(MODEL_NAME), n),
            "pdac_probability": masked(prob, ok),
            "pdac_flag": masked(flag, ok),
            "operating_threshold": masked(np.full(n, THRESHOLD), ok),
            "lesion_count": masked(np.where(has_pred, 1 + (prob > 0.9), 0).astype(np.int32), ok),
            "lesion_diameter_mm": masked(pred_diam, cand),
            "lesion_volume_ml": masked(np.pi / 6 * (pred_diam / 10.0) ** 3, cand),
            "lesion_center_x_mm": masked(pred_c[:, 0], cand),
            "lesion_center_y_mm": masked(pred_c[:, 1], cand),
            "lesion_center_z_mm": masked(pred_c[:, 2], cand),
            "lesion_location": pa.array(_OBJ(LOCATIONS)[pred_loc], mask=~cand),
            "pancreas_volume_ml": masked(pancreas, ok),
            "phase_estimate": _pick(PHASES, rng.integers(0, len(PHASES), n)),
            "qc_flags": pa.ListArray.from_arrays(
                pa.array(qc_offsets), _pick(QC, qc_idx[qc_idx >= 0])
            ),
            "status": _pick(("ok", "failed", "skipped"), status_idx),
            "error_code": masked(_OBJ((*ERRORS, "no_eligible_series"))[err], ~ok),
            "evidence_path": masked(np.char.add("evidence/", i.astype(str)), flag)
            if evidence
            else pa.nulls(n, pa.string()),
            "duration_s": pa.array(rng.gamma(4.0, 5.0, n)),
        }
    )
    files = []
    bounds = np.linspace(0, n, n_files + 1).astype(np.int64)
    for f in range(n_files):
        lo, hi = int(bounds[f]), int(bounds[f + 1])
        if hi <= lo:
            continue
        day = BASE_DATE + dt.timedelta(days=f * n_days // n_files)
        at = dt.datetime.combine(day, dt.time(2, 0), tzinfo=dt.UTC)
        secs = np.arange(hi - lo, dtype=np.int64) * 1_000_000
        part = table.slice(lo, hi - lo).append_column(
            "processed_at",
            pa.array(secs + int(at.timestamp() * 1e6)).cast(pa.timestamp("us", tz="UTC")),
        )
        sweep_id = f"sweep-{day.isoformat()}"
        path = st.append_findings_table(
            part,
            sweep_id=sweep_id,
            sweep_date=day,
            model_version=MODEL_VERSION,
            config_hash=config_hash,
            extra_metadata={"model_sha256": "0" * 64, "selection_rule": "synthetic"},
        )
        files.append(path)
        bad = np.flatnonzero(~ok[lo:hi]) + lo
        bad = table.take(np.flatnonzero(~ok[lo:hi])[:10_000] + lo)
        st.append_failures(
            [
                {**r, "stage": "load", "scope": "series", "message": "synthetic", "occurred_at": at}
                for r in bad.select(["study_instance_uid", "error_code"]).to_pylist()
            ],
            sweep_id=sweep_id,
        )
    if evidence:
        _write_key_images(st, np.flatnonzero(flag), prob)
    if index:
        _write_index(st, table)
    truth = pa.table(
        {
            "study_instance_uid": table.column("study_instance_uid"),
            "label": pa.array(label.astype(np.int8)),
            "lesion_diameter_mm": pa.array(true_diam, mask=~label),
            "lesion_center_x_mm": pa.array(true_c[:, 0], mask=~label),
            "lesion_center_y_mm": pa.array(true_c[:, 1], mask=~label),
            "lesion_center_z_mm": pa.array(true_c[:, 2], mask=~label),
            "lesion_location": pa.array(_OBJ(LOCATIONS)[loc_idx], mask=~label),
            "lesion_type": pa.array(np.where(label, "pdac", "none")),
            "manufacturer": table.column("manufacturer"),
            "slice_thickness_mm": table.column("slice_thickness_mm"),
            "site": _pick(SITES, rng.integers(0, len(SITES), n)),
            "fatty_pancreas": pa.array(rng.random(n) < 0.1),
        }
    )
    return SyntheticStore(store=st, files=tuple(files), truth=truth, config_hash=config_hash)


def _write_key_images(st: FindingsStore, rows: np.ndarray, prob: np.ndarray) -> None:
    """A small deterministic grey 'key image' with a bright disc per flagged study."""
    from PIL import Image, ImageDraw

    for k in rows:
        folder = st.evidence_dir / str(int(k))
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.new("L", (96, 96), 40)
        draw = ImageDraw.Draw(img)
        r = 8 + int(20 * prob[k])
        draw.ellipse((48 - r, 48 - r, 48 + r, 48 + r), fill=220)
        img.save(folder / "key.png")


def _write_index(st: FindingsStore, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    st.index_dir.mkdir(parents=True, exist_ok=True)
    index = table.select(
        ["study_instance_uid", "series_instance_uid", "manufacturer", "slice_thickness_mm"]
    ).append_column("modality", pa.repeat(pa.scalar("CT"), table.num_rows))
    pq.write_table(index, st.index_dir / "index-00001.parquet")
