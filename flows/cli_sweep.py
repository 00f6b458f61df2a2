"""``pdacscreen sweep``: run a nightly sweep (Prefect flow, Ray fan-out) with a progress bar."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import socket
from pathlib import Path

from pdacscreen.flows.cli import add_key_argument, key_or_none
from pdacscreen.flows.config import DICOM_RESULTS
from pdacscreen.flows.sweep import PROGRESS, nightly_sweep
from pdacscreen.io.dicomweb import is_dicomweb
from pdacscreen.io.errors import ErrorCode

__all__ = ["add_arguments", "run", "start_prefect"]

log = logging.getLogger(__name__)

PREFECT_HELP = (
    "the local Prefect API could not start on this (loaded?) machine. Either start a server once "
    "(`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`) or allow "
    "the temporary one more time: `export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600`"
)


def start_prefect(*, attempts: int = 3) -> str | None:
    """Start Prefect's ephemeral API before the flow runs, retrying a slow start.

    Returns None when the API is up (or ``PREFECT_API_URL`` points at a server), else the last
    error message.  Each retry doubles the start-up timeout; the flow then reuses the running
    server (Prefect keeps one per process).
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    timeout = int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    error = None
    for attempt in range(1, attempts + 1):
        server = SubprocessASGIServer()
        try:
            server.start(timeout=timeout)
            return None
        except RuntimeError as e:
            error = str(e).split(" stdout:")[0]
            log.warning(
                "Prefect API start %d/%d failed after %d s: %s", attempt, attempts, timeout, error
            )
            if server.server_process is not None and server.server_process.poll() is None:
                server.server_process.terminate()
            timeout *= 2
    return error


