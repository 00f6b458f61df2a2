"""``pdacscreen index``: crawl an archive into a Parquet index (incremental)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from pdacscreen.io.errors import PseudonymKeyError
from pdacscreen.io.index import read_index, update_index
from pdacscreen.io.pseudonym import load_key

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path, help="folder tree of DICOM files (any depth)")
    parser.add_argument(
        "--index", type=Path, required=True, help="index folder (created if absent)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: CPUs)"
    )
    parser.add_argument(
        "--demo-key", action="store_true", help="use the public demo pseudonym key (synthetic data)"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        key = load_key(demo=args.demo_key)
    except PseudonymKeyError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    upd = update_index(args.archive, args.index, key=key, workers=args.workers)
    df = read_index(args.index)
    console.print(
        f"[bold]index[/bold] {args.index}: "
        + ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in asdict(upd).items()
        )
    )
    if len(df):
        counts = df.groupby(df["error_code"].fillna("ok")).size().to_dict()
        console.print(
            f"files by status: {counts}; series: {df['series_instance_uid'].nunique()}, "
            f"studies: {df['study_instance_uid'].nunique()}"
        )
    return 0
