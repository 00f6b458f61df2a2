"""Shared test fixtures and settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "fixtures" / "real-ct"

# Offline and inside the project's work folder, for every test (the Makefile sets the same).
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_HOME", str(REPO / "work" / "prefect"))
os.environ.setdefault("RAY_TMPDIR", str(REPO / "work" / "ray"))


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The read-only real CT fixtures in ../shared; skips where a plain clone has none."""
    if not REAL_CT.is_dir():
        pytest.skip(
            f"real CT fixtures not found at {REAL_CT} (../shared is absent in a plain clone)"
        )
    return REAL_CT


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for every in-process flow run of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray runtime (2 CPUs) for every in-process sweep and pool test of the session."""
    import ray

    from pdacscreen.flows.ray_pool import init_ray

    init_ray(None, num_cpus=2, temp_dir=os.environ.get("RAY_TMPDIR"))
    yield
    ray.shutdown()
