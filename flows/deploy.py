"""Scheduling: the nightly sweep as a Prefect deployment with a cron schedule.

``pdacscreen serve ARCHIVE --store DIR`` registers the deployment and runs scheduled sweeps in this
process until stopped (Prefect's ``flow.serve``). Point ``PREFECT_API_URL`` at a Prefect server to
keep the schedule and run history across restarts (``prefect server start``); without it Prefect
uses its ephemeral API. ``infra/prefect.yaml`` holds the same deployment for ``prefect deploy``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_CRON = "0 2 * * *"  # 02:00 every night, in DEFAULT_TIMEZONE
DEFAULT_TIMEZONE = "UTC"
DEPLOYMENT_NAME = "nightly"


def build_deployment(
    *,
    archive: str,
    store: str,
    model: str | None = None,
    ray_address: str | None = None,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    name: str = DEPLOYMENT_NAME,
) -> Any:
    """The sweep as a ``RunnerDeployment`` with a cron schedule (nothing is started)."""
    from prefect.schedules import Cron

    from pdacscreen.flows.sweep import nightly_sweep

    params: dict[str, Any] = {"archive": archive, "store": store}
    if model:
        params["model"] = model
    if ray_address:
        params["ray_address"] = ray_address
    return nightly_sweep.to_deployment(
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters=params,
        description="Nightly pdacscreen sweep of a CT archive (research software).",
        tags=["pdacscreen", "nightly"],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument(
        "--cron", default=DEFAULT_CRON, help=f"cron schedule (default {DEFAULT_CRON!r})"
    )
    parser.add_argument("--timezone", default=DEFAULT_TIMEZONE)


def run(args: argparse.Namespace) -> int:
    from prefect import serve

    deployment = build_deployment(
        archive=str(args.archive.resolve()),
        store=str(args.store.resolve()),
        model=str(args.model.resolve()) if args.model else None,
        ray_address=args.ray_address,
        cron=args.cron,
        timezone=args.timezone,
    )
    serve(deployment)
    return 0
