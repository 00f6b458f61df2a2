"""``pdacscreen query STORE "SQL"``: SQL over a findings store with DuckDB (and Dask data frames).

Views registered on every connection (see :func:`connect`):

* ``findings``: every findings row of ``STORE/findings`` (all sweeps, all model versions), with the
  ``sweep_date`` partition column (DATE).
* ``latest_findings``: the latest row (by ``processed_at``) per study and ``model_name``: what the
  model last said about each study, whatever sweep or model version produced it (a window over
  every row: the thorough view, slower on very large stores).
* ``current_findings``: the rows of the model version and config hash of the most recent sweep.
  The store holds one row per study for each (model version, config hash) and a sweep with a new
  version or config processes every study, so this is one row per study, found with a filter
  (fast): the view for rates and counts.
* ``failures``: ``STORE/failures``, one row per failed file, series or study.
* ``index``: the archive index written by ``pdacscreen index`` under ``STORE/index``
  (``**/*.parquet``, columns unified by name); empty (``study_instance_uid``, ``series_instance_uid``,
  ``path``) when the store has no index.
* ``patient_timeline``: every assessed study (``current_findings``, status ok or not_assessable)
  of each patient with a key and a study date, in date order (``study_number`` 1..``n_studies``):
  probability, lesion count and size, pancreas volume, duct calibre (when a ``duct_diameter_mm``
  column exists), body composition, and the change since the patient's previous study per year:
  ``pancreas_volume_change_pct_per_year``, ``muscle_change_pct_per_year``,
  ``lesion_growth_mm_per_year``, ``new_candidate`` (lesion candidates now, none before).
* ``longitudinal_flags``: one row per patient whose latest study shows a new candidate or a change
  beyond :data:`LONGITUDINAL_THRESHOLDS` against the study before, with the ``reasons`` and a
  ``change_score`` (change / threshold, the largest) to rank a worklist by change.

Files whose names start with ``.`` or ``_`` (a writer's temporary files) are never read. The analyst
queries of the README are :data:`EXAMPLE_QUERIES` (a test runs each on a generated store).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import duckdb
import pyarrow as pa

from pdacscreen.io.errors import InputError, PdacscreenError, QueryError
from pdacscreen.io.store import (
    FAILURES_SCHEMA,
    FINDINGS_SCHEMA,
    PARTITION_FIELD,
    FindingsStore,
    parquet_files,
)

__all__ = [
    "EXAMPLE_QUERIES",
    "LONGITUDINAL_THRESHOLDS",
    "VIEWS",
    "add_arguments",
    "connect",
    "findings_dataframe",
    "query",
    "run",
    "timeline_views",
    "to_arrow",
]

log = logging.getLogger(__name__)

VIEWS = (
    "findings",
    "latest_findings",
    "current_findings",
    "failures",
    "index",
    "patient_timeline",
    "longitudinal_flags",
)
#: longitudinal_flags thresholds, per year between a patient's last two studies.  Pancreas volume
#: loss: the gland shrinks upstream of a tumour (DOMAIN.md; atrophy is a secondary sign); muscle
#: loss: cancer cachexia (Prado 2008); lesion growth: a candidate growing is a stronger signal.
LONGITUDINAL_THRESHOLDS: dict[str, float] = {
    "pancreas_volume_loss_pct_per_year": 10.0,
    "muscle_loss_pct_per_year": 5.0,
    "lesion_growth_mm_per_year": 2.0,
}
_TIMELINE_OPTIONAL = {  # columns the timeline shows when the store has them (older stores lack them)
    "duct_diameter_mm": "DOUBLE",
    "skeletal_muscle_area_cm2": "DOUBLE",
    "visceral_fat_area_cm2": "DOUBLE",
    "subcutaneous_fat_area_cm2": "DOUBLE",
    "muscle_mean_hu": "DOUBLE",
    "skeletal_muscle_index_cm2_m2": "DOUBLE",
    "bodycomp_qc": "VARCHAR",
}
FORMATS = ("table", "csv", "parquet")
_EMPTY_INDEX = pa.schema(
    [
        ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("path", pa.string()),
    ]
)

#: The queries analysts ask first (README "Querying the findings"); each runs on a generated store.
EXAMPLE_QUERIES: dict[str, str] = {
    "flagged_last_night": """
        SELECT accession_key, study_date, round(pdac_probability, 3) AS probability,
               lesion_diameter_mm, lesion_location, qc_flags
        FROM findings
        WHERE pdac_flag AND sweep_date = (SELECT max(sweep_date) FROM findings)
        ORDER BY pdac_probability DESC""",
    "flag_rate_by_vendor": """
        SELECT manufacturer, count(*) AS studies, count_if(pdac_flag) AS flagged,
               round(avg(pdac_flag::INT), 4) AS flag_rate
        FROM current_findings WHERE status = 'ok'
        GROUP BY manufacturer ORDER BY studies DESC""",
    "flag_rate_by_slice_thickness": """
        SELECT CASE WHEN slice_thickness_mm <= 1.5 THEN '<= 1.5 mm'
                    WHEN slice_thickness_mm <= 3.0 THEN '1.5-3 mm'
                    WHEN slice_thickness_mm > 3.0 THEN '> 3 mm' ELSE 'unknown' END AS thickness,
               count(*) AS studies, count_if(pdac_flag) AS flagged,
               round(avg(pdac_flag::INT), 4) AS flag_rate
        FROM current_findings WHERE status = 'ok'
        GROUP BY thickness ORDER BY min(slice_thickness_mm) NULLS LAST""",
    "flag_rate_by_phase": """
        SELECT phase_estimate, count(*) AS studies, count_if(pdac_flag) AS flagged,
               round(avg(pdac_flag::INT), 4) AS flag_rate
        FROM current_findings WHERE status = 'ok'
        GROUP BY phase_estimate ORDER BY studies DESC""",
    "failures_by_error_code": """
        SELECT stage, error_code, count(*) AS failures,
               count(DISTINCT study_instance_uid) AS studies, min(occurred_at) AS first_seen,
               max(occurred_at) AS last_seen
        FROM failures GROUP BY stage, error_code ORDER BY failures DESC""",
    "studies_not_ok_by_code": """
        SELECT status, error_code, count(*) AS studies
        FROM current_findings WHERE status <> 'ok'
        GROUP BY status, error_code ORDER BY studies DESC""",
    "pancreas_volume_change": """
        SELECT patient_key, count(*) AS studies,
               min(study_date) AS first_study, max(study_date) AS last_study,
               arg_min(pancreas_volume_ml, study_date) AS first_volume_ml,
               arg_max(pancreas_volume_ml, study_date) AS last_volume_ml,
               round(100 * (arg_max(pancreas_volume_ml, study_date)
                            / arg_min(pancreas_volume_ml, study_date) - 1), 1) AS change_pct
        FROM current_findings
        WHERE status = 'ok' AND patient_key IS NOT NULL AND study_date IS NOT NULL
        GROUP BY patient_key HAVING count(*) >= 2
        ORDER BY change_pct""",
    "patients_changing": """
        SELECT patient_key, latest_study_date, n_studies, reasons, change_score,
               round(pancreas_volume_change_pct_per_year, 1) AS pancreas_pct_per_year,
               round(muscle_change_pct_per_year, 1) AS muscle_pct_per_year
        FROM longitudinal_flags ORDER BY change_score DESC LIMIT 50""",
    "indexed_studies_without_findings": """
        SELECT count(DISTINCT i.study_instance_uid) AS studies
        FROM index AS i ANTI JOIN findings AS f USING (study_instance_uid)""",
}


def _files(folder: Path, pattern: str) -> list[str]:
    return [str(p) for p in parquet_files(folder, pattern)]


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _view(con: duckdb.DuckDBPyConnection, name: str, files: list[str], empty: pa.Schema, opts: str):
    if files:
        con.execute(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet("
            f"{_sql_list(files)}, union_by_name = true{opts})"
        )
    else:
        con.register(f"_empty_{name}", empty.empty_table())
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")


def connect(store: Path | str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the store's views (:data:`VIEWS`) registered.

    Raises:
        InputError: ``store`` is not a folder.
    """
    st = FindingsStore(store)
    if not st.root.is_dir():
        raise InputError(f"store must be an existing folder (a findings store), got {str(store)!r}")
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")
    hive = ", hive_partitioning = true, hive_types = {'sweep_date': DATE}"
    findings = _files(st.findings_dir, "sweep_date=*/*.parquet")
    _view(con, "findings", findings, FINDINGS_SCHEMA.append(PARTITION_FIELD), hive)
    _view(con, "failures", _files(st.failures_dir, "*.parquet"), FAILURES_SCHEMA, "")
    index = _files(st.index_dir, "**/*.parquet")
    if not index:
        log.info("no archive index under %s: the index view is empty", st.index_dir)
    _view(con, "index", index, _EMPTY_INDEX, "")
    con.execute(
        "CREATE OR REPLACE VIEW latest_findings AS SELECT * FROM findings QUALIFY row_number() "
        "OVER (PARTITION BY study_instance_uid, model_name "
        "ORDER BY processed_at DESC, sweep_id DESC) = 1"
    )
    con.execute(
        "CREATE OR REPLACE VIEW current_findings AS SELECT f.* FROM findings AS f SEMI JOIN "
        "(SELECT model_version, config_hash FROM findings ORDER BY processed_at DESC, sweep_id DESC "
        "LIMIT 1) AS cur USING (model_version, config_hash)"
    )
    timeline_views(con)
    return con


