"""The findings store: per-study results of the nightly sweeps as a Parquet dataset, exactly once.

Layout of ``STORE/`` (a plain folder; any tool that reads Parquet reads it)::

    STORE/
      findings/sweep_date=YYYY-MM-DD/part-<sweep_id>-<seq>.parquet   one row per study and model
      failures/part-<sweep_id>-<seq>.parquet                         one row per failed file/series/study
      evidence/<study folder>/key.png, masks                         written by the sweep
      dicom/<study folder>/seg-<uid>.dcm, sr-<uid>.dcm               DICOM SEG + SR (the sweep)
      dicom_exports/part-<sweep_id>-<seq>.parquet                    one row per SEG/SR write or send
      cache/<study>-<pid>/                                           DICOMweb series being loaded
      index/**/*.parquet                                             the archive index (ingest)
      quarantine/<findings|failures>/...                             unreadable parts moved aside
      sweeps/<sweep_id>.json                                         run manifests (the sweep)
      .lock                                                          held by a running sweep

Guarantees:

* **Atomic appends.** Each :meth:`FindingsStore.append_findings` call writes one Parquet file under a
  temporary name starting with ``.`` in the target folder, fsyncs it, and links it to its final name
  (``os.link``: atomic, never overwrites; ``os.replace`` where hard links are unsupported), then
  fsyncs the folder. Readers (pyarrow, DuckDB's ``*.parquet`` glob, Dask) never see a partial file.
  A temporary file left by a killed writer is removed by the next :meth:`FindingsStore.lock`.
* **Exactly once.** The sweep plans only studies absent from :meth:`processed_studies` for its model
  version and config hash, and appends each batch atomically, so a ``kill -9`` at any moment and a
  rerun leave every study once. :meth:`dedupe_check` counts violations (0 expected).
  Every row counts as processed, whatever its ``status``: to retry failed studies, run with a new
  config hash or delete their files (a later schema version may add retry of transient codes).
* **Disk full.** A write that meets ENOSPC / EDQUOT / EFBIG raises :class:`StoreError` with code
  ``store_full``; its temporary file is removed, so no partial part is ever visible; the sweep
  stops there and a rerun (with space) plans the studies that have no row yet.
* **Damaged parts are quarantined, never skipped.** Before reading, every part's footer is checked
  (readable, columns of the store's schema); a part whose footer or data cannot be read is moved
  to ``STORE/quarantine/`` and recorded as a ``failures`` row (stage ``store``, code
  ``corrupt_store_part``); the studies it held have no row any more, so the next sweep plans
  them again: never counted twice, never lost silently.  A part that cannot be moved (read-only
  store) raises :class:`StoreError`.
* **Ordered sweep ids.** :meth:`new_sweep_id` never returns an id that sorts before one already in
  the store, even when the clock went backwards between two sweeps.
* **Paths as keyed hashes** (``path_key``): real PACS exports name folders after patients, so with
  a key the ``path`` of every ``failures`` row becomes ``path:<24 hex>`` (HMAC-SHA256 of the path
  relative to ``path_root``) and paths under ``path_root`` inside messages are replaced the same way.
* **One writer.** :meth:`lock` takes a non-blocking ``flock`` on ``STORE/.lock``; a second sweep gets
  :class:`StoreLockedError` at once, naming the holder. The OS drops the lock of a dead process.
  (``flock`` is reliable on local disks; on NFS use one sweep host per store.)

Schema version, model version, config hash and sweep id are also in each file's key-value metadata
(``pdacscreen.*`` keys). Column meanings are in :data:`FINDINGS_COLUMNS` (the README table).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pdacscreen.io.errors import (
    ErrorCode,
    FindingsSchemaError,
    Status,
    StoreError,
    StoreLockedError,
)

__all__ = [
    "SCHEMA_VERSION",
    "FINDINGS_SCHEMA",
    "FINDINGS_COLUMNS",
    "FAILURES_SCHEMA",
    "FAILURES_COLUMNS",
    "STATUSES",
    "STAGES",
    "SCOPES",
    "FindingsStore",
    "LockInfo",
    "parquet_files",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = tuple(Status)  # ok, not_assessable, skipped, failed (see io/errors.Status)
STAGES = ("index", "select", "load", "preprocess", "inference", "write", "store")
SCOPES = ("file", "series", "study")
_STR, _F64 = pa.string(), pa.float64()

#: name -> (Arrow type, nullable, meaning). The README's column table is generated from this.
FINDINGS_COLUMNS: dict[str, tuple[pa.DataType, bool, str]] = {
    "study_instance_uid": (
        _STR,
        False,
        "DICOM StudyInstanceUID (derived from the files when blank)",
    ),
    "series_instance_uid": (
        _STR,
        True,
        "the series analysed (chosen by the series selection rule)",
    ),
    "patient_key": (_STR, True, "pseudonymous keyed hash (HMAC-SHA256) of PatientID; never the ID"),
    "accession_key": (_STR, True, "pseudonymous keyed hash of AccessionNumber (same key)"),
    "study_date": (pa.date32(), True, "DICOM StudyDate (null when absent or invalid)"),
    "manufacturer": (_STR, True, "DICOM Manufacturer of the analysed series (vendor)"),
    "slice_thickness_mm": (_F64, True, "DICOM SliceThickness of the analysed series, mm"),
    "model_name": (_STR, True, "name of the model package that produced the row"),
    "model_version": (_STR, False, "version of the model package"),
    "config_hash": (
        _STR,
        False,
        "hash of the resolved sweep configuration: model sha256, selection rules, engine config",
    ),
    "engine_backend": (
        _STR,
        True,
        "what ran the model: runtime-device-precision, e.g. onnxruntime-cpu-fp32, tensorrt-cuda-fp16",
    ),
    "pdac_probability": (_F64, True, "case score in [0, 1]: probability of PDAC (null unless ok)"),
    "pdac_flag": (pa.bool_(), True, "pdac_probability >= operating_threshold"),
    "operating_threshold": (_F64, True, "the model's operating threshold used for pdac_flag"),
    "lesion_count": (pa.int32(), True, "number of lesion candidates reported (0 when none)"),
    "lesion_diameter_mm": (_F64, True, "largest diameter of the top-scoring lesion candidate, mm"),
    "lesion_volume_ml": (_F64, True, "volume of the top-scoring lesion candidate, ml"),
    "lesion_center_x_mm": (_F64, True, "centre of the top lesion candidate, patient LPS x, mm"),
    "lesion_center_y_mm": (_F64, True, "centre of the top lesion candidate, patient LPS y, mm"),
    "lesion_center_z_mm": (_F64, True, "centre of the top lesion candidate, patient LPS z, mm"),
    "lesion_location": (
        _STR,
        True,
        "pancreas part of the top lesion candidate: head, body or tail",
    ),
    "pancreas_volume_ml": (_F64, True, "segmented pancreas volume, ml"),
    "phase_estimate": (_STR, True, "estimated contrast phase (non_contrast, arterial, ...)"),
    "qc_flags": (
        pa.list_(_STR),
        True,
        "quality notes (gantry_tilt, uneven_spacing, ...); [] if none",
    ),
    "status": (
        _STR,
        False,
        "ok (assessed, has a probability), not_assessable (read but not assessed: no pancreas "
        "found ...), skipped (not sent to the engine: no eligible series, contrast) or failed",
    ),
    "error_code": (
        _STR,
        True,
        "stable error code when not ok: why it was not assessed, skipped or failed (io/errors.py)",
    ),
    "evidence_path": (_STR, True, "evidence folder (key.png, masks), relative to STORE"),
    "sweep_id": (_STR, False, "the sweep run that wrote the row"),
    "processed_at": (pa.timestamp("us", tz="UTC"), False, "when the study was processed (UTC)"),
    "duration_s": (_F64, True, "wall time spent on the study, seconds"),
    # Body composition at L3 (kernels/bodycomp.py; null when not measured, see bodycomp_qc).
    "l3_slice_z_mm": (_F64, True, "LPS z of the slice measured at the L3 vertebral body, mm"),
    "skeletal_muscle_area_cm2": (
        _F64,
        True,
        "skeletal muscle area at L3 (-29..150 HU: wall, psoas, paraspinal), cm2",
    ),
    "visceral_fat_area_cm2": (_F64, True, "visceral fat area at L3 (-190..-30 HU), cm2"),
    "subcutaneous_fat_area_cm2": (_F64, True, "subcutaneous fat area at L3 (-190..-30 HU), cm2"),
    "muscle_mean_hu": (_F64, True, "mean HU of the L3 muscle mask (myosteatosis: lower: fattier)"),
    "skeletal_muscle_index_cm2_m2": (
        _F64,
        True,
        "L3 muscle area / height^2 (cm2/m2) when PatientSize is present; the height is not stored",
    ),
    "bodycomp_qc": (
        _STR,
        True,
        "why body composition is missing or doubtful (level_not_found, body_cut_by_fov, ...)",
    ),
}
FAILURES_COLUMNS: dict[str, tuple[pa.DataType, bool, str]] = {
    "sweep_id": (_STR, False, "the sweep run that met the failure"),
    "stage": (_STR, False, "index, select, load, preprocess, inference, write or store"),
    "scope": (_STR, False, "file, series or study"),
    "study_instance_uid": (_STR, True, "study concerned (null when unknown)"),
    "series_instance_uid": (_STR, True, "series concerned (null when unknown)"),
    "path": (_STR, True, "file or folder concerned, relative to the archive root"),
    "error_code": (_STR, False, "stable error code (see io/errors.py)"),
    "message": (_STR, True, "human-readable message (never patient identifiers)"),
    "occurred_at": (pa.timestamp("us", tz="UTC"), False, "when it happened (UTC)"),
}


def _schema(columns: Mapping[str, tuple[pa.DataType, bool, str]]) -> pa.Schema:
    return pa.schema(
        [
            pa.field(n, t, nullable=nl, metadata={"description": d})
            for n, (t, nl, d) in columns.items()
        ]
    )


FINDINGS_SCHEMA = _schema(FINDINGS_COLUMNS)
FAILURES_SCHEMA = _schema(FAILURES_COLUMNS)
#: The partition column readers add to FINDINGS_SCHEMA (from the folder name).
PARTITION_FIELD = pa.field("sweep_date", pa.date32())
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_META = "pdacscreen."
_TMP_COUNTER = itertools.count()
_STAMP_RE = re.compile(r"(\d{8}T\d{6}Z)")
_STAMP = "%Y%m%dT%H%M%SZ"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
STORE_CHECK_SWEEP = "store-check"


@dataclass(frozen=True)
class LockInfo:
    """Who holds the store's lock: process id, sweep id, start time (UTC ISO 8601), host."""

    pid: int
    sweep_id: str
    started_at: str
    host: str


