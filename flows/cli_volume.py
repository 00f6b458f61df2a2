"""``pdacscreen volume``: convert one series to a NIfTI volume in HU."""

from __future__ import annotations

import argparse
from pathlib import Path

from pdacscreen.flows.cli import add_key_argument, key_or_none
from pdacscreen.io.errors import PdacscreenError
from pdacscreen.io.nifti import write_nifti
from pdacscreen.io.volume import load_series, series_files

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        help="a DICOM file, a folder holding one series, or a SeriesInstanceUID (with --index)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .nii or .nii.gz")
    parser.add_argument("--index", type=Path, default=None, help="index folder (for a UID)")
    parser.add_argument("--series", default=None, help="SeriesInstanceUID within a folder")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--on-uneven", choices=("resample", "refuse"), default="resample")
    parser.add_argument("--on-missing-slice", choices=("refuse", "resample"), default="refuse")
    add_key_argument(parser)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if (key := key_or_none(args, console)) is None:
        return 2
    try:
        if args.series is not None:
            files, uid = [str(f) for f in Path(args.target).rglob("*") if f.is_file()], args.series
        else:
            files, uid = series_files(args.target, index=args.index, key=key)
        vol = load_series(
            files,
            workers=args.workers,
            series_instance_uid=uid,
            key=key,
            on_uneven=args.on_uneven,
            on_missing_slice=args.on_missing_slice,
        )
    except PdacscreenError as e:
        console.print(f"[red]refused[/red] ({e.code}): {e}")
        return 2
    write_nifti(vol, args.out)
    console.print(
        f"wrote {args.out}: shape (z, y, x) {vol.shape}, spacing {vol.spacing} mm, "
        f"flags {list(vol.flags)}"
    )
    return 0