def timeline_views(
    con: duckdb.DuckDBPyConnection, thresholds: dict[str, float] | None = None
) -> None:
    """(Re)create the ``patient_timeline`` and ``longitudinal_flags`` views on ``con`` (which has
    ``current_findings``), with ``thresholds`` (keys of :data:`LONGITUDINAL_THRESHOLDS`)."""
    th = dict(LONGITUDINAL_THRESHOLDS)
    for k, v in (thresholds or {}).items():
        if k not in th or not (isinstance(v, (int, float)) and v > 0):
            raise InputError(
                f"threshold {k!r} must be one of {sorted(th)} with a positive value, got {v!r}"
            )
        th[k] = float(v)
    have = {r[0] for r in con.execute("DESCRIBE current_findings").fetchall()}
    opt = ", ".join(
        (c if c in have else f"NULL::{t}") + f" AS {c}" for c, t in _TIMELINE_OPTIONAL.items()
    )
    days = "date_diff('day', prev_date, study_date)"
    con.execute(
        f"""CREATE OR REPLACE VIEW patient_timeline AS
        WITH s AS (
            SELECT patient_key, study_instance_uid, accession_key, study_date, status,
                   pdac_probability, pdac_flag, lesion_count, lesion_diameter_mm,
                   pancreas_volume_ml, {opt}
            FROM current_findings
            WHERE status IN ('ok', 'not_assessable') AND patient_key IS NOT NULL
                  AND study_date IS NOT NULL
        ), w AS (
            SELECT *, row_number() OVER p AS study_number,
                   count(*) OVER (PARTITION BY patient_key) AS n_studies,
                   lag(study_date) OVER p AS prev_date,
                   lag(pancreas_volume_ml) OVER p AS prev_volume,
                   lag(skeletal_muscle_area_cm2) OVER p AS prev_muscle,
                   lag(lesion_count) OVER p AS prev_count,
                   lag(lesion_diameter_mm) OVER p AS prev_diameter
            FROM s WINDOW p AS (PARTITION BY patient_key ORDER BY study_date, study_instance_uid)
        )
        SELECT patient_key, study_number, n_studies, study_date, study_instance_uid,
               accession_key, status, pdac_probability, pdac_flag, lesion_count,
               lesion_diameter_mm, pancreas_volume_ml, duct_diameter_mm,
               skeletal_muscle_area_cm2, visceral_fat_area_cm2, subcutaneous_fat_area_cm2,
               muscle_mean_hu, skeletal_muscle_index_cm2_m2, bodycomp_qc,
               {days} AS days_since_previous,
               CASE WHEN {days} > 0 AND prev_volume > 0 THEN
                   100 * (pancreas_volume_ml / prev_volume - 1) * 365.25 / {days}
               END AS pancreas_volume_change_pct_per_year,
               CASE WHEN {days} > 0 AND prev_muscle > 0 THEN
                   100 * (skeletal_muscle_area_cm2 / prev_muscle - 1) * 365.25 / {days}
               END AS muscle_change_pct_per_year,
               CASE WHEN {days} > 0 AND coalesce(lesion_count, 0) > 0 THEN
                   (coalesce(lesion_diameter_mm, 0)
                    - CASE WHEN coalesce(prev_count, 0) > 0 THEN coalesce(prev_diameter, 0)
                      ELSE 0 END) * 365.25 / {days}
               END AS lesion_growth_mm_per_year,
               study_number > 1 AND coalesce(lesion_count, 0) > 0
                   AND coalesce(prev_count, 0) = 0 AS new_candidate
        FROM w"""
    )
    pv, mu, lg = (
        th["pancreas_volume_loss_pct_per_year"],
        th["muscle_loss_pct_per_year"],
        th["lesion_growth_mm_per_year"],
    )
    con.execute(
        f"""CREATE OR REPLACE VIEW longitudinal_flags AS
        WITH last AS (
            SELECT *, list_concat(list_concat(list_concat(
                CASE WHEN new_candidate THEN ['new_candidate'] ELSE []::VARCHAR[] END,
                CASE WHEN pancreas_volume_change_pct_per_year < -{pv}
                     THEN ['pancreas_volume_loss'] ELSE []::VARCHAR[] END),
                CASE WHEN muscle_change_pct_per_year < -{mu}
                     THEN ['muscle_loss'] ELSE []::VARCHAR[] END),
                CASE WHEN NOT new_candidate AND lesion_growth_mm_per_year > {lg}
                     THEN ['lesion_growth'] ELSE []::VARCHAR[] END) AS reasons,
                greatest(CASE WHEN new_candidate THEN 1.0 ELSE 0.0 END,
                         coalesce(-pancreas_volume_change_pct_per_year / {pv}, 0),
                         coalesce(-muscle_change_pct_per_year / {mu}, 0),
                         coalesce(lesion_growth_mm_per_year / {lg}, 0)) AS change_score
            FROM patient_timeline WHERE study_number = n_studies AND n_studies >= 2
        )
        SELECT patient_key, study_date AS latest_study_date,
               study_instance_uid AS latest_study_instance_uid, accession_key, n_studies,
               days_since_previous, pdac_probability, pdac_flag, lesion_count, lesion_diameter_mm,
               pancreas_volume_change_pct_per_year, muscle_change_pct_per_year,
               lesion_growth_mm_per_year, new_candidate, reasons,
               round(change_score, 3) AS change_score
        FROM last WHERE len(reasons) > 0
        ORDER BY change_score DESC, pdac_probability DESC NULLS LAST, patient_key"""
    )


