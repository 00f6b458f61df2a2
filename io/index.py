"""Archive index: crawl a folder tree with header-only reads into an incremental Parquet dataset.

Layout of an index folder ``DIR``::

    DIR/index.json                 format version, pseudonym key fingerprint, archive root
    DIR/parts/part-00000001.parquet   rows written by run 1 (new and changed files, removals)
    DIR/parts/part-00000002.parquet   ...

Each run appends one part holding a row for every file that is new or changed since the last run
(identity: path, size, mtime in ns) and a tombstone row (``present = False``) for every file that
disappeared.  :func:`read_index` merges the parts (the latest row per path wins) and by default
returns only present files; :func:`read_removed` lists the files that disappeared.  A run therefore
reads and writes in proportion to the number of changes; only the directory walk (``stat``) touches
every file.  Parts are compacted into one when there are more than :data:`COMPACT_AFTER`.

Rows follow :data:`pdacscreen.io.dicom.read.INDEX_COLUMNS` plus ``present``, ``run_id`` and
``indexed_at``.  ``patient_key`` is a keyed hash of PatientID (:mod:`pdacscreen.io.pseudonym`);
the ID itself is never stored.

Free text is stored scrubbed, never verbatim: ``series_description``, ``study_description``,
``protocol_name`` and ``contrast_bolus_agent`` keep only the tokens of an imaging vocabulary,
numbers of at most 4 digits and short letter-digit codes (kernels, thicknesses); every other word
(a name, an ID, a date) is replaced by ``x`` (:func:`pdacscreen.io.dicom.scrub.scrub_text`).  The
separators are kept, so the selection rules match the scrubbed text as they matched the original
(tested on the phantom archives).  A name that is itself an imaging word survives; initials too.

``path`` is valid UTF-8 text: a file name whose bytes are not UTF-8 is stored with those bytes
written ``%XX`` and a literal ``%`` written ``%25`` (:func:`pdacscreen.io.dicom.read.index_path`);
every reader of a file turns it back with :func:`pdacscreen.io.dicom.read.fs_path`.  Bad files are rows with ``status == "error"`` and an
``error_code``; the crawl never stops for them.  Header reads run in Dask worker processes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from pdacscreen.io.dicom.read import (
    FREE_TEXT_COLUMNS,
    INDEX_COLUMNS,
    drop_worker_pool,
    header_row,
    index_path,
    worker_pool,
)
from pdacscreen.io.errors import InputError, PseudonymKeyError
from pdacscreen.io.pseudonym import check_key, key_fingerprint

__all__ = [
    "FREE_TEXT_COLUMNS",
    "INDEX_SCHEMA",
    "IndexUpdate",
    "read_index",
    "read_removed",
    "update_index",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPACT_AFTER = 16
_IN_PROCESS_BELOW = 1500  # fewer files than this are read in-process (a pool costs more)
_CHUNK = 256  # files per Dask task

_STR, _I64, _F64 = pa.string(), pa.int64(), pa.float64()
_TYPES = {
    "size": _I64,
    "mtime_ns": _I64,
    "series_number": _I64,
    "acquisition_number": _I64,
    "instance_number": _I64,
    "rows": _I64,
    "columns": _I64,
    "number_of_frames": _I64,
    "samples_per_pixel": _I64,
    "slice_thickness": _F64,
    "gantry_detector_tilt": _F64,
    "image_position_patient": pa.list_(_F64),
    "image_orientation_patient": pa.list_(_F64),
    "pixel_spacing": pa.list_(_F64),
    "has_pixel_data": pa.bool_(),
}
#: Arrow schema of every part file.
INDEX_SCHEMA = pa.schema(
    [pa.field(c, _TYPES.get(c, _STR)) for c in INDEX_COLUMNS]
    + [
        pa.field("present", pa.bool_()),
        pa.field("run_id", _I64),
        pa.field("indexed_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class IndexUpdate:
    """What one :func:`update_index` run did. ``read`` = files whose header was read."""

    run_id: int
    new: int
    changed: int
    removed: int
    unchanged: int
    bad: int
    read: int
    total_present: int
    duration_s: float


def _walk(root: Path, *, skip: Path | None) -> Iterator[tuple[str, int, int]]:
    """(path, size, mtime_ns) for every regular file under root, any depth, symlinks not followed."""
    stack = [str(root)]
    skip_s = str(skip) if skip is not None else None
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            log.warning("cannot list %s: %s", d, e)
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if e.path != skip_s:
                        stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    yield e.path, int(st.st_size), int(st.st_mtime_ns)
            except OSError as err:
                log.warning("cannot stat %s: %s", e.path, err)


def _read_chunk(paths: list[str], key: bytes) -> list[dict]:
    return [header_row(p, key=key) for p in paths]


def _read_headers(paths: list[str], *, key: bytes, workers: int) -> list[dict]:
    """Header rows for ``paths``: in this process for small batches (starting workers costs
    more than it saves below :data:`_IN_PROCESS_BELOW` files), else a Dask graph of chunks run
    by the ``processes`` scheduler on a persistent pool of ``workers`` processes."""
    if workers <= 1 or len(paths) < _IN_PROCESS_BELOW:
        return _read_chunk(paths, key)
    import dask

    size = min(_CHUNK, math.ceil(len(paths) / (workers * 4)))
    tasks = [
        dask.delayed(_read_chunk)(paths[i : i + size], key) for i in range(0, len(paths), size)
    ]
    try:
        results = dask.compute(
            *tasks, scheduler="processes", num_workers=workers, pool=worker_pool(workers)
        )
    except (OSError, BrokenProcessPool) as e:  # e.g. no child processes allowed here
        log.warning("index worker pool unavailable (%s); reading headers in this process", e)
        drop_worker_pool(workers)
        return _read_chunk(paths, key)
    return [row for chunk in results for row in chunk]


def _parts(index_dir: Path) -> list[Path]:
    return sorted((index_dir / "parts").glob("part-*.parquet"))


def _read_parts(index_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    parts = _parts(index_dir)
    if not parts:
        return (
            INDEX_SCHEMA.empty_table().to_pandas()
            if columns is None
            else (INDEX_SCHEMA.empty_table().select(columns).to_pandas())
        )
    tables = [pq.read_table(p, columns=columns, schema=INDEX_SCHEMA) for p in parts]
    df = pa.concat_tables(tables).to_pandas()
    df = df.sort_values("run_id", kind="stable").drop_duplicates("path", keep="last")
    return df.reset_index(drop=True)


def _known_files(index_dir: Path) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` of every present file, the latest run's row winning.

    Read with pyarrow, not pandas: a tombstone's null ``mtime_ns`` would turn the whole column
    into float64, whose 53-bit mantissa cannot hold nanosecond mtimes (about 1.8e18), so every
    file would look changed and each run would re-read and re-write the whole archive (found by
    the soak: the index grew by the archive every night after the first deletion).
    """
    parts = _parts(index_dir)
    if not parts:
        return {}
    cols = ["path", "size", "mtime_ns", "present", "run_id"]
    table = pa.concat_tables([pq.read_table(p, columns=cols, schema=INDEX_SCHEMA) for p in parts])
    table = table.take(pa.compute.sort_indices(table, [("run_id", "ascending")]))
    known: dict[str, tuple[int, int] | None] = {}
    for path, size, mtime, present in zip(
        *(table.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "present")),
        strict=True,
    ):
        if not present:
            known[path] = None
        else:  # a present row without a stat (should not happen) is re-read: (-1, -1)
            known[path] = (-1, -1) if size is None or mtime is None else (int(size), int(mtime))
    return {k: v for k, v in known.items() if v is not None}


