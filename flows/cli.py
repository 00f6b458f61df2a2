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

from pdacscreen.io.errors import PseudonymKeyError
from pdacscreen.io.pseudonym import load_key

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
    "calibrate": (
        "pdacscreen.flows.cli_calibrate",
        "set a model package's thresholds on purpose-made negative phantoms",
    ),
    "sweep": ("pdacscreen.flows.cli_sweep", "run a nightly sweep (Prefect flow, Ray fan-out)"),
    "serve": ("pdacscreen.flows.deploy", "serve the nightly sweep deployment on a cron schedule"),
    "query": ("pdacscreen.flows.query", "run SQL over a findings store (DuckDB)"),
    "evaluate": (
        "pdacscreen.flows.cli_evaluate",
        "evaluate findings against reference labels, or lead time before diagnoses",
    ),
    "evaluate-network": (
        "pdacscreen.flows.cli_evaluate_network",
        "pool sites' aggregate exports into a network ROC with heterogeneity",
    ),
    "worklist": ("pdacscreen.flows.worklist", "write a radiologist's worklist of flagged studies"),
    "timeline": (
        "pdacscreen.flows.cli_timeline",
        "a patient's studies over time, or the patients whose scans changed",
    ),
}


def add_key_argument(parser: argparse.ArgumentParser) -> None:
    """``--demo-key``, for every command that makes pseudonymous keys (index, volume, sweep)."""
    parser.add_argument(
        "--demo-key",
        action="store_true",
        help="use the public demo pseudonym key (synthetic archives only; make demo and the tests)",
    )


def key_or_none(args: argparse.Namespace, console) -> bytes | None:
    """The pseudonym key (``load_key``), or None after printing why there is none (exit 2)."""
    try:
        return load_key(demo=args.demo_key)
    except PseudonymKeyError as e:
        console.print(f"[red]{e}[/red]")
        return None


_AF_UNIX_MAX = 107  # bytes in a sockaddr_un path (Linux), the limit Ray's sockets must fit
_RAY_SOCKET_TAIL = len("/session_2026-01-01_00-00-00_000000_0000000/sockets/plasma_store")


def state_dir() -> Path:
    """The per-user folder for pdacscreen's tool state (Prefect's database, Ray's session files,
    engine caches), created on demand: ``$PDACSCREEN_WORK`` if set, else
    ``$XDG_STATE_HOME/pdacscreen``, else ``~/.local/state/pdacscreen``.  Never the current folder,
    so a command works from any folder."""
    if os.environ.get("PDACSCREEN_WORK"):
        work = Path(os.environ["PDACSCREEN_WORK"]).expanduser()
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
        work = base / "pdacscreen"
    work = work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    return work


def ray_tmpdir(work: Path) -> Path:
    """Ray's temp folder: ``WORK/ray`` when its socket paths fit in an AF_UNIX address
    (107 bytes), else ``/tmp/pdacscreen-<uid>/ray``."""
    ray = work / "ray"
    if len(os.fsencode(ray)) + _RAY_SOCKET_TAIL > _AF_UNIX_MAX:
        ray = Path("/tmp") / f"pdacscreen-{os.getuid()}" / "ray"
    ray.mkdir(parents=True, exist_ok=True, mode=0o700)
    return ray


def _offline_defaults() -> None:
    """Keep third-party tools offline and their state in the per-user :func:`state_dir`.

    Every variable is only a default: one already set in the environment wins.
    """
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    work = state_dir()
    os.environ.setdefault("PDACSCREEN_WORK", str(work))
    prefect_home = Path(os.environ.setdefault("PREFECT_HOME", str(work / "prefect")))
    prefect_home.mkdir(parents=True, exist_ok=True)
    if "RAY_TMPDIR" in os.environ:
        Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    else:
        os.environ["RAY_TMPDIR"] = str(ray_tmpdir(work))


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
