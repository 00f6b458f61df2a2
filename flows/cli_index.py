"""``pdacscreen index``: crawl an archive into a Parquet index (incremental)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from pdacscreen.flows.cli import add_key_argument, key_or_none
from pdacscreen.io.index import read_index, update_index

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path, help="folder tree of DICOM files (any depth)")
    parser.add_argument(
        "--index", type=Path, required=True, help="index folder (created if absent)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: CPUs)"
    )
    add_key_argument(parser)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if (key := key_or_none(args, console)) is None:
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