def to_arrow(result) -> pa.Table:
    """A DuckDB relation or result as an Arrow table (DuckDB 1.x and 2.x spellings)."""
    for name in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(result, name, None)
        if fn is not None:
            out = fn()
            return out.read_all() if isinstance(out, pa.RecordBatchReader) else out
    raise QueryError(f"cannot get Arrow output from {type(result).__name__}")


def query(store: Path | str, sql: str) -> pa.Table:
    """Run ``sql`` over the store's views and return the result as an Arrow table.

    Raises:
        QueryError: DuckDB rejected the SQL (its message is kept).
    """
    con = connect(store)
    try:
        rel = con.sql(sql)
        return pa.table({}) if rel is None else to_arrow(rel)
    except duckdb.Error as e:
        raise QueryError(f"query failed: {e}\nviews: {', '.join(VIEWS)}") from e
    finally:
        con.close()


def findings_dataframe(store: Path | str):
    """The findings as a lazy Dask DataFrame (pyarrow dtypes; ``sweep_date`` categorical).

    For work bigger than memory: Dask reads the Parquet partitions one at a time, on a local or
    ``distributed`` cluster. Raises InputError when the store has no findings yet.
    """
    import dask.dataframe as dd

    st = FindingsStore(store)
    if not _files(st.findings_dir, "sweep_date=*/*.parquet"):
        raise InputError(f"no findings in {st.findings_dir} (run a sweep first)")
    return dd.read_parquet(str(st.findings_dir), dtype_backend="pyarrow")