class FindingsStore:
    """A findings store rooted at ``root`` (created on first write).

    Args:
        root: the store folder ``STORE``.
        path_key: hash the paths of ``failures`` rows with this key (see the module docstring);
            ``None`` keeps them as given.
        path_root: paths are hashed relative to this folder (the archive root) when under it.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        path_key: bytes | None = None,
        path_root: Path | str | None = None,
    ) -> None:
        self.root = Path(root)
        self._path_key = bytes(path_key) if path_key else None
        self._path_root = str(Path(path_root).absolute()) if path_root else None
        self._checked: set[tuple[str, int, int]] = set()

    @property
    def findings_dir(self) -> Path:
        return self.root / "findings"

    @property
    def failures_dir(self) -> Path:
        return self.root / "failures"

    @property
    def evidence_dir(self) -> Path:
        return self.root / "evidence"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def quarantine_dir(self) -> Path:
        return self.root / "quarantine"

    # ------------------------------------------------------------------ identities
    def path_token(self, path: object) -> str | None:
        """What a row stores for ``path``: the path itself, or ``path:<hash>`` with a path key."""
        if path is None or path != path or path == "":  # None / NaN / empty
            return None
        text = str(path)
        if self._path_key is None or text.startswith("path:"):
            return text
        if self._path_root and (text == self._path_root or text.startswith(self._path_root + "/")):
            text = os.path.relpath(text, self._path_root)
        digest = hmac.new(self._path_key, text.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "path:" + digest.hexdigest()[:24]

    def scrub_message(self, message: object) -> str | None:
        """``message`` with every path under ``path_root`` replaced by its token (path key only)."""
        if message is None or message != message:
            return None
        text = str(message)
        if self._path_key is None or not self._path_root:
            return text
        pattern = re.escape(self._path_root) + r"(?:/[^\s'\"]*)?"
        return re.sub(pattern, lambda m: self.path_token(m.group(0).rstrip(".,:;)]")) or "", text)

    def new_sweep_id(self, *, now: dt.datetime | None = None, host: str | None = None) -> str:
        """``<UTC stamp>-<host>-<pid>``, later than every sweep id already in the store.

        When the clock went backwards (the newest id in ``sweeps/``, ``findings/`` or ``failures/``
        is later than now), the stamp is that id's plus one second, so ids and part names stay
        unique and in order.
        """
        now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(microsecond=0)
        last = self._last_stamp()
        if last is not None and now <= last:
            log.warning("clock is behind the store's last sweep (%s): sweep id follows it", last)
            now = last + dt.timedelta(seconds=1)
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", host or socket.gethostname())[:12] or "host"
        return f"{now:{_STAMP}}-{host}-{os.getpid()}"

    def _last_stamp(self) -> dt.datetime | None:
        names = [p.name for p in (self.root / "sweeps").glob("*.json")]
        for folder in (self.findings_dir, self.failures_dir):
            if folder.is_dir():
                names += [p.name for p in folder.rglob("part-*.parquet")]
        stamps = [m.group(1) for n in names if (m := _STAMP_RE.search(n))]
        if not stamps:
            return None
        return dt.datetime.strptime(max(stamps), _STAMP).replace(tzinfo=dt.UTC)

    def __repr__(self) -> str:
        return f"FindingsStore({str(self.root)!r})"

    # ------------------------------------------------------------------ writing
    def append_findings(
        self,
        rows: Sequence[Mapping[str, object]],
        *,
        sweep_id: str,
        sweep_date: dt.date,
        model_version: str,
        config_hash: str,
        extra_metadata: Mapping[str, str] | None = None,
    ) -> Path | None:
        """Validate ``rows`` and write them atomically as one file in ``sweep_date``'s partition.

        ``sweep_id``, ``model_version`` and ``config_hash`` fill the rows' columns (a row that gives a
        different value is an error); a missing ``processed_at`` becomes now (UTC), a missing
        ``qc_flags`` ``[]``, any other missing optional column null. ``study_date`` accepts a date,
        ``YYYY-MM-DD`` or DICOM ``YYYYMMDD``. ``extra_metadata`` (e.g. ``model_sha256``,
        ``selection_rule``, ``preprocessing``, ``threshold_source``) is stored in the file's
        key-value metadata under ``pdacscreen.<key>``; the evaluation report shows it.

        Returns:
            The file written, or ``None`` when ``rows`` is empty.

        Raises:
            FindingsSchemaError: unknown column, missing required value, bad type or value,
                or one study twice in the call.
        """
        if not rows:
            _check_id("sweep_id", sweep_id)
            return None
        fixed = {"sweep_id": sweep_id, "model_version": model_version, "config_hash": config_hash}
        table = _rows_to_table(rows, FINDINGS_COLUMNS, fixed=fixed, kind="findings")
        return self.append_findings_table(
            table,
            sweep_id=sweep_id,
            sweep_date=sweep_date,
            model_version=model_version,
            config_hash=config_hash,
            extra_metadata=extra_metadata,
        )

    def append_findings_table(
        self,
        table: pa.Table,
        *,
        sweep_id: str,
        sweep_date: dt.date,
        model_version: str,
        config_hash: str,
        extra_metadata: Mapping[str, str] | None = None,
    ) -> Path | None:
        """Like :meth:`append_findings` for an Arrow table (columns a subset of the schema).

        Missing columns become null (``qc_flags`` ``[]``); ``sweep_id``, ``model_version`` and
        ``config_hash`` are filled in; a missing ``processed_at`` becomes now (UTC). Checks are
        vectorised, so this is the fast path for large batches.
        """
        _check_id("sweep_id", sweep_id)
        _check_id("model_version", model_version)
        _check_id("config_hash", config_hash)
        if not isinstance(sweep_date, dt.date) or isinstance(sweep_date, dt.datetime):
            raise FindingsSchemaError(f"sweep_date must be a datetime.date, got {sweep_date!r}")
        if table.num_rows == 0:
            return None
        fixed = {"sweep_id": sweep_id, "model_version": model_version, "config_hash": config_hash}
        table = _conform(table, FINDINGS_COLUMNS, fixed=fixed, kind="findings")
        _check_findings(table)
        meta = {str(k): str(v) for k, v in (extra_metadata or {}).items()}
        meta.update(model_version=model_version, config_hash=config_hash, sweep_id=sweep_id)
        folder = self.findings_dir / f"sweep_date={sweep_date.isoformat()}"
        return _write_atomic(table, folder, prefix=f"part-{sweep_id}", metadata=meta)

    def append_failures(
        self, rows: Sequence[Mapping[str, object]], *, sweep_id: str
    ) -> Path | None:
        """Write failure rows (see :data:`FAILURES_COLUMNS`) atomically as one file.

        A missing ``occurred_at`` becomes now (UTC). Returns the file, or ``None`` for no rows.
        """
        _check_id("sweep_id", sweep_id)
        if not rows:
            return None
        fixed = {"sweep_id": sweep_id}
        if self._path_key is not None:
            rows = [
                {
                    **r,
                    "path": self.path_token(r.get("path")),
                    "message": self.scrub_message(r.get("message")),
                }
                for r in rows
            ]
        table = _rows_to_table(rows, FAILURES_COLUMNS, fixed=fixed, kind="failures")
        table = _conform(table, FAILURES_COLUMNS, fixed=fixed, kind="failures")
        for name, allowed in (("stage", STAGES), ("scope", SCOPES)):
            _check_allowed(table, name, allowed)
        return _write_atomic(
            table, self.failures_dir, prefix=f"part-{sweep_id}", metadata={"sweep_id": sweep_id}
        )

    # ------------------------------------------------------------------ reading
    def findings_dataset(self) -> ds.Dataset | None:
        """The findings as a pyarrow dataset (schema: FINDINGS_SCHEMA + ``sweep_date``), or None.

        Parts whose footer is unreadable or not of the schema are quarantined first.
        """
        files = self._usable(self._findings_files(), FINDINGS_SCHEMA)
        if not files:
            return None
        partitioning = ds.partitioning(pa.schema([PARTITION_FIELD]), flavor="hive")
        return ds.dataset(
            [str(f) for f in files],
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=str(self.findings_dir),
            schema=FINDINGS_SCHEMA.append(PARTITION_FIELD),
        )

    def read_findings_table(self, columns: Sequence[str] | None = None, filter=None) -> pa.Table:
        """Findings as an Arrow table (optionally only ``columns`` / rows matching ``filter``)."""
        for attempt in (1, 2):
            data = self.findings_dataset()
            if data is None:
                empty = FINDINGS_SCHEMA.append(PARTITION_FIELD).empty_table()
                return empty.select(list(columns)) if columns else empty
            try:
                return data.to_table(columns=list(columns) if columns else None, filter=filter)
            except (pa.ArrowException, OSError) as e:  # damaged data pages behind a good footer
                if attempt == 2 or not self._deep_check(self._findings_files(), FINDINGS_SCHEMA):
                    raise StoreError(f"findings in {self.findings_dir} cannot be read: {e}") from e
        raise AssertionError("unreachable")

    def read_findings(self):
        """All findings as a pandas DataFrame (with the ``sweep_date`` partition column)."""
        return self.read_findings_table().to_pandas()

    def read_failures(self):
        """All failure rows as a pandas DataFrame (empty with the columns when none)."""
        for attempt in (1, 2):
            files = self._usable(parquet_files(self.failures_dir, "*.parquet"), FAILURES_SCHEMA)
            # a quarantine on the way wrote a failures part of its own: list again
            files = self._usable(parquet_files(self.failures_dir, "*.parquet"), FAILURES_SCHEMA)
            if not files:
                return FAILURES_SCHEMA.empty_table().to_pandas()
            try:
                data = ds.dataset([str(f) for f in files], schema=FAILURES_SCHEMA)
                return data.to_table().to_pandas()
            except (pa.ArrowException, OSError) as e:
                if attempt == 2 or not self._deep_check(files, FAILURES_SCHEMA):
                    raise StoreError(f"failures in {self.failures_dir} cannot be read: {e}") from e
        raise AssertionError("unreachable")

    def processed_studies(self, *, model_version: str, config_hash: str) -> set[str]:
        """Study UIDs that already have a row (any status) for this model version and config hash."""
        flt = (ds.field("model_version") == model_version) & (
            ds.field("config_hash") == config_hash
        )
        table = self.read_findings_table(["study_instance_uid"], filter=flt)
        return set(table.column("study_instance_uid").to_pylist())

    def dedupe_check(self) -> int:
        """Number of surplus rows for the same (study, model_version, config_hash); 0 expected."""
        keys = ["study_instance_uid", "model_version", "config_hash"]
        table = self.read_findings_table(keys)
        if table.num_rows == 0:
            return 0
        counts = table.group_by(keys).aggregate([("study_instance_uid", "count")])
        return int(table.num_rows - counts.num_rows)

    def metadata(self) -> dict[str, list[str]]:
        """Distinct ``pdacscreen.*`` key-value metadata across findings files: key -> values."""
        out: dict[str, set[str]] = {}
        for f in self._usable(self._findings_files(), FINDINGS_SCHEMA):
            kv = pq.read_schema(f).metadata or {}
            for k, v in kv.items():
                key = k.decode()
                if key.startswith(_META):
                    out.setdefault(key[len(_META) :], set()).add(v.decode())
        return {k: sorted(v) for k, v in sorted(out.items())}

    # ------------------------------------------------------------------ damaged parts
    def _findings_files(self) -> list[Path]:
        return parquet_files(self.findings_dir, "sweep_date=*/*.parquet")

    def _usable(self, files: list[Path], schema: pa.Schema) -> list[Path]:
        """``files`` less those whose footer is damaged or foreign (quarantined on the way)."""
        out = []
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:  # moved away meanwhile (another reader's quarantine)
                continue
            ident = (str(f), st.st_size, st.st_mtime_ns)
            if ident in self._checked:
                out.append(f)
                continue
            problem = _footer_problem(f, schema)
            if problem is None:
                self._checked.add(ident)
                out.append(f)
            else:
                self._quarantine(f, problem)
        return out

    def _deep_check(self, files: list[Path], schema: pa.Schema) -> bool:
        """Read every part in full; quarantine those that fail. True if one was quarantined."""
        moved = False
        for f in files:
            try:
                pq.read_table(f, schema=schema)
            except FileNotFoundError:
                continue
            except (pa.ArrowException, OSError) as e:
                self._checked.discard((str(f),) + _size_mtime(f))
                self._quarantine(f, f"data cannot be read: {e}")
                moved = True
        return moved

    def _quarantine(self, f: Path, problem: str) -> None:
        """Move a damaged part to ``STORE/quarantine/`` and record a ``failures`` row."""
        rel = f.relative_to(self.root)
        dest = self.quarantine_dir / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = dest.with_name(
                    f"{dest.stem}.{os.getpid()}-{next(_TMP_COUNTER)}{dest.suffix}"
                )
            os.replace(f, dest)
        except FileNotFoundError:
            return  # another reader moved it first (and recorded it)
        except OSError as e:
            raise StoreError(
                f"{f} is damaged ({problem}) and cannot be moved to {self.quarantine_dir}: {e}; "
                "move or delete it, then read again"
            ) from e
        log.error("quarantined damaged store part %s -> %s: %s", rel, dest, problem[:500])
        self.append_failures(
            [
                {
                    "stage": "store",
                    "scope": "file",
                    "path": rel.as_posix(),
                    "error_code": str(ErrorCode.CORRUPT_STORE_PART),
                    "message": f"moved to {dest.relative_to(self.root).as_posix()}: {problem}"[
                        :2000
                    ],
                }
            ],
            sweep_id=STORE_CHECK_SWEEP,
        )

    # ------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self, *, sweep_id: str) -> Iterator[LockInfo]:
        """Hold the store's single-writer lock for a sweep; fail at once if another process has it.

        Raises:
            StoreLockedError: a live process holds the lock (its pid, sweep and start time named).
        """
        _check_id("sweep_id", sweep_id)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreLockedError(_locked_message(self.root, os.pread(fd, 4096, 0))) from None
            info = LockInfo(
                pid=os.getpid(),
                sweep_id=sweep_id,
                started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                host=socket.gethostname(),
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info.__dict__).encode(), 0)
            os.fsync(fd)
            self._remove_temp_files()
            try:
                yield info
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def _remove_temp_files(self) -> None:
        """Remove what killed writers left (only called with the lock held): temporary parts in
        ``findings/``, ``failures/`` and ``dicom_exports/``, and ``cache/`` (DICOMweb series
        retrieved for a study that a killed sweep never finished; only a sweep holding this
        lock uses it)."""
        removed = 0
        for folder in (self.findings_dir, self.failures_dir, self.root / "dicom_exports"):
            for f in folder.rglob(".*.tmp-*") if folder.is_dir() else ():
                f.unlink(missing_ok=True)
                removed += 1
        cache = self.root / "cache"
        if cache.is_dir():
            for d in list(cache.iterdir()):
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted writer", removed)


# ---------------------------------------------------------------------- helpers
def parquet_files(folder: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` under ``folder``, sorted, skipping any path part that starts
    with ``.`` or ``_`` (writers' temporary files, as pyarrow and Dask skip them)."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.is_file() and not any(part[0] in "._" for part in p.relative_to(folder).parts)
    )


def _size_mtime(f: Path) -> tuple[int, int]:
    try:
        st = f.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _footer_problem(f: Path, schema: pa.Schema) -> str | None:
    """Why part ``f`` is unusable (footer unreadable, a column not of ``schema``), or None."""
    try:
        got = pq.read_schema(f)
    except (pa.ArrowException, OSError) as e:
        return f"footer cannot be read: {e}"
    for field in got:
        if field.name not in schema.names:
            return f"column {field.name!r} is not a store column"
        want = schema.field(field.name).type
        if not field.type.equals(want):
            return f"column {field.name!r} is {field.type}, not {want}"
    return None


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise FindingsSchemaError(
            f"{name} must be 1-128 characters of letters, digits, '_', '.', ':' or '-' "
            f"starting with a letter or digit, got {value!r}"
        )


def _locked_message(root: Path, raw: bytes) -> str:
    try:
        h = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        h = {}
    who = (
        f"pid {h.get('pid', '?')} on {h.get('host', '?')} (sweep {h.get('sweep_id', '?')}, "
        f"started {h.get('started_at', '?')})"
    )
    return (
        f"findings store {root} is locked by {who}: another sweep is writing to it. "
        "Wait for it to finish or stop that process; a dead process's lock is released by the OS."
    )


def _coerce_date(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        for fmt in ("%Y-%m-%d", "%Y%m%d"):
            with contextlib.suppress(ValueError):
                return dt.datetime.strptime(text, fmt).date()
        raise ValueError(f"not a date (YYYY-MM-DD or YYYYMMDD): {value!r}")
    if isinstance(value, dt.datetime):
        return value.date()
    return value


def _rows_to_table(
    rows: Sequence[Mapping[str, object]],
    columns: Mapping[str, tuple[pa.DataType, bool, str]],
    *,
    fixed: Mapping[str, str],
    kind: str,
) -> pa.Table:
    """Dict rows -> Arrow, column by column, so that an error names the column and the value."""
    present: list[str] = []
    for i, row in enumerate(rows):
        unknown = set(row) - set(columns)
        if unknown:
            raise FindingsSchemaError(
                f"{kind} row {i}: unknown column(s) {sorted(unknown)}; allowed: {list(columns)}"
            )
        for name, value in fixed.items():
            if row.get(name) not in (None, value):
                raise FindingsSchemaError(
                    f"{kind} row {i}: {name}={row[name]!r} differs from the call's {name}={value!r}"
                )
        present.extend(n for n in row if n not in present and n not in fixed)
    arrays = {}
    for name in present:
        typ = columns[name][0]
        values = [row.get(name) for row in rows]
        try:
            if typ == pa.date32():
                values = [_coerce_date(v) for v in values]
            arrays[name] = pa.array(values, type=typ)
        except (pa.ArrowException, ValueError, TypeError) as e:
            bad = next((v for v in values if v is not None), None)
            raise FindingsSchemaError(
                f"{kind} column {name!r} must be {typ} (e.g. {bad!r} in the rows): {e}"
            ) from e
    return pa.table(arrays) if arrays else pa.table({"_n": pa.nulls(len(rows))}).drop(["_n"])


def _conform(
    table: pa.Table,
    columns: Mapping[str, tuple[pa.DataType, bool, str]],
    *,
    fixed: Mapping[str, str],
    kind: str,
) -> pa.Table:
    """Cast ``table`` to the schema of ``columns``: fill fixed values, defaults and nulls."""
    unknown = set(table.column_names) - set(columns)
    if unknown:
        raise FindingsSchemaError(
            f"{kind}: unknown column(s) {sorted(unknown)}; allowed: {list(columns)}"
        )
    n = table.num_rows
    arrays = []
    for name, (typ, nullable, _) in columns.items():
        if name in fixed:
            if name in table.column_names:
                col = table.column(name).drop_null()
                other = set(pc.unique(col).to_pylist()) - {fixed[name]}
                if other:
                    raise FindingsSchemaError(
                        f"{kind}: {name} values {sorted(other)} differ from the call's "
                        f"{name}={fixed[name]!r}"
                    )
            arr = pa.repeat(pa.scalar(fixed[name], typ), n)
        elif name in table.column_names:
            try:
                arr = table.column(name).cast(typ)
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise FindingsSchemaError(
                    f"{kind} column {name!r} must be {typ}, got {table.schema.field(name).type}: {e}"
                ) from e
        else:
            arr = pa.nulls(n, typ)
        if name in ("processed_at", "occurred_at"):
            arr = pc.fill_null(arr, pa.scalar(dt.datetime.now(dt.UTC), typ))
        elif name == "qc_flags":
            arr = pc.fill_null(arr, pa.scalar([], typ))
        if not nullable and arr.null_count:
            i = arr.is_null().to_pylist().index(True) if n < 1_000_000 else "?"
            raise FindingsSchemaError(f"{kind} row {i}: column {name!r} is required, got None")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=_schema(columns))


def _check_allowed(table: pa.Table, name: str, allowed: Sequence[str]) -> None:
    values = set(pc.unique(table.column(name).drop_null()).to_pylist())
    bad = sorted(values - set(allowed))
    if bad:
        raise FindingsSchemaError(f"column {name!r} has value(s) {bad}; allowed: {list(allowed)}")


def _first(mask: pa.ChunkedArray) -> int | None:
    """Index of the first true value of a boolean array, or None."""
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


def _check_findings(table: pa.Table) -> None:
    """Vectorised value checks of a conformed findings table."""
    _check_allowed(table, "status", STATUSES)
    uids = table.column("study_instance_uid")
    if pc.count_distinct(uids).as_py() != table.num_rows:
        counts = pc.value_counts(uids)
        dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))[0].as_py()
        raise FindingsSchemaError(
            f"study_instance_uid {dup!r} appears more than once in one append"
        )
    p = table.column("pdac_probability")
    out = pc.fill_null(pc.or_(pc.less(p, 0.0), pc.greater(p, 1.0)), False)
    if (i := _first(out)) is not None:
        raise FindingsSchemaError(
            f"findings row {i}: pdac_probability must be in [0, 1], got {p[i]}"
        )
    ok = pc.equal(table.column("status"), "ok")
    no_score = pc.or_(pc.is_null(p), pc.is_null(table.column("pdac_flag")))
    if (i := _first(pc.and_(ok, no_score))) is not None:
        raise FindingsSchemaError(
            f"findings row {i}: status 'ok' needs pdac_probability and pdac_flag, got "
            f"{p[i].as_py()!r} and {table.column('pdac_flag')[i].as_py()!r}"
        )
    code = table.column("error_code")
    no_code = pc.or_(pc.is_null(code), pc.fill_null(pc.equal(code, ""), False))
    if (i := _first(pc.and_(pc.invert(ok), no_code))) is not None:
        raise FindingsSchemaError(
            f"findings row {i}: status {table.column('status')[i].as_py()!r} needs an error_code"
        )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: memoryview) -> None:
    """Write ``data`` to a new file ``path`` with ``os.write`` (partial writes continued), fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(
    table: pa.Table, folder: Path, *, prefix: str, metadata: Mapping[str, str]
) -> Path:
    """Write ``table`` to ``folder/<prefix>-<seq>.parquet`` atomically; never overwrite a file."""
    folder.mkdir(parents=True, exist_ok=True)
    kv = {f"{_META}{k}": v for k, v in metadata.items()}
    kv[f"{_META}schema_version"] = str(SCHEMA_VERSION)  # reserved keys are never overridden
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **kv})
    # Unique per process, thread and call; hidden ('.') so no reader lists it.
    unique = f"{os.getpid()}-{threading.get_native_id()}-{next(_TMP_COUNTER)}"
    tmp = folder / f".{prefix}.parquet.tmp-{unique}"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = memoryview(sink.getvalue())
    try:
        _write_file(tmp, data)
        seq = len(list(folder.glob(f"{prefix}-*.parquet")))
        while True:
            seq += 1
            final = folder / f"{prefix}-{seq:05d}.parquet"
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                continue
            except OSError as e:  # filesystems without hard links
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if final.exists():
                    continue
                os.replace(tmp, final)
                break
    except OSError as e:
        if e.errno in _FULL:
            raise StoreError(
                f"the store's disk is full: could not write {folder}/{prefix}-*.parquet ({e}); "
                "nothing partial was kept. Free space, then run the sweep again: it resumes with "
                "the studies that have no row yet",
                code=ErrorCode.STORE_FULL,
            ) from e
        raise StoreError(f"could not write {folder}/{prefix}-*.parquet: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    log.debug("wrote %s (%d rows)", final, table.num_rows)
    return final
