"""The nightly sweep: a Prefect flow that fans Ray work over an archive and writes findings.

index (incremental) -> select series -> plan (studies with no row for this model version and
config hash) -> Ray fan-out (loader tasks + engine actors) -> findings in Parquet -> summary and
run manifest (``STORE/sweeps/<sweep_id>.json``).

The flow takes plain parameters (so a deployment can schedule it) and builds the ONE
:class:`~pdacscreen.flows.config.SweepConfig` in the driver, which every task, loader and actor then
receives explicitly.  Exactly once: every study gets one row per (model version, config hash).
Rows are appended in small atomic batches by the driver; a sweep killed at any moment loses at
most the unflushed batch, whose studies have no row and are planned again by the next run.  The
store's lock keeps a second sweep on the same store out.

DICOM results (:mod:`pdacscreen.flows.study_worker`): the engine actors write a SEG and a TID 1500
SR per ``ok`` study (``dicom_results``: all / flagged / none) into ``STORE/dicom/<study folder>/``;
their records go into ``STORE/dicom_exports/`` in the same batches as the findings (records
first: a batch cut between the two has records and no rows, so the studies are planned again
and rewritten under the same UIDs).  With ``write_back`` (DICOMweb sources), the ``write-back``
task then sends by STOW-RS every written object of the source not yet ``sent``, this run's and
those an earlier run failed to send (:func:`pdacscreen.io.dicomweb.send_pending`).

SIGTERM (a scheduler stopping the job) is a clean stop: the driver stops taking results, flushes
the current batch, and writes the run manifest with ``status: stopped``; the studies still in
flight have no row, so the next run plans them again.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import SecretBytes

from pdacscreen.engine.config import EngineConfig
from pdacscreen.engine.package import ModelPackage, load_package
from pdacscreen.flows.config import SweepConfig
from pdacscreen.flows.outcomes import (
    SkippedStudy,
    StudyOutcome,
    StudyTask,
    failure_row,
    finding_row,
    text_or_none,
)
from pdacscreen.flows.ray_pool import (
    WorkItem,
    engine_placements,
    engine_slots,
    init_ray,
    run_pool,
)
from pdacscreen.flows.study_worker import EngineActor, evidence_folder_name, load_study
from pdacscreen.io.dicom.export import append_exports
from pdacscreen.io.dicom.read import shutdown_worker_pools
from pdacscreen.io.dicomweb import (
    DicomwebSource,
    fetch_series,
    index_source,
    is_dicomweb,
    send_pending,
    source_from_env,
)
from pdacscreen.io.errors import ErrorCode, Status
from pdacscreen.io.index import (
    IndexUpdate,
    read_index,
    source_instance_counts,
    update_index,
    update_index_rows,
)
from pdacscreen.io.pseudonym import load_key
from pdacscreen.io.select import StudySelection, load_rules, select_series
from pdacscreen.io.store import FindingsStore
from pdacscreen.kernels import has_gpu

log = logging.getLogger(__name__)

__all__ = ["PROGRESS", "SweepSummary", "build_config", "nightly_sweep", "series_facts"]

# The CLI installs a progress callback here for the duration of one sweep: (event, n) with event
# "total" or "advance".  A context variable, not global state: it is set and reset by the caller.
PROGRESS: contextvars.ContextVar[Callable[[str, int], None] | None] = contextvars.ContextVar(
    "pdacscreen_sweep_progress", default=None
)

# Set by nightly_sweep for one run: the event a SIGTERM sets (read by fan_out between studies).
_STOP: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "pdacscreen_sweep_stop", default=None
)

_TRANSIENT = (OSError, TimeoutError)
MANIFEST_PACKAGES = (
    "pdacscreen",
    "numpy",
    "scipy",
    "torch",
    "onnxruntime",
    "pydicom",
    "pyarrow",
    "duckdb",
    "ray",
    "prefect",
)


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
    not_assessable: int = 0
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
    engine_backends: list[str] = field(default_factory=list)
    studies_by_node: dict[str, int] = field(default_factory=dict)
    manifest: str = ""
    status: str = "completed"
    dicom_written: int = 0
    dicom_sent: int = 0
    dicom_failed: int = 0

    def _dicom(self) -> str:
        return f"{self.dicom_written} / {self.dicom_sent} / {self.dicom_failed}"

    def markdown(self) -> str:
        rows = [
            ("status", self.status),
            ("studies in archive", self.studies_in_archive),
            ("already processed (this model + config)", self.already_done),
            ("planned this run", self.studies_planned),
            ("processed", self.processed),
            ("ok (assessed)", self.ok),
            ("flagged (PDAC suspected)", self.flagged),
            ("not assessable (read, not screened)", self.not_assessable),
            ("skipped", self.skipped),
            ("failed", self.failed),
            ("bad files in archive (new this run)", self.file_errors),
            ("DICOM results written / sent / failed", self._dicom()),
            ("engine", ", ".join(self.engine_backends) or "-"),
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


def build_config(
    *,
    archive: str,
    store: str,
    model: str | None = None,
    rules: str | None = None,
    engine: EngineConfig | None = None,
    pseudonym_key: bytes,
    ray_address: str | None = None,
    limit: int | None = None,
    n_actors: int | None = None,
    flush_every: int = 8,
    package: ModelPackage | None = None,
    hash_paths: bool = False,
    source: DicomwebSource | None = None,
    dicom_results: str = "all",
    write_back: bool = False,
) -> SweepConfig:
    """The sweep's one configuration, resolved in the driver.

    The engine's ``auto`` choices are resolved for the nodes that will run it: with a local
    runtime, this machine (a GPU when CuPy sees one); with ``ray_address``, the cluster's resources.
    """
    package = package or load_package(Path(model) if model else None)
    if ray_address:
        import ray

        init_ray(ray_address)
        gpu = int(ray.cluster_resources().get("GPU", 0)) > 0
    else:
        gpu = has_gpu()
    return SweepConfig(
        archive=archive,
        store=Path(store),
        model=Path(model) if model else None,
        model_name=package.name,
        model_version=package.version,
        model_sha256=package.sha256,
        rules=load_rules(Path(rules) if rules else None),
        engine=(engine or EngineConfig()).resolve(gpu=gpu),
        pseudonym_key=SecretBytes(pseudonym_key),
        ray_address=ray_address,
        limit=limit,
        n_actors=n_actors,
        flush_every=flush_every,
        hash_paths=hash_paths,
        source=source,
        dicom_results=dicom_results,
        write_back=write_back,
    )


def sweep_store(config: SweepConfig) -> FindingsStore:
    """The store as this sweep writes it (paths as keyed hashes with ``hash_paths``)."""
    if not config.hash_paths:
        return FindingsStore(config.store)
    root = None if "://" in config.archive else config.archive
    return FindingsStore(config.store, path_key=config.key, path_root=root)


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event):
    """While inside, SIGTERM sets ``stop`` (main thread only; elsewhere signals stay as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:  # only sets a flag: no I/O, no locks in a handler
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _stop_scope():
    """One run's stop event: set by SIGTERM, seen by fan_out through :data:`_STOP`."""
    stop = threading.Event()
    token = _STOP.set(stop)
    try:
        with _stop_on_sigterm(stop):
            yield stop
    finally:
        _STOP.reset(token)


@task(
    name="index-archive",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_transient_io,
)
def index_archive(config: SweepConfig) -> IndexUpdate:
    """Bring the store's index up to date; its header-reading processes end with the task (the
    fan-out decodes in Ray workers, so idle crawl processes would only hold memory)."""
    try:
        return update_index(
            Path(config.archive), FindingsStore(config.store).index_dir, key=config.key
        )
    finally:
        shutdown_worker_pools()


@task(name="index-dicomweb", cache_policy=NO_CACHE)
def index_dicomweb(config: SweepConfig, sweep_id: str) -> IndexUpdate:
    """Index the DICOMweb source's CT studies not yet processed for this model and config hash.

    A study whose series cannot be read is left out (planned again next run) and recorded as a
    ``failures`` row with its code (``source_unavailable``, ``source_unauthorized`` ...).
    """
    store = FindingsStore(config.store)
    done = store.processed_studies(model_version=config.model_version, config_hash=config.hash)
    found = index_source(
        config.source, key=config.key, skip=done, known=source_instance_counts(store.index_dir)
    )
    studies = {str(r["study_instance_uid"]) for r in found.rows if r.get("study_instance_uid")}
    upd = update_index_rows(
        found.rows, store.index_dir, archive=config.source.archive, key=config.key, studies=studies
    )
    if found.problems:
        now = dt.datetime.now(dt.UTC)
        rows = [
            {**p, "stage": "index", "path": config.source.archive, "occurred_at": now}
            for p in found.problems
        ]
        sweep_store(config).append_failures(rows, sweep_id=sweep_id)
    log.info(
        "DICOMweb: %d studies found, %d indexed, %d problems, %d bytes",
        found.studies_found,
        found.studies_indexed,
        len(found.problems),
        found.bytes_received,
    )
    return upd


def load_any(task_: StudyTask, config: SweepConfig):
    """The loader for either source: a DICOMweb series is retrieved (only the chosen series, as
    stored) into ``STORE/cache/<study>-<pid>/``, loaded by the same loader, and the cache
    folder deleted, whatever happened."""
    if config.source is None or not task_.files or not is_dicomweb(task_.files[0]):
        return load_study(task_, config)
    name = f"{evidence_folder_name(task_.study_instance_uid)}-{os.getpid()}"
    folder = Path(config.store) / "cache" / name
    try:
        files = fetch_series(config.source, task_.files, folder=folder)
        local = StudyTask(
            task_.study_instance_uid, task_.series_instance_uid, tuple(str(f) for f in files)
        )
        return load_study(local, config)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@task(name="select-series", cache_policy=NO_CACHE)
def select_studies(config: SweepConfig) -> tuple[list[StudySelection], pd.DataFrame]:
    index = read_index(FindingsStore(config.store).index_dir)
    return select_series(index, rules=config.rules), index


@task(name="plan", cache_policy=NO_CACHE)
def plan(selections: list[StudySelection], done: set[str], limit: int | None) -> list[Any]:
    todo = [s for s in selections if s.study_instance_uid not in done]
    todo.sort(key=lambda s: (str(s.study_date or ""), s.study_instance_uid))
    return todo[:limit] if limit else todo


def series_facts(index: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """Per-series header facts the findings rows carry (vendor, thickness, date, accession)."""
    if index is None or len(index) == 0:
        return {}
    cols = [
        c for c in ("manufacturer", "slice_thickness", "study_date", "accession_key") if c in index
    ]
    ok = index[index["status"] == "ok"] if "status" in index else index
    first = ok.groupby("series_instance_uid")[cols].first()
    return first.to_dict(orient="index")


@dataclass(frozen=True)
class _Sweep:
    """The per-run values every row carries (made once by the flow)."""

    sweep_id: str
    sweep_date: dt.date
    processed_at: dt.datetime
    metadata: dict[str, str]


class _Writer:
    """Buffers findings and failures rows and appends them to the store in atomic batches."""

    def __init__(self, store: FindingsStore, config: SweepConfig, run: _Sweep) -> None:
        self.store, self.config, self.run = store, config, run
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.exports: list[dict[str, Any]] = []
        self.files: list[str] = []
        self.counts: Counter[str] = Counter()
        self.backends: set[str] = set()
        self.by_node: Counter[str] = Counter()
        self._last = time.monotonic()

    def add(self, sel: StudySelection, outcome: StudyOutcome, facts: dict[str, Any]) -> None:
        row = finding_row(
            sel,
            outcome,
            facts=facts,
            model_name=self.config.model_name,
            model_version=self.config.model_version,
            config_hash=self.config.hash,
            sweep_id=self.run.sweep_id,
            processed_at=dt.datetime.now(dt.UTC),
        )
        self.rows.append(row)
        if outcome.failure is not None:
            self.failures.append(
                failure_row(sel, outcome.failure, occurred_at=dt.datetime.now(dt.UTC))
            )
        for rec in outcome.exports:
            self.exports.append(rec.row())
            self.counts["dicom:" + rec.status] += 1
        self.counts[row["status"]] += 1
        if row["status"] == Status.OK and row.get("pdac_flag"):
            self.counts["flagged"] += 1
        if row.get("error_code"):
            self.counts["code:" + row["error_code"]] += 1
        if outcome.engine_backend:
            self.backends.add(outcome.engine_backend)
        if outcome.node:
            self.by_node[outcome.node] += 1
        if len(self.rows) >= self.config.flush_every or time.monotonic() - self._last > 30:
            self.flush()

    def flush(self) -> None:
        if self.exports:  # before the rows: a cut here leaves records, no rows (planned again)
            append_exports(
                self.store.root,
                self.exports,
                sweep_id=self.run.sweep_id,
                model_version=self.config.model_version,
                config_hash=self.config.hash,
            )
        if self.rows:
            path = self.store.append_findings(
                self.rows,
                sweep_id=self.run.sweep_id,
                sweep_date=self.run.sweep_date,
                model_version=self.config.model_version,
                config_hash=self.config.hash,
                extra_metadata=self.run.metadata,
            )
            if path:
                self.files.append(str(path))
        if self.failures:
            self.store.append_failures(self.failures, sweep_id=self.run.sweep_id)
        self.rows, self.failures, self.exports = [], [], []
        self._last = time.monotonic()


def _engine_slots(resources: dict[str, float], requested: int | None) -> int:
    """Engine actors for the whole cluster (:func:`~pdacscreen.flows.ray_pool.engine_slots`, at
    least one); ``requested`` (``--actors``) overrides it."""
    return requested or max(1, engine_slots(resources, gpu=int(resources.get("GPU", 0)) > 0))


@task(name="fan-out", cache_policy=NO_CACHE)
def fan_out(
    todo: list[StudySelection],
    *,
    config: SweepConfig,
    facts: dict[str, dict[str, Any]],
    run: _Sweep,
) -> dict[str, Any]:
    """Run the Ray pool over ``todo`` and append findings/failures in atomic batches."""
    import ray

    store = sweep_store(config)
    init_ray(config.ray_address, num_cpus=None, temp_dir=os.environ.get("RAY_TMPDIR"))
    stop = _STOP.get() or threading.Event()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n_actors = _engine_slots(resources, config.n_actors)
    actor_opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    actor_cls = ray.remote(EngineActor)
    config_ref = ray.put(config)
    placements = engine_placements(gpu=bool(gpus))  # engines over every node, not packed on one

    def factory():
        opts = {**actor_opts, "scheduling_strategy": next(placements)}
        return actor_cls.options(max_restarts=0, **opts).remote(config_ref)

    by_uid = {s.study_instance_uid: s for s in todo}
    items = (
        WorkItem(
            s.study_instance_uid,
            StudyTask(s.study_instance_uid, s.series_instance_uid, tuple(str(f) for f in s.files)),
        )
        for s in todo
    )
    progress = PROGRESS.get()
    if progress:
        progress("total", len(todo))
    writer = _Writer(store, config, run)
    stage_seconds: Counter[str] = Counter()
    t_start = time.perf_counter()
    pool = run_pool(
        items,
        load=functools.partial(load_any, config=config),
        actor_factory=factory,
        n_actors=n_actors,
        max_in_flight=2 * n_actors + 1,
        max_attempts=2,
        capacity=lambda: min(n_actors, _engine_slots(ray.cluster_resources(), None)),
        load_timeout_s=config.load_timeout_s,
    )
    # Ray's driver installs its own SIGTERM handler (exit): ours goes on top, after init_ray.
    with _stop_on_sigterm(stop), contextlib.closing(pool):
        for out in pool:
            if stop.is_set():  # results after SIGTERM are not written: planned again next run
                log.warning(
                    "SIGTERM: stopping; %d rows in this batch are flushed", len(writer.rows)
                )
                break
            _take(out, by_uid=by_uid, writer=writer, facts=facts, stage_seconds=stage_seconds)
            if progress:
                progress("advance", 1)
    writer.flush()
    return {
        "counts": dict(writer.counts),
        "files": writer.files,
        "seconds": time.perf_counter() - t_start,
        "stage_seconds": dict(stage_seconds),
        "engine_backends": sorted(writer.backends),
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "studies_by_node": dict(sorted(writer.by_node.items())),
        "stopped": stop.is_set(),
    }


def _take(out, *, by_uid, writer: _Writer, facts, stage_seconds: Counter[str]) -> None:
    """One pool outcome into the writer's batch."""
    sel = by_uid[out.key]
    if out.error_code:
        outcome = StudyOutcome.failed(out.error_code, out.message, stage="load")
    else:
        outcome = out.value
        for stage, seconds in outcome.timings.items():
            stage_seconds[stage] += seconds
    writer.add(sel, outcome, facts.get(sel.series_instance_uid or "", {}))


@task(name="write-back", cache_policy=NO_CACHE)
def send_results(config: SweepConfig, sweep_id: str) -> dict[str, int]:
    """STOW-RS of the written DICOM results not yet sent to the source (this run's and earlier
    ones'); counts by status (``sent``, ``failed``)."""
    return send_pending(config.source, store=Path(config.store), sweep_id=sweep_id)


@task(name="index-failures", cache_policy=NO_CACHE)
def file_failures(
    index: pd.DataFrame, store_root: str, sweep_id: str, config: SweepConfig | None = None
) -> int:
    """Record each bad file once (new ones only): a failures row with stage 'index'."""
    store = sweep_store(config) if config is not None else FindingsStore(Path(store_root))
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
        key = (str(store.path_token(str(rec.get("path")))), str(rec.get("error_code")))
        if key in seen:
            continue
        rows.append(
            {
                "stage": "index",
                "scope": "file",
                "study_instance_uid": text_or_none(rec.get("study_instance_uid")),
                "series_instance_uid": text_or_none(rec.get("series_instance_uid")),
                "path": str(rec.get("path")),
                "error_code": text_or_none(rec.get("error_code")) or ErrorCode.UNREADABLE,
                "message": (text_or_none(rec.get("error_message")) or "")[:2000],
                "occurred_at": now,
            }
        )
    if rows:
        store.append_failures(rows, sweep_id=sweep_id)
    return len(rows)


def _preprocessing_text(package: ModelPackage) -> str:
    pre = package.preprocessing
    stages = ", ".join(
        f"{name}: {tuple(round(float(x), 2) for x in spec.spacing_mm)} mm"
        for name, spec in package.stages.items()
    )
    return (
        f"HU window {tuple(pre.window_hu)}, (x - {pre.mean}) / {pre.std}; "
        f"trilinear resampling with anti-aliasing; grids {stages}"
    )


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in MANIFEST_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gpu_names() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # torch without CUDA, or a broken driver: no GPU to name
        return []
    return []


def write_manifest(store: FindingsStore, config: SweepConfig, summary: SweepSummary) -> Path:
    """``STORE/sweeps/<sweep_id>.json``: what ran, with what, where, and what came of it."""
    folder = store.root / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep_id": summary.sweep_id,
        "status": summary.status,
        "written_at": dt.datetime.now(dt.UTC).isoformat(),
        "config": config.describe(),
        "versions": _versions(),
        "host": {
            "name": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "gpus": _gpu_names(),
        },
        "engine_backends": summary.engine_backends,
        "summary": {k: v for k, v in asdict(summary).items() if k not in ("manifest",)},
    }
    path = folder / f"{summary.sweep_id}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


@flow(name="pdacscreen-nightly-sweep", log_prints=False, validate_parameters=False)
def nightly_sweep(
    archive: str,
    store: str,
    model: str | None = None,
    ray_address: str | None = None,
    limit: int | None = None,
    backend: str = "auto",
    precision: str = "auto",
    rules: str | None = None,
    n_actors: int | None = None,
    flush_every: int = 8,
    demo_key: bool = False,
    hash_paths: bool = False,
    study_date: str | None = None,
    tls_verify: bool = True,
    ca_bundle: str | None = None,
    dicom_results: str = "all",
    write_back: bool = False,
) -> dict[str, Any]:
    """Sweep ``archive`` into ``store`` with the model package ``model`` (default: reference).

    The pseudonym key is resolved here, in the driver, once (``demo_key``: the public demo key;
    otherwise ``PDACSCREEN_PSEUDONYM_KEY`` / ``_FILE`` must be set) and travels to the workers
    inside the :class:`SweepConfig`; it is never a flow parameter.  ``hash_paths``: failures rows
    name files by keyed hashes of their archive paths (folders named after patients).

    A ``dicomweb+http(s)://`` archive is a DICOMweb source: its credentials come from the
    environment (:func:`pdacscreen.io.dicomweb.source_from_env`), never from a parameter;
    ``study_date`` narrows its QIDO search (``20240101-``), ``tls_verify`` / ``ca_bundle`` set
    TLS checks.

    ``dicom_results`` (``all`` | ``flagged`` | ``none``): which ``ok`` studies get a DICOM SEG
    and SR in ``STORE/dicom/``; ``write_back``: send them (and those not sent before) to the
    DICOMweb source by STOW-RS, with the source's credentials.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    fs = FindingsStore(Path(store))
    sweep_id = fs.new_sweep_id()  # ordered even when the clock went backwards
    key = load_key(demo=demo_key)
    source = None
    if is_dicomweb(archive):
        opts: dict[str, Any] = {"study_date": study_date, "verify": tls_verify}
        if ca_bundle:
            opts["ca_bundle"] = ca_bundle
        source = source_from_env(archive, **opts)
    with _stop_scope() as stop, fs.lock(sweep_id=sweep_id):
        package = load_package(Path(model) if model else None)
        config = build_config(
            archive=archive,
            store=store,
            model=model,
            rules=rules,
            engine=EngineConfig(backend=backend, precision=precision),
            pseudonym_key=key,
            ray_address=ray_address,
            limit=limit,
            n_actors=n_actors,
            flush_every=flush_every,
            package=package,
            hash_paths=hash_paths,
            source=source,
            dicom_results=dicom_results,
            write_back=write_back,
        )
        fs = sweep_store(config)
        upd = index_archive(config) if source is None else index_dicomweb(config, sweep_id)
        selections, index = select_studies(config)
        summary = SweepSummary(
            sweep_id=sweep_id,
            store=str(Path(store).resolve()),
            model_name=config.model_name,
            model_version=config.model_version,
            config_hash=config.hash,
        )
        summary.index_new_or_changed = int(upd.new) + int(upd.changed)
        summary.file_errors = file_failures(index, store, sweep_id, config)
        done = fs.processed_studies(model_version=config.model_version, config_hash=config.hash)
        summary.studies_in_archive = len(selections)
        summary.already_done = sum(s.study_instance_uid in done for s in selections)
        todo = plan(selections, done, limit)
        eligible = [s for s in todo if s.status == "selected"]
        skipped = [s for s in todo if s.status != "selected"]
        summary.studies_planned = len(todo)
        facts = series_facts(index)
        run = _Sweep(
            sweep_id=sweep_id,
            sweep_date=dt.date.today(),
            processed_at=dt.datetime.now(dt.UTC),
            metadata={
                "model_sha256": package.sha256,
                "model_name": package.name,
                "selection_rule": f"{Path(config.rules.source).name} v{config.rules.version}",
                "preprocessing": _preprocessing_text(package),
                "threshold_source": (
                    f"operating={package.thresholds.operating:.4f} ({package.thresholds.method})"
                ),
                "engine_config": json.dumps(config.engine.as_dict(), sort_keys=True),
            },
        )
        counts: Counter[str] = Counter()
        if skipped:
            writer = _Writer(fs, config, run)
            for sel in skipped:
                reasons = "; ".join(
                    f"{uid}: {', '.join(rs)}" for uid, rs in sorted(dict(sel.rejections).items())
                )
                outcome = StudyOutcome.skipped(
                    SkippedStudy(ErrorCode.NO_ELIGIBLE_SERIES, reasons), stage="select"
                )
                writer.add(sel, outcome, facts.get(sel.series_instance_uid or "", {}))
            writer.flush()
            counts.update(writer.counts)
        if eligible and not stop.is_set():
            out = fan_out(eligible, config=config, facts=facts, run=run)
            counts.update(out["counts"])
            summary.findings_files = out["files"]
            summary.stage_seconds = {k: round(v, 2) for k, v in out["stage_seconds"].items()}
            summary.engine_backends = out["engine_backends"]
            summary.studies_by_node = out["studies_by_node"]
        if config.write_back and not stop.is_set():
            sent = send_results(config, sweep_id)
            counts.update({f"dicom:{k}": v for k, v in sent.items()})
        if stop.is_set():
            summary.status = "stopped"
            logger.warning("sweep %s stopped by SIGTERM; run it again to finish", sweep_id)
        summary.ok = counts.get(Status.OK, 0)
        summary.not_assessable = counts.get(Status.NOT_ASSESSABLE, 0)
        summary.skipped = counts.get(Status.SKIPPED, 0)
        summary.failed = counts.get(Status.FAILED, 0)
        summary.flagged = counts.get("flagged", 0)
        summary.processed = summary.ok + summary.not_assessable + summary.skipped + summary.failed
        summary.dicom_written = counts.get("dicom:written", 0)
        summary.dicom_sent = counts.get("dicom:sent", 0)
        summary.dicom_failed = counts.get("dicom:failed", 0)
        summary.errors_by_code = {
            k.removeprefix("code:"): v for k, v in counts.items() if k.startswith("code:")
        }
        summary.duration_s = time.perf_counter() - t0
        summary.studies_per_hour = (
            3600.0 * summary.processed / summary.duration_s if summary.duration_s > 0 else 0.0
        )
        summary.manifest = str(write_manifest(fs, config, summary))
    create_markdown_artifact(
        markdown=summary.markdown(),
        key="pdacscreen-sweep-summary",
        description=f"pdacscreen sweep {sweep_id}",
    )
    logger.info(
        "sweep %s: %d processed (%d flagged, %d not assessable, %d failed, %d skipped) in %.1f s",
        sweep_id,
        summary.processed,
        summary.flagged,
        summary.not_assessable,
        summary.failed,
        summary.skipped,
        summary.duration_s,
    )
    return asdict(summary)