# ------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="findings store folder (STORE)")
    parser.add_argument("sql", help=f"SQL over the views {', '.join(VIEWS)}")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default: from --out, else table)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result to this file")
    parser.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table")


def _flatten_lists(table: pa.Table) -> pa.Table:
    """CSV cannot hold lists: join list columns with ';'."""
    import pyarrow.compute as pc

    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            col = table.column(i)
            joined = pc.binary_join(col.cast(pa.list_(pa.string())), ";")
            table = table.set_column(i, field.name, joined)
    return table


def _print_table(table: pa.Table, max_rows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    view = Table(show_lines=False, header_style="bold")
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.slice(0, max_rows).to_pylist():
        view.add_row(*(_cell(v) for v in row.values()))
    console.print(view)
    more = table.num_rows - min(max_rows, table.num_rows)
    console.print(f"{table.num_rows} row(s)" + (f", {more} not shown (--max-rows)" if more else ""))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    err = Console(stderr=True)
    fmt = args.format
    if fmt is None:
        suffix = args.out.suffix.lower() if args.out else ""
        fmt = {".csv": "csv", ".parquet": "parquet"}.get(
            suffix, "table" if args.out is None else ""
        )
        if not fmt:
            err.print(f"[red]cannot tell the format of --out {args.out}; give --format csv|parquet")
            return 2
    if fmt == "table" and args.out is not None:
        err.print("[red]--format table prints to the terminal; use --format csv|parquet with --out")
        return 2
    if fmt == "parquet" and args.out is None:
        err.print("[red]--format parquet needs --out FILE")
        return 2
    try:
        table = query(args.store, args.sql)
    except PdacscreenError as e:
        err.print(f"[red]{e.code}:[/red] {e}", markup=True, highlight=False)
        return 2
    if fmt == "table":
        _print_table(table, args.max_rows)
        return 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, args.out)
    else:
        import pyarrow.csv as pacsv

        flat = _flatten_lists(table)
        if args.out is None:
            pacsv.write_csv(flat, sys.stdout.buffer)
            sys.stdout.flush()
        else:
            pacsv.write_csv(flat, args.out)
    if args.out is not None:
        err.print(f"wrote {table.num_rows} row(s) to {args.out}")
    return 0