def read_index(index_dir: Path, *, include_removed: bool = False) -> pd.DataFrame:
    """Current state of an index: one row per present file (latest run wins).

    Columns: :data:`INDEX_SCHEMA`. With ``include_removed`` the tombstones of files that
    disappeared (``present == False``) are kept too.
    """
    index_dir = Path(index_dir)
    if not (index_dir / "index.json").is_file():
        raise InputError(f"index_dir={str(index_dir)!r} holds no pdacscreen index (no index.json)")
    df = _read_parts(index_dir)
    if not include_removed:
        df = df[df["present"]].reset_index(drop=True)
    return df


def read_removed(index_dir: Path) -> pd.DataFrame:
    """Files that were indexed once and have since disappeared (path, run_id, indexed_at)."""
    df = read_index(index_dir, include_removed=True)
    return df.loc[~df["present"], ["path", "run_id", "indexed_at"]].reset_index(drop=True)


def _check_meta(index_dir: Path, *, archive: Path, key: bytes) -> None:
    meta_path = index_dir / "index.json"
    fp = key_fingerprint(key)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key_fingerprint") != fp:
            raise PseudonymKeyError(
                f"index {str(index_dir)!r} was built with another pseudonym key (fingerprint "
                f"{meta.get('key_fingerprint')}, now {fp}); use the same key or a new index folder"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"index format_version={meta.get('format_version')} is not {FORMAT_VERSION}; "
                "rebuild the index in a new folder"
            )
        return
    meta = {"format_version": FORMAT_VERSION, "key_fingerprint": fp, "archive": str(archive)}
    meta_path.write_text(json.dumps(meta, indent=1))