def _record_failed_sweep(store: Path, message: str) -> Path:
    """A failed sweep is a record in STORE/sweeps/, not a traceback."""
    folder = store / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    path = folder / f"{now:%Y%m%dT%H%M%SZ}-{socket.gethostname()[:12]}-{os.getpid()}.json"
    record = {
        "status": "failed",
        "error_code": str(ErrorCode.ORCHESTRATOR_UNAVAILABLE),
        "message": message[:2000],
        "help": PREFECT_HELP,
        "written_at": now.isoformat(),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "archive",
        type=str,
        help="folder tree of DICOM files (any depth), or a DICOMweb service "
        "dicomweb+http(s)://HOST:PORT/dicom-web (credentials from PDACSCREEN_DICOMWEB_USER + "
        "_PASSWORD(_FILE) or PDACSCREEN_DICOMWEB_TOKEN(_FILE), never on the command line)",
    )
    parser.add_argument("--store", type=Path, required=True, help="findings store folder")
    parser.add_argument(
        "--model", type=Path, default=None, help="model package (default: reference)"
    )
    parser.add_argument("--ray-address", default=None, help="join a Ray cluster (default: local)")
    parser.add_argument("--limit", type=int, default=None, help="process at most N studies")
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "onnxruntime", "torch", "tensorrt"]
    )
    parser.add_argument("--rules", type=Path, default=None, help="series selection rules (JSON)")
    parser.add_argument(
        "--actors", type=int, default=None, help="engine actors (default: by CPU/GPU)"
    )
    parser.add_argument(
        "--flush-every", type=int, default=8, help="studies per atomic findings file (default 8)"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "int8"],
        help="engine precision",
    )
    add_key_argument(parser)
    parser.add_argument(
        "--study-date", default=None, help="DICOMweb: QIDO StudyDate range, e.g. 20240101-"
    )
    parser.add_argument(
        "--ca-bundle", default=None, help="DICOMweb over https: a CA bundle file to trust"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="DICOMweb over https: do not verify the certificate (trials only)",
    )
    parser.add_argument(
        "--dicom-results",
        default="all",
        choices=list(DICOM_RESULTS),
        help="which studies get a DICOM SEG + TID 1500 SR in STORE/dicom/: all (every ok "
        "study, i.e. every study with a pancreas; default), flagged, or none",
    )
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="DICOMweb only: send the SEG and SR to the source PACS by STOW-RS (same "
        "credentials as the source); objects an earlier run failed to send are sent again",
    )
    parser.add_argument(
        "--hash-paths",
        action="store_true",
        help="name files in failures rows by keyed hashes of their archive paths "
        "(for archives whose folders are named after patients)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from pdacscreen.io.errors import PdacscreenError
    from pdacscreen.io.store import FindingsStore

    console = Console()
    if args.write_back and (not is_dicomweb(str(args.archive)) or args.dicom_results == "none"):
        console.print(
            "[red]--write-back sends the results back to a DICOMweb source: it needs a "
            "dicomweb+http(s):// archive and --dicom-results all or flagged[/red]"
        )
        return 2
    if key_or_none(args, console) is None:  # refuse at once, before Prefect and Ray start
        return 2
    store = FindingsStore(args.store)
    try:  # fail at once, before Prefect and Ray start, if another sweep holds the store
        with store.lock(sweep_id="precheck"):
            pass
    except PdacscreenError as e:
        console.print(f"[red]{e}[/red]")
        return 3
    error = start_prefect()
    if error is not None:
        record = _record_failed_sweep(args.store, error)
        console.print(f"[red]sweep failed: {PREFECT_HELP}[/red]\n({error}; recorded in {record})")
        return 4
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task_id = bar.add_task("studies", total=None)

        def on_progress(event: str, n: int) -> None:
            if event == "total":
                bar.update(task_id, total=n)
            else:
                bar.advance(task_id, n)

        token = PROGRESS.set(on_progress)
        try:
            summary = nightly_sweep(
                archive=str(args.archive),
                store=str(args.store),
                model=str(args.model) if args.model else None,
                ray_address=args.ray_address,
                limit=args.limit,
                backend=args.backend,
                precision=args.precision,
                rules=str(args.rules) if args.rules else None,
                n_actors=args.actors,
                flush_every=args.flush_every,
                demo_key=args.demo_key,
                hash_paths=args.hash_paths,
                study_date=args.study_date,
                tls_verify=not args.insecure,
                ca_bundle=args.ca_bundle,
                dicom_results=args.dicom_results,
                write_back=args.write_back,
            )
        except PdacscreenError as e:
            console.print(f"[red]sweep failed: {e}[/red]")
            return 3 if getattr(e, "code", "") == "store_locked" else 1
        finally:
            PROGRESS.reset(token)
    table = Table(title=f"sweep {summary['sweep_id']}", show_header=False)
    for key in (
        "studies_in_archive",
        "already_done",
        "studies_planned",
        "processed",
        "ok",
        "flagged",
        "not_assessable",
        "skipped",
        "failed",
        "file_errors",
        "dicom_written",
        "dicom_sent",
        "dicom_failed",
    ):
        table.add_row(key.replace("_", " "), str(summary[key]))
    table.add_row("engine", ", ".join(summary.get("engine_backends") or []) or "-")
    table.add_row("studies per hour", f"{summary['studies_per_hour']:.0f}")
    for code, n in sorted(summary["errors_by_code"].items()):
        table.add_row(f"error: {code}", str(n))
    for stage, seconds in summary.get("stage_seconds", {}).items():
        table.add_row(f"time in {stage} (s)", f"{seconds:.1f}")
    console.print(table)
    root = Path(summary["store"])
    console.print(f"findings:  {root / 'findings'}")
    console.print(f"failures:  {root / 'failures'}")
    console.print(f"evidence:  {root / 'evidence'}")
    console.print(f"dicom:     {root / 'dicom'} (records: {root / 'dicom_exports'})")
    console.print(f"manifest:  {summary['manifest']}")
    console.print(
        f'query:     pdacscreen query {root} "SELECT * FROM latest_findings WHERE pdac_flag"'
    )
    console.print(
        f"[dim]model {summary['model_name']} {summary['model_version']}: reference model trained on "
        "synthetic phantoms, not a clinical device.[/dim]"
    )
    if summary.get("status") == "stopped":
        console.print("[yellow]stopped by SIGTERM: run the sweep again to finish[/yellow]")
        return 143  # 128 + SIGTERM, as a shell reports a job stopped by it
    return 0
