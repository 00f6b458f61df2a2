"""The ``pdacscreen`` command line.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``pdacscreen --help``
stays fast and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("pdacscreen.flows.cli_phantom", "write a synthetic CT archive with ground truth"),
    "index": ("pdacscreen.flows.cli_index", "crawl an archive into a Parquet index (incremental)"),
    "select": (
        "pdacscreen.flows.cli_select",
        "choose each study's non-contrast series from an index",
    ),
    "volume": ("pdacscreen.flows.cli_volume", "convert one series to a NIfTI volume in HU"),
    "train": ("pdacscreen.flows.cli_train", "train the reference model on a phantom archive"),
    "assess": ("pdacscreen.flows.cli_assess", "assess a model package on held-out phantoms"),
    "sweep": ("pdacscreen.flows.cli_sweep", "run a nightly sweep (Prefect flow, Ray fan-out)"),
    "serve": ("pdacscreen.flows.deploy", "serve the nightly sweep deployment on a cron schedule"),
    "query": ("pdacscreen.flows.query", "run SQL over a findings store (DuckDB)"),
    "evaluate": ("pdacscreen.flows.evaluate", "evaluate findings against reference labels"),
    "worklist": ("pdacscreen.flows.worklist", "write a radiologist's worklist of flagged studies"),
}


def _offline_defaults() -> None:
    """Keep third-party tools offline and their state inside the working folder."""
    work = Path(os.environ.get("PDACSCREEN_WORK", Path.cwd() / "work"))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("RAY_TMPDIR", str(work / "ray"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdacscreen",
        description="Screen non-contrast CT archives for pancreatic cancer (research software).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _offline_defaults()
    parser = build_parser()
    # Parse only the global options and the command name; the command's module parses the rest.
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if known.verbose > 1
        else logging.INFO
        if known.verbose
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(COMMANDS[known.command][0])
    sub = argparse.ArgumentParser(
        prog=f"pdacscreen {known.command}", description=COMMANDS[known.command][1]
    )
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
