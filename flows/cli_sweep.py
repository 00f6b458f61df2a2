"""``pdacscreen sweep``: run a nightly sweep (Prefect flow, Ray fan-out) with a progress bar."""

from __future__ import annotations

import argparse
from pathlib import Path

from pdacscreen.flows.sweep import PROGRESS, nightly_sweep

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path, help="folder tree of DICOM files (any depth)")
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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from pdacscreen.io.errors import PdacscreenError
    from pdacscreen.io.store import FindingsStore

    console = Console()
    store = FindingsStore(args.store)
    try:  # fail at once, before Prefect and Ray start, if another sweep holds the store
        with store.lock(sweep_id="precheck"):
            pass
    except PdacscreenError as e:
        console.print(f"[red]{e}[/red]")
        return 3
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
                rules=str(args.rules) if args.rules else None,
                n_actors=args.actors,
                flush_every=args.flush_every,
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
        "skipped",
        "failed",
        "file_errors",
    ):
        table.add_row(key.replace("_", " "), str(summary[key]))
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
    console.print(
        f'query:     pdacscreen query {root} "SELECT * FROM latest_findings WHERE pdac_flag"'
    )
    console.print(
        f"[dim]model {summary['model_name']} {summary['model_version']}: reference model trained on "
        "synthetic phantoms, not a clinical device.[/dim]"
    )
    return 0
