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
    "VIEWS",
    "add_arguments",
    "connect",
    "findings_dataframe",
    "query",
    "run",
    "to_arrow",
]

log = logging.getLogger(__name__)

VIEWS = ("findings", "latest_findings", "current_findings", "failures", "index")
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
    return con


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
