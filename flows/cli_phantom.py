"""``pdacscreen phantom``: write a synthetic CT archive with ground truth.

Example::

    pdacscreen phantom --out work/archive --studies 20 --seed 7 --matrix 128 --compress mixed

Running again with a larger ``--studies`` (or with ``--start K``) adds studies to an existing
archive; studies already written are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="archive folder (created)")
    parser.add_argument("--studies", type=int, required=True, help="number of studies to write")
    parser.add_argument("--seed", type=int, required=True, help="archive seed (non-negative)")
    parser.add_argument(
        "--matrix",
        type=int,
        choices=(512, 256, 128),
        default=256,
        help="image matrix (default 256)",
    )
    parser.add_argument(
        "--compress",
        choices=("none", "mixed"),
        default="none",
        help="'mixed': RLE, JPEG-LS and JPEG 2000 lossless plus uncompressed",
    )
    parser.add_argument(
        "--pdac-fraction",
        type=float,
        default=0.5,
        help="fraction of studies with a PDAC (default 0.5)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: CPU count, at most 8)"
    )
    parser.add_argument(
        "--start", type=int, default=0, help="index of the first study (to extend an archive)"
    )
    parser.add_argument(
        "--preview",
        action="store_true",
        help="write PNG slices (W400/L40) of the first studies to OUT/preview/",
    )
    parser.add_argument(
        "--plant-phi",
        choices=("tags", "tags+folders"),
        default=None,
        help="plant synthetic identifiers in every PHI tag, a private tag and burned-in pixels "
        "('tags+folders': also name study folders after the patient); listed in OUT/phi.parquet",
    )
    parser.add_argument(
        "--follow-up-months",
        type=float,
        nargs="+",
        default=(),
        metavar="M",
        help="scan each of --studies patients at these months (ascending from 0, e.g. 0 12 24): "
        "PDAC patients progress (the lesion appears half-way and grows), the others are stable; "
        "writes OUT/diagnoses.csv for `pdacscreen evaluate --diagnoses`",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from pdacscreen.io.errors import PdacscreenError
    from pdacscreen.io.phantom.archive import generate_archive

    console = Console()
    try:
        with Progress(
            TextColumn("phantom"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("studies", total=args.studies)
            summary = generate_archive(
                args.out,
                studies=args.studies,
                seed=args.seed,
                matrix=args.matrix,
                compress=args.compress,
                pdac_fraction=args.pdac_fraction,
                workers=args.workers,
                start=args.start,
                preview=args.preview,
                follow_up_months=tuple(args.follow_up_months),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        if args.plant_phi:
            from pdacscreen.io.phantom.phi import plant_phi

            plant_phi(args.out, folder_names=args.plant_phi == "tags+folders")
    except PdacscreenError as e:
        console.print(f"[red]error[/red] ({e.code}): {e}")
        return 2
    table = Table(title=f"phantom archive {summary.out}", show_header=False)
    for key, value in (
        ("studies in archive", summary.studies_total),
        ("written / skipped", f"{summary.studies_written} / {summary.studies_skipped}"),
        ("PDAC studies", summary.pdac_studies),
        *(
            (("follow-up visits (months)", " ".join(f"{m:g}" for m in args.follow_up_months)),)
            if args.follow_up_months
            else ()
        ),
        ("files written", summary.files_written),
        ("MB written", f"{summary.bytes_written / 1e6:.1f}"),
        ("transfer syntaxes", ", ".join(summary.transfer_syntaxes)),
        ("truth", summary.truth_path),
        ("seconds", f"{summary.seconds:.1f}"),
    ):
        table.add_row(key, str(value))
    console.print(table)
    return 0
