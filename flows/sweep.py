"""The nightly sweep: a Prefect flow that fans Ray work over an archive and writes findings.

index (incremental) -> select series -> plan (studies with no row for this model version and
config hash) -> Ray fan-out (loader tasks + engine actors) -> findings in Parquet -> summary.

Exactly once: every study gets one row per (model version, config hash). Rows are appended in
small atomic batches by the driver; a sweep killed at any moment loses at most the unflushed batch,
whose studies have no row and are planned again by the next run. The store's lock keeps a second
sweep on the same store out.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pdacscreen.flows.ray_pool import WorkItem, init_ray, run_pool
from pdacscreen.flows.study_worker import EngineActor, StudyPayload, load_study

log = logging.getLogger(__name__)

__all__ = ["SweepSummary", "nightly_sweep", "sweep_config_hash", "PROGRESS"]

# The CLI installs a progress callback here: (event, n) with event "total" or "advance".
PROGRESS: contextvars.ContextVar[Callable[[str, int], None] | None] = contextvars.ContextVar(
    "pdacscreen_sweep_progress", default=None
)

_TRANSIENT = (OSError, TimeoutError)


def _retry_transient_io(task_, task_run, state) -> bool:
    """Prefect retry condition: retry only on transient I/O errors, never on bad data."""
    try:
        state.result()
    except _TRANSIENT:
        return True
    except Exception:
        return False
    return False


@dataclass
class SweepSummary:
    sweep_id: str
    store: str
    model_name: str
    model_version: str
    config_hash: str
    studies_in_archive: int = 0
    studies_planned: int = 0
    processed: int = 0
    ok: int = 0
    flagged: int = 0
    skipped: int = 0
    failed: int = 0
    already_done: int = 0
    file_errors: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    index_new_or_changed: int = 0
    duration_s: float = 0.0
    studies_per_hour: float = 0.0
    findings_files: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        rows = [
            ("studies in archive", self.studies_in_archive),
            ("already processed (this model + config)", self.already_done),
            ("planned this run", self.studies_planned),
            ("processed", self.processed),
            ("ok", self.ok),
            ("flagged (PDAC suspected)", self.flagged),
            ("skipped", self.skipped),
            ("failed", self.failed),
            ("bad files in archive (new this run)", self.file_errors),
            ("throughput (studies/hour)", f"{self.studies_per_hour:.0f}"),
            ("duration (s)", f"{self.duration_s:.1f}"),
        ]
        lines = [
            f"# pdacscreen sweep `{self.sweep_id}`",
            "",
            f"Model **{self.model_name} {self.model_version}** (config `{self.config_hash[:12]}`), "
            f"store `{self.store}`. Reference model trained on synthetic phantoms: not a clinical device.",
            "",
            "| | |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in rows],
        ]
        if self.stage_seconds:
            lines += ["", "| where the time went (summed over studies) | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in self.stage_seconds.items()]
        if self.errors_by_code:
            lines += ["", "| error code | count |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(self.errors_by_code.items())]
        return "\n".join(lines) + "\n"


def sweep_config_hash(*, model_sha256: str, rules: Any, backend_config: dict[str, Any]) -> str:
    """Hash of everything that changes a finding: model, selection rules, engine settings."""
    rules_json = json.dumps(_jsonable(rules), sort_keys=True, default=str)
    blob = json.dumps(
        {"model": model_sha256, "rules": rules_json, "engine": backend_config}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    try:
        return asdict(obj)
    except TypeError:
        return obj


@task(
    name="index-archive",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_transient_io,
)
def index_archive(archive: str, index_dir: str) -> dict[str, Any]:
    from pdacscreen.io.index import update_index

    upd = update_index(Path(archive), Path(index_dir))
    return _jsonable(upd) if not isinstance(upd, dict) else upd


@task(name="select-series", cache_policy=NO_CACHE)
def select_studies(index_dir: str, rules_path: str | None) -> tuple[list[Any], Any, Any]:
    from pdacscreen.io.index import read_index
    from pdacscreen.io.select import load_rules, select_series

    index = read_index(Path(index_dir))
    rules = load_rules(Path(rules_path) if rules_path else None)
    return select_series(index, rules=rules), rules, index


@task(name="plan", cache_policy=NO_CACHE)
def plan(selections: list[Any], done: set[str], limit: int | None) -> list[Any]:
    todo = [s for s in selections if s.study_instance_uid not in done]
    todo.sort(key=lambda s: (str(s.study_date or ""), s.study_instance_uid))
    return todo[:limit] if limit else todo


def _series_facts(index: Any) -> dict[str, dict[str, Any]]:
    """Per-series header facts the findings rows carry (vendor, thickness, date)."""
    if index is None or len(index) == 0:
        return {}
    cols = [
        c for c in ("manufacturer", "slice_thickness", "study_date", "accession_key") if c in index
    ]
    ok = index[index["status"] == "ok"] if "status" in index else index
    first = ok.groupby("series_instance_uid")[cols].first()
    return first.to_dict(orient="index")


@task(name="fan-out", cache_policy=NO_CACHE)
def fan_out(
    todo: list[Any],
    *,
    store_root: str,
    model: str | None,
    backend: str,
    rules: Any,
    facts: dict[str, dict[str, Any]],
    sweep_id: str,
    sweep_date: dt.date,
    model_name: str,
    model_version: str,
    config_hash: str,
    ray_address: str | None,
    n_actors: int | None,
    flush_every: int,
    extra_metadata: dict[str, str],
) -> dict[str, Any]:
    """Run the Ray pool over ``todo`` and append findings/failures in atomic batches."""
    import ray

    from pdacscreen.io.store import FindingsStore

    store = FindingsStore(Path(store_root))
    init_ray(ray_address, num_cpus=None, temp_dir=os.environ.get("RAY_TMPDIR"))
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if n_actors is None:
        n_actors = gpus if gpus else max(1, cpus // 2)
    actor_opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    actor_cls = ray.remote(EngineActor).options(max_restarts=0, **actor_opts)
    evidence_root = str(store.evidence_dir)

    def factory():
        return actor_cls.remote(model, backend, evidence_root)

    by_uid = {s.study_instance_uid: s for s in todo}
    items = (
        WorkItem(
            s.study_instance_uid,
            StudyPayload(
                study_instance_uid=s.study_instance_uid,
                series_instance_uid=s.series_instance_uid,
                files=tuple(str(f) for f in s.files),
                rules=rules,
            ),
        )
        for s in todo
    )
    progress = PROGRESS.get()
    if progress:
        progress("total", len(todo))
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    written: list[str] = []
    counts: Counter[str] = Counter()
    stage_seconds: Counter[str] = Counter()
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal rows, failures, last_flush
        if rows:
            path = store.append_findings(
                [_project(r) for r in rows],
                sweep_id=sweep_id,
                sweep_date=sweep_date,
                model_version=model_version,
                config_hash=config_hash,
                extra_metadata=extra_metadata,
            )
            if path:
                written.append(str(path))
        if failures:
            store.append_failures(failures, sweep_id=sweep_id)
        rows, failures = [], []
        last_flush = time.monotonic()

    t_start = time.perf_counter()
    for outcome in run_pool(
        items,
        load=load_study,
        actor_factory=factory,
        n_actors=n_actors,
        max_in_flight=2 * n_actors + 1,
        max_attempts=2,
    ):
        sel = by_uid[outcome.key]
        row = _base_row(sel, facts.get(sel.series_instance_uid or "", {}))
        row.update(
            model_name=model_name,
            model_version=model_version,
            config_hash=config_hash,
            sweep_id=sweep_id,
            processed_at=dt.datetime.now(dt.UTC),
        )
        if outcome.error_code:
            row.update(status="failed", error_code=outcome.error_code, duration_s=None)
            failures.append(
                _failure(sel, stage="load", code=outcome.error_code, message=outcome.message)
            )
        else:
            value = outcome.value
            row.update(value["row"])
            for stage, seconds in (value.get("timings") or {}).items():
                stage_seconds[stage] += seconds
            if value.get("failure"):
                failures.append(_failure(sel, **value["failure"]))
        counts[row["status"]] += 1
        if row["status"] == "ok" and row.get("pdac_flag"):
            counts["flagged"] += 1
        if row.get("error_code"):
            counts["code:" + row["error_code"]] += 1
        rows.append(row)
        if progress:
            progress("advance", 1)
        if len(rows) >= flush_every or time.monotonic() - last_flush > 30:
            flush()
    flush()
    return {
        "counts": dict(counts),
        "files": written,
        "seconds": time.perf_counter() - t_start,
        "stage_seconds": dict(stage_seconds),
    }


def _preprocessing_text(package: Any) -> str:
    pre = package.preprocessing
    stages = ", ".join(
        f"{name}: {tuple(round(float(x), 2) for x in spec.spacing_mm)} mm"
        for name, spec in package.stages.items()
    )
    return (
        f"HU window {tuple(pre.window_hu)}, (x - {pre.mean}) / {pre.std}; "
        f"trilinear resampling with anti-aliasing; grids {stages}"
    )


def _project(row: dict[str, Any]) -> dict[str, Any]:
    """Keep the findings columns (engines may return more, e.g. pancreas mean HU)."""
    from pdacscreen.io.store import FINDINGS_COLUMNS

    return {k: v for k, v in row.items() if k in FINDINGS_COLUMNS}


def _base_row(sel: Any, facts: dict[str, Any]) -> dict[str, Any]:
    thickness = facts.get("slice_thickness")
    return {
        "study_instance_uid": sel.study_instance_uid,
        "series_instance_uid": sel.series_instance_uid,
        "patient_key": sel.patient_key,
        "study_date": _as_date(sel.study_date or facts.get("study_date")),
        "manufacturer": facts.get("manufacturer"),
        "slice_thickness_mm": float(thickness) if thickness not in (None, "") else None,
        "accession_key": facts.get("accession_key"),
        "status": "ok",
        "error_code": None,
        "qc_flags": [],
    }


def _text(value: Any) -> str | None:
    """A string, or None for None / NaN / empty (pandas fills missing strings with NaN)."""
    if value is None or value != value or value == "":
        return None
    return str(value)


def _as_date(value: Any) -> dt.date | None:
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


def _failure(
    sel: Any, *, stage: str, code: str, message: str, scope: str = "study"
) -> dict[str, Any]:
    return {
        "stage": stage,
        "scope": scope,
        "study_instance_uid": sel.study_instance_uid,
        "series_instance_uid": sel.series_instance_uid,
        "path": None,
        "error_code": code,
        "message": message,
        "occurred_at": dt.datetime.now(dt.UTC),
    }


def _selection_rows(
    skipped: list[Any], facts: dict[str, dict[str, Any]], **common: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for studies with no eligible series: reported, never dropped."""
    rows, failures = [], []
    for sel in skipped:
        row = _base_row(sel, facts.get(sel.series_instance_uid or "", {}))
        reasons = "; ".join(
            f"{uid}: {', '.join(rs)}" for uid, rs in sorted(dict(sel.rejections).items())
        )
        row.update(common, status="skipped", error_code="no_eligible_series", duration_s=0.0)
        rows.append(row)
        failures.append(
            _failure(sel, stage="select", code="no_eligible_series", message=reasons[:2000])
        )
    return rows, failures


