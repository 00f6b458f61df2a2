"""``pdacscreen assess``: run a model package over held-out phantoms and summarise its quality.

The phantoms come from a DICOM archive (``--archive``) or are made in memory from an archive seed
(``--phantom-seed``); ``--update-card`` merges the summary into the package's model card.
Reference models are trained on synthetic phantoms: these are phantom numbers, not a clinical
validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console

from pdacscreen.engine.package import REFERENCE_PACKAGE, load_package
from pdacscreen.engine.training.assess import (
    archive_cases,
    assess_cases,
    phantom_cases,
    summarise,
    update_card,
)

__all__ = ["add_arguments", "run", "main"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--archive", type=Path, help="a DICOM phantom archive (pdacscreen phantom)")
    src.add_argument(
        "--phantom-seed", type=int, help="make the subjects of this archive seed in memory"
    )
    ap.add_argument("--studies", type=int, default=200, help="with --phantom-seed")
    ap.add_argument("--start", type=int, default=0, help="with --phantom-seed: first study index")
    ap.add_argument("--matrix", type=int, default=256, help="with --phantom-seed")
    ap.add_argument(
        "--slice-thickness-mm", type=float, nargs="+", default=None, help="override (cycled)"
    )
    ap.add_argument("--noise-hu", type=float, default=None, help="override the noise level")
    ap.add_argument("--cache", type=Path, default=Path("work/engine/assess-cache"))
    ap.add_argument(
        "--model", type=Path, default=None, help="model package (default: the reference)"
    )
    ap.add_argument(
        "--name", default=None, help="column name in the quality table (default: folder name)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write rows + summary JSON here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--note", action="append", default=[], help="a note for the model card")
    ap.add_argument(
        "--update-card", action="store_true", help="merge into PKG/assessment.json + README"
    )


def run(args: argparse.Namespace) -> int:
    pkg = load_package(args.model)
    if args.archive is not None:
        cases = archive_cases(args.archive, limit=args.limit)
        source = f"--archive {args.archive}"
    else:
        cases = phantom_cases(
            seed=args.phantom_seed,
            studies=args.limit or args.studies,
            matrix=args.matrix,
            cache=args.cache,
            slice_thickness_mm=args.slice_thickness_mm,
            noise_hu=args.noise_hu,
            start=args.start,
        )
        source = f"--phantom-seed {args.phantom_seed} --studies {args.limit or args.studies} --matrix {args.matrix}"
        if args.slice_thickness_mm:
            source += " --slice-thickness-mm " + " ".join(f"{t:g}" for t in args.slice_thickness_mm)
        if args.noise_hu is not None:
            source += f" --noise-hu {args.noise_hu:g}"
    rows = assess_cases(cases, args.model, threads=args.threads)
    summary = summarise(rows, operating=pkg.thresholds.operating)
    summary["source"] = source
    summary["matrix"] = (
        int(rows[0].get("matrix", 0)) if rows and "matrix" in rows[0] else args.matrix
    )
    summary["seed"] = args.phantom_seed
    name = args.name or (
        Path(args.archive).name if args.archive else f"phantom-{args.phantom_seed}"
    )
    Console().print_json(json.dumps({name: summary}, default=float))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"summary": summary, "rows": rows}, indent=2, default=float)
        )
    if args.update_card:
        update_card(
            Path(args.model or REFERENCE_PACKAGE), name=name, summary=summary, notes=args.note
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pdacscreen.flows.cli_assess`` (for machines without Prefect or Ray)."""
    ap = argparse.ArgumentParser(prog="pdacscreen assess", description=__doc__.split("\n")[0])
    add_arguments(ap)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(ap.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
