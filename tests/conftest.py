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