def _write_part(index_dir: Path, table: pa.Table, run_id: int) -> None:
    target = index_dir / "parts" / f"part-{run_id:08d}.parquet"
    tmp = target.with_suffix(".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, target)


def _compact(index_dir: Path, run_id: int) -> None:
    parts = _parts(index_dir)
    if len(parts) <= COMPACT_AFTER:
        return
    df = _read_parts(index_dir)
    _write_part(
        index_dir, pa.Table.from_pandas(df, schema=INDEX_SCHEMA, preserve_index=False), run_id
    )
    for p in parts:
        if p.name != f"part-{run_id:08d}.parquet":
            p.unlink()
    log.info("compacted %d index parts into one", len(parts))


def update_index(
    archive: Path, index_dir: Path, *, key: bytes, workers: int | None = None
) -> IndexUpdate:
    """Bring the index in ``index_dir`` up to date with the files under ``archive``.

    Reads headers only of files that are new or changed (path, size, mtime_ns), records files
    that disappeared, and never stops for a bad file.  ``workers``: Dask worker processes
    (default: the CPUs this process may use).  ``key``: the pseudonym key (resolved once by the caller,
    :func:`pdacscreen.io.pseudonym.load_key`); it must match the one the index was built with.
    """
    t0 = time.perf_counter()
    archive, index_dir = Path(archive).resolve(), Path(index_dir).resolve()
    if not archive.is_dir():
        raise InputError(f"archive={str(archive)!r} is not a folder")
    if workers is None:
        workers = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    key = check_key(key)
    (index_dir / "parts").mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_meta(index_dir, archive=archive, key=key)
        known_map = _known_files(index_dir)
        skip = index_dir if index_dir.is_relative_to(archive) else None
        seen: set[str] = set()
        todo: list[str] = []
        new = changed = 0
        for path, size, mtime in _walk(archive, skip=skip):
            text = index_path(path)  # the row form: valid UTF-8 (see the module docstring)
            seen.add(text)
            old = known_map.get(text)
            if old is None:
                new += 1
                todo.append(path)
            elif (int(old[0]), int(old[1])) != (size, mtime):
                changed += 1
                todo.append(path)
        removed = [p for p in known_map if p not in seen]
        rows = _read_headers(sorted(todo), key=key, workers=workers)
        run_id = _next_run_id(index_dir)
        now = datetime.now(UTC)
        for r in rows:
            r.update(present=True, run_id=run_id, indexed_at=now)
        for p in removed:
            rows.append({"path": p, "present": False, "run_id": run_id, "indexed_at": now})
        if rows:
            _write_part(index_dir, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), run_id)
            _compact(index_dir, run_id)
    bad = sum(1 for r in rows if r.get("present") and r.get("status") != "ok")
    upd = IndexUpdate(
        run_id=run_id,
        new=new,
        changed=changed,
        removed=len(removed),
        unchanged=len(seen) - new - changed,
        bad=bad,
        read=len(todo),
        total_present=len(seen),
        duration_s=time.perf_counter() - t0,
    )
    log.info("index update %s", upd)
    return upd


def _next_run_id(index_dir: Path) -> int:
    parts = _parts(index_dir)
    return int(parts[-1].stem.split("-")[1]) + 1 if parts else 1


# --- DICOMweb sources (issue 14) -----------------------------------------------------------------


def source_instance_counts(index_dir: Path) -> dict[str, int]:
    """``{study UID: present instance rows}`` of an index (empty where there is no index yet)."""
    if not (Path(index_dir) / "index.json").is_file():
        return {}
    df = _read_parts(Path(index_dir), columns=["path", "study_instance_uid", "present", "run_id"])
    df = df[df["present"] & df["study_instance_uid"].notna()]
    return {str(k): int(v) for k, v in df.groupby("study_instance_uid").size().items()}


def update_index_rows(
    rows: list[dict], index_dir: Path, *, archive: str, key: bytes, studies: set[str]
) -> IndexUpdate:
    """Record rows made elsewhere (a DICOMweb source: ``path`` is the instance URL, Study, Series
    and SOP UIDs in their columns, never a PatientID) as one index part.

    ``studies``: the studies these rows describe completely; an instance of one of them that is
    no longer among ``rows`` gets a tombstone.  ``archive``: the source string without
    credentials (kept in ``index.json``).
    """
    t0 = time.perf_counter()
    index_dir = Path(index_dir).resolve()
    key = check_key(key)
    (index_dir / "parts").mkdir(parents=True, exist_ok=True)
    with open(index_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_meta(index_dir, archive=archive, key=key)  # type: ignore[arg-type]
        known = _read_parts(index_dir, columns=["path", "study_instance_uid", "present", "run_id"])
        known = known[known["present"]]
        old = set(known.loc[known["study_instance_uid"].isin(studies), "path"])
        paths = {r["path"] for r in rows}
        removed = sorted(old - paths)
        run_id = _next_run_id(index_dir)
        now = datetime.now(UTC)
        out = [{**r, "present": True, "run_id": run_id, "indexed_at": now} for r in rows]
        out += [{"path": p, "present": False, "run_id": run_id, "indexed_at": now} for p in removed]
        if out:
            _write_part(index_dir, pa.Table.from_pylist(out, schema=INDEX_SCHEMA), run_id)
            _compact(index_dir, run_id)
    new = len(paths - set(known["path"]))
    return IndexUpdate(
        run_id=run_id,
        new=new,
        changed=len(paths) - new,
        removed=len(removed),
        unchanged=0,
        bad=sum(1 for r in rows if r.get("status") != "ok"),
        read=len(rows),
        total_present=len(known) - len(removed) + new,
        duration_s=time.perf_counter() - t0,
    )
