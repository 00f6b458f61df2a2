"""``pdacscreen select``: choose each study's non-contrast series from an index."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from pdacscreen.io.select import load_rules, select_series

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, required=True, help="index folder")
    parser.add_argument("--rules", type=Path, default=None, help="rules JSON (default: shipped)")
    parser.add_argument("--out", type=Path, default=None, help="write selections as JSON lines")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pdacscreen.io.index import read_index

    console = Console()
    rules = load_rules(args.rules)
    sels = select_series(read_index(args.index), rules=rules)
    table = Table(title=f"series selection (rules {rules.version})")
    for col in ("study", "status", "series", "files", "rejected"):
        table.add_column(col)
    for s in sels:
        table.add_row(
            s.study_instance_uid[-24:],
            s.status,
            (s.series_instance_uid or "-")[-24:],
            str(len(s.files)),
            str(len(s.rejections)),
        )
    console.print(table)
    if args.out is not None:
        with open(args.out, "w", encoding="utf-8") as f:
            for s in sels:
                f.write(json.dumps(asdict(s), default=str) + "\n")
        console.print(f"wrote {args.out}")
    return 0
