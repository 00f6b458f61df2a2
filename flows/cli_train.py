"""``pdacscreen train``: train the two-stage reference model on phantoms (CPU or CUDA).

The arguments become a :class:`~pdacscreen.engine.training.fit.TrainOptions`; see
:mod:`pdacscreen.engine.training.fit` for what a run does.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pdacscreen.engine.training.fit import TrainOptions, fit

__all__ = ["add_arguments", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--archive", type=Path, help="phantom archive (pdacscreen phantom)")
    data.add_argument(
        "--phantoms",
        type=int,
        metavar="N",
        help="make N phantom subjects in memory instead (study k of --phantom-seed)",
    )
    parser.add_argument("--phantom-seed", type=int, default=1000, help="with --phantoms")
    parser.add_argument("--matrix", type=int, default=256, help="with --phantoms")
    parser.add_argument(
        "--pdac-fraction", type=float, default=0.5, help="with --phantoms (as pdacscreen phantom)"
    )
    parser.add_argument("--out", type=Path, required=True, help="model package folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=float, default=1.0, help="multiplier of the step counts below"
    )
    parser.add_argument("--stage1-steps", type=int, default=500)
    parser.add_argument("--stage2-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--base1", type=int, default=8, help="stage-1 base channels")
    parser.add_argument("--base2", type=int, default=8, help="stage-2 base channels")
    parser.add_argument(
        "--train-patch2", type=int, nargs=3, default=None, help="stage-2 training patch z y x"
    )
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda[:N] or auto (cuda when torch sees a GPU)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that make phantoms and draw augmented batches (results do not depend on it)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after M minutes with a checkpoint (exit 75; continue with --resume); the "
        "schedule is never shortened",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue the run this checkpoint came from (same options; any device)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint file (default: OUT.checkpoint.pt beside the package)",
    )
    parser.add_argument(
        "--checkpoint-minutes", type=float, default=5.0, help="minutes between checkpoints"
    )
    parser.add_argument("--name", default="pdacscreen-reference")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="preprocessed-study cache (default $PDACSCREEN_WORK/engine/cache)",
    )
    parser.add_argument(
        "--vary-anatomy",
        action="store_true",
        help="with --phantoms: randomise pancreas pose and shape, habitus, texture and HU "
        "calibration beyond the generator's ranges (pdacscreen.io.phantom.variation)",
    )
    parser.add_argument(
        "--stage2-from",
        type=Path,
        default=None,
        metavar="PKG",
        help="keep this model package's stage-2 network and train stage 1 only",
    )
    parser.add_argument("--command-line", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    """``python -m pdacscreen.flows.cli_train``: ``pdacscreen train`` without the rest of the CLI
    (the GPU machine has no Prefect or Ray)."""
    parser = argparse.ArgumentParser(
        prog="python -m pdacscreen.flows.cli_train", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command_line is None:
        args.command_line = "pdacscreen train " + " ".join(sys.argv[1:] if argv is None else argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    opts = vars(args).copy()
    if opts.get("train_patch2") is not None:
        opts["train_patch2"] = tuple(opts["train_patch2"])
    return fit(TrainOptions(**opts))


if __name__ == "__main__":
    raise SystemExit(main())
