"""Build a second-renderer archive: ``python -m tests.second_renderer --out DIR --studies N --seed S``.

Run from the repository root (``tests`` must be importable).  Then assess it with the shipped
reference model: ``pdacscreen assess --archive DIR --out DIR/assess.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tests.second_renderer.archive import write_archive

log = logging.getLogger("tests.second_renderer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.second_renderer", description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="archive folder (created)")
    ap.add_argument("--studies", type=int, required=True, help="number of studies")
    ap.add_argument("--seed", type=int, required=True, help="archive seed (non-negative)")
    ap.add_argument("--start", type=int, default=0, help="index of the first study")
    ap.add_argument("--matrix", type=int, default=256, help="image matrix (default 256)")
    args = ap.parse_args(argv)
    if args.studies < 0 or args.seed < 0 or args.start < 0 or args.matrix < 32:
        ap.error(
            f"--studies, --seed and --start must be >= 0 and --matrix >= 32, got "
            f"{args.studies}, {args.seed}, {args.start}, {args.matrix}"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    path = write_archive(
        args.out, studies=args.studies, seed=args.seed, matrix=args.matrix, start=args.start
    )
    log.info("wrote %s in %.0f s", path, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
