"""The findings store: per-study results of the nightly sweeps as a Parquet dataset, exactly once.

Layout of ``STORE/`` (a plain folder; any tool that reads Parquet reads it)::

    STORE/
      findings/sweep_date=YYYY-MM-DD/part-<sweep_id>-<seq>.parquet   one row per study and model
      failures/part-<sweep_id>-<seq>.parquet                         one row per failed file/series/study
      evidence/<study folder>/key.png, masks                         written by the sweep
      index/**/*.parquet                                             the archive index (ingest)
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
import itertools
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pdacscreen.io.errors import FindingsSchemaError, Status, StoreError, StoreLockedError

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
STAGES = ("index", "select", "load", "preprocess", "inference", "write")
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
}
FAILURES_COLUMNS: dict[str, tuple[pa.DataType, bool, str]] = {
    "sweep_id": (_STR, False, "the sweep run that met the failure"),
    "stage": (_STR, False, "index, select, load, preprocess, inference or write"),
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
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

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
        table = _rows_to_table(rows, FAILURES_COLUMNS, fixed=fixed, kind="failures")
        table = _conform(table, FAILURES_COLUMNS, fixed=fixed, kind="failures")
        for name, allowed in (("stage", STAGES), ("scope", SCOPES)):
            _check_allowed(table, name, allowed)
        return _write_atomic(
            table, self.failures_dir, prefix=f"part-{sweep_id}", metadata={"sweep_id": sweep_id}
        )

    # ------------------------------------------------------------------ reading
    def findings_dataset(self) -> ds.Dataset | None:
        """The findings as a pyarrow dataset (schema: FINDINGS_SCHEMA + ``sweep_date``), or None."""
        files = parquet_files(self.findings_dir, "sweep_date=*/*.parquet")
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
        data = self.findings_dataset()
        if data is None:
            empty = FINDINGS_SCHEMA.append(PARTITION_FIELD).empty_table()
            return empty.select(list(columns)) if columns else empty
        return data.to_table(columns=list(columns) if columns else None, filter=filter)

    def read_findings(self):
        """All findings as a pandas DataFrame (with the ``sweep_date`` partition column)."""
        return self.read_findings_table().to_pandas()

    def read_failures(self):
        """All failure rows as a pandas DataFrame (empty with the columns when none)."""
        files = parquet_files(self.failures_dir, "*.parquet")
        if not files:
            return FAILURES_SCHEMA.empty_table().to_pandas()
        return ds.dataset([str(f) for f in files], schema=FAILURES_SCHEMA).to_table().to_pandas()

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
        for f in parquet_files(self.findings_dir, "sweep_date=*/*.parquet"):
            kv = pq.read_schema(f).metadata or {}
            for k, v in kv.items():
                key = k.decode()
                if key.startswith(_META):
                    out.setdefault(key[len(_META) :], set()).add(v.decode())
        return {k: sorted(v) for k, v in sorted(out.items())}

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
        """Remove temp files of killed writers (only called with the lock held)."""
        removed = 0
        for folder in (self.findings_dir, self.failures_dir):
            for f in folder.rglob(".*.tmp-*") if folder.is_dir() else ():
                f.unlink(missing_ok=True)
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
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
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
        raise StoreError(f"could not write {folder}/{prefix}-*.parquet: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    log.debug("wrote %s (%d rows)", final, table.num_rows)
    return final
