"""``pdacscreen calibrate``: operating thresholds of a model package from purpose-made negatives.

See :mod:`pdacscreen.engine.training.calibrate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["add_arguments", "run", "main"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", type=Path, default=None, help="model package (default: reference)")
    ap.add_argument(
        "--phantom-seed",
        type=int,
        default=5000,
        help="seed of the negatives (never one used for training or assessment)",
    )
    ap.add_argument("--negatives", type=int, default=400, help="non-PDAC phantoms to score")
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1, help="processes (scores do not depend on it)")
    ap.add_argument("--cache", type=Path, default=Path("work/engine/assess-cache"))
    ap.add_argument(
        "--write", action="store_true", help="write the thresholds into the package's model.json"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pdacscreen.engine.training.calibrate import calibrate
    from pdacscreen.io.errors import PdacscreenError

    console = Console()
    try:
        cal = calibrate(
            args.model,
            seed=args.phantom_seed,
            negatives=args.negatives,
            matrix=args.matrix,
            cache=args.cache,
            workers=args.workers,
            write=args.write,
        )
    except PdacscreenError as e:
        console.print(f"[red]error[/red]: {e}")
        return 2
    console.print_json(json.dumps({"thresholds": cal.thresholds, "calibration": cal.record}))
    if not args.write:
        console.print("(not written: add --write to store them in the package)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pdacscreen.flows.cli_calibrate`` (no Prefect or Ray needed)."""
    ap = argparse.ArgumentParser(prog="pdacscreen calibrate", description=__doc__.split("\n")[0])
    add_arguments(ap)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run(ap.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
