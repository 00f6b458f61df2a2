"""``pdacscreen timeline STORE [--patient-key K] [--out FILE]``: one patient's studies in date order
with the changes per year, or (without ``--patient-key``) the longitudinal flags of all patients."""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa

from pdacscreen.flows.query import LONGITUDINAL_THRESHOLDS
from pdacscreen.flows.timeline import longitudinal_flags, patient_timeline
from pdacscreen.io.errors import PdacscreenError

__all__ = ["add_arguments", "run"]

_SHOW = {
    "timeline": (
        "study_number",
        "study_date",
        "status",
        "pdac_probability",
        "lesion_count",
        "lesion_diameter_mm",
        "pancreas_volume_ml",
        "skeletal_muscle_area_cm2",
        "pancreas_volume_change_pct_per_year",
        "muscle_change_pct_per_year",
        "lesion_growth_mm_per_year",
        "new_candidate",
    ),
    "flags": (
        "patient_key",
        "latest_study_date",
        "n_studies",
        "pdac_probability",
        "reasons",
        "change_score",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="findings store folder (STORE)")
    parser.add_argument("--patient-key", help="pseudonymous patient key (the patient_key column)")
    for name, default in LONGITUDINAL_THRESHOLDS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=default,
            help=f"longitudinal flag threshold (default {default})",
        )
    parser.add_argument("--out", type=Path, help="write all columns to FILE (.csv or .parquet)")


def _write(table: pa.Table, out: Path) -> None:
    if out.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out)
        return
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    cols = {}
    for name in table.column_names:
        col = table[name]
        if pa.types.is_list(col.type):
            col = pc.binary_join(col, ";")
        cols[name] = col
    pacsv.write_csv(pa.table(cols), out)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: keep whole dates and keys on one line
        console = Console(width=200)
    err = Console(stderr=True)
    thresholds = {k: getattr(args, k) for k in LONGITUDINAL_THRESHOLDS}
    try:
        if args.patient_key:
            table, kind = patient_timeline(args.store, args.patient_key), "timeline"
        else:
            table, kind = longitudinal_flags(args.store, thresholds), "flags"
    except PdacscreenError as e:
        err.print(f"[red]{e.code}:[/red] {e}", highlight=False)
        return 2
    if args.out is not None:
        if args.out.suffix.lower() not in (".csv", ".parquet"):
            err.print(f"[red]--out must end in .csv or .parquet, got {args.out}")
            return 2
        _write(table, args.out)
        err.print(f"wrote {table.num_rows} row(s) to {args.out}")
        return 0
    if table.num_rows == 0:
        what = "no assessed studies for that key" if kind == "timeline" else "no patient flagged"
        console.print(what)
        return 0
    view = Table(title=f"patient {args.patient_key}" if kind == "timeline" else "changes")
    cols = [c for c in _SHOW[kind] if c in table.column_names]
    for c in cols:
        view.add_column(c)
    for row in table.select(cols).to_pylist():
        view.add_row(*(_cell(row[c]) for c in cols))
    console.print(view)
    return 0


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)