@task(name="index-failures", cache_policy=NO_CACHE)
def file_failures(index: Any, store_root: str, sweep_id: str) -> int:
    """Record each bad file once (new ones only): a failures row with stage 'index'."""
    from pdacscreen.io.store import FindingsStore

    store = FindingsStore(Path(store_root))
    if index is None or len(index) == 0 or "status" not in index:
        return 0
    bad = index[index["status"] != "ok"]
    if len(bad) == 0:
        return 0
    seen: set[tuple[str, str]] = set()
    prev = store.read_failures()
    if len(prev):
        prev = prev[prev["stage"] == "index"]
        seen = set(zip(prev["path"].astype(str), prev["error_code"].astype(str), strict=True))
    now = dt.datetime.now(dt.UTC)
    rows = []
    for rec in bad.to_dict(orient="records"):
        key = (str(rec.get("path")), str(rec.get("error_code")))
        if key in seen:
            continue
        rows.append(
            {
                "stage": "index",
                "scope": "file",
                "study_instance_uid": _text(rec.get("study_instance_uid")),
                "series_instance_uid": _text(rec.get("series_instance_uid")),
                "path": str(rec.get("path")),
                "error_code": _text(rec.get("error_code")) or "unreadable",
                "message": (_text(rec.get("error_message")) or "")[:2000],
                "occurred_at": now,
            }
        )
    if rows:
        store.append_failures(rows, sweep_id=sweep_id)
    return len(rows)


@flow(name="pdacscreen-nightly-sweep", log_prints=False)
def nightly_sweep(
    archive: str,
    store: str,
    model: str | None = None,
    ray_address: str | None = None,
    limit: int | None = None,
    backend: str = "auto",
    rules: str | None = None,
    n_actors: int | None = None,
    flush_every: int = 8,
) -> dict[str, Any]:
    """Sweep ``archive`` into ``store`` with the model package ``model`` (default: reference)."""
    from pdacscreen.engine.package import load_package
    from pdacscreen.io.store import FindingsStore

    logger = get_run_logger()
    t0 = time.perf_counter()
    fs = FindingsStore(Path(store))
    sweep_date = dt.date.today()
    sweep_id = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{socket.gethostname()[:12]}-{os.getpid()}"
    with fs.lock(sweep_id=sweep_id):
        package = load_package(Path(model) if model else None)
        upd = index_archive(archive, str(fs.index_dir))
        selections, rule_set, index = select_studies(str(fs.index_dir), rules)
        config_hash = sweep_config_hash(
            model_sha256=package.sha256, rules=rule_set, backend_config={"flush": "v1"}
        )
        summary = SweepSummary(
            sweep_id=sweep_id,
            store=str(Path(store).resolve()),
            model_name=package.name,
            model_version=package.version,
            config_hash=config_hash,
        )
        summary.index_new_or_changed = int(upd.get("new", 0)) + int(upd.get("changed", 0))
        summary.file_errors = file_failures(index, store, sweep_id)
        done = fs.processed_studies(model_version=package.version, config_hash=config_hash)
        summary.studies_in_archive = len(selections)
        summary.already_done = sum(s.study_instance_uid in done for s in selections)
        todo = plan(selections, done, limit)
        eligible = [s for s in todo if s.status == "selected"]
        skipped = [s for s in todo if s.status != "selected"]
        summary.studies_planned = len(todo)
        facts = _series_facts(index)
        common = dict(
            model_name=package.name,
            model_version=package.version,
            config_hash=config_hash,
            sweep_id=sweep_id,
            processed_at=dt.datetime.now(dt.UTC),
        )
        extra_metadata = {
            "model_sha256": package.sha256,
            "model_name": package.name,
            "selection_rule": f"{getattr(rule_set, 'name', 'default')} v{getattr(rule_set, 'version', '?')}",
            "preprocessing": _preprocessing_text(package),
            "threshold_source": (
                f"operating={package.thresholds.operating:.4f} ({package.thresholds.method})"
            ),
        }
        counts: Counter[str] = Counter()
        if skipped:
            rows, failures = _selection_rows(skipped, facts, **common)
            fs.append_findings(
                [_project(r) for r in rows],
                sweep_id=sweep_id,
                sweep_date=sweep_date,
                model_version=package.version,
                config_hash=config_hash,
                extra_metadata=extra_metadata,
            )
            fs.append_failures(failures, sweep_id=sweep_id)
            counts["skipped"] += len(rows)
            counts["code:no_eligible_series"] += len(rows)
        if eligible:
            out = fan_out(
                eligible,
                store_root=store,
                model=model,
                backend=backend,
                rules=rule_set,
                facts=facts,
                sweep_id=sweep_id,
                sweep_date=sweep_date,
                model_name=package.name,
                model_version=package.version,
                config_hash=config_hash,
                ray_address=ray_address,
                n_actors=n_actors,
                flush_every=flush_every,
                extra_metadata=extra_metadata,
            )
            counts.update(out["counts"])
            summary.findings_files = out["files"]
            summary.stage_seconds = {k: round(v, 2) for k, v in out["stage_seconds"].items()}
        summary.ok = counts.get("ok", 0)
        summary.skipped = counts.get("skipped", 0)
        summary.failed = counts.get("failed", 0)
        summary.flagged = counts.get("flagged", 0)
        summary.processed = summary.ok + summary.skipped + summary.failed
        summary.errors_by_code = {
            k.removeprefix("code:"): v for k, v in counts.items() if k.startswith("code:")
        }
        summary.duration_s = time.perf_counter() - t0
        summary.studies_per_hour = (
            3600.0 * summary.processed / summary.duration_s if summary.duration_s > 0 else 0.0
        )
    create_markdown_artifact(
        markdown=summary.markdown(),
        key="pdacscreen-sweep-summary",
        description=f"pdacscreen sweep {sweep_id}",
    )
    logger.info(
        "sweep %s: %d processed (%d flagged, %d failed, %d skipped) in %.1f s",
        sweep_id,
        summary.processed,
        summary.flagged,
        summary.failed,
        summary.skipped,
        summary.duration_s,
    )
    return asdict(summary)
