"""Faults: a first run from an empty folder with a bare environment, a corrupted Parquet part left
in the store by another tool, and a full disk during a findings write."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ingest_synth import write_series

from pdacscreen.flows.cli import _AF_UNIX_MAX, _RAY_SOCKET_TAIL, ray_tmpdir, state_dir

PDAC = [sys.executable, "-m", "pdacscreen.flows.cli"]


def _bare_env(home: Path) -> dict[str, str]:
    """What a new user's shell holds: PATH and HOME, nothing of ours (no PREFECT_*, RAY_*)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}


def test_state_folder_is_per_user_and_created_on_demand(tmp_path, monkeypatch):
    monkeypatch.delenv("PDACSCREEN_WORK", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "pdacscreen"
    assert state_dir().is_dir()
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "pdacscreen"
    monkeypatch.setenv("PDACSCREEN_WORK", str(tmp_path / "mine"))
    assert state_dir() == tmp_path / "mine" and state_dir().is_dir()
    # a short folder keeps Ray inside it; a deep one falls back to /tmp/pdacscreen-<uid>/ray
    short = Path(tempfile.mkdtemp(prefix="pw", dir="/tmp"))
    try:
        assert ray_tmpdir(short) == short / "ray" and (short / "ray").is_dir()
    finally:
        shutil.rmtree(short)
    deep = tmp_path / ("d" * 90)
    ray = ray_tmpdir(deep)
    assert ray == Path("/tmp") / f"pdacscreen-{os.getuid()}" / "ray" and ray.is_dir()
    assert len(os.fsencode(ray)) + _RAY_SOCKET_TAIL <= _AF_UNIX_MAX


def test_index_from_an_empty_folder_with_a_bare_environment(tmp_path):
    write_series(tmp_path / "archive" / "s1", n=4, patient_id="PAT-BARE-1")
    cwd, home = tmp_path / "empty", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    out = subprocess.run(
        [
            *PDAC,
            "index",
            str(tmp_path / "archive"),
            "--index",
            str(tmp_path / "idx"),
            "--demo-key",
            "--workers",
            "1",
        ],
        cwd=cwd,
        env=_bare_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "new=4" in out.stdout
    assert list(cwd.iterdir()) == []  # nothing written into the current folder
    assert (home / ".local" / "state" / "pdacscreen" / "prefect").is_dir()


def test_index_without_a_key_refuses_with_a_how_to(tmp_path):
    write_series(tmp_path / "archive" / "s1", n=2)
    (tmp_path / "home").mkdir()
    out = subprocess.run(
        [*PDAC, "index", str(tmp_path / "archive"), "--index", str(tmp_path / "idx")],
        cwd=tmp_path,
        env=_bare_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "pseudonym key" in out.stdout and "Traceback" not in out.stderr
    assert not (tmp_path / "idx" / "parts").exists()


@pytest.mark.slow
def test_sweep_from_an_empty_folder_with_a_bare_environment(tmp_path):
    from pdacscreen.io.phantom.archive import generate_archive
    from pdacscreen.io.store import FindingsStore

    generate_archive(tmp_path / "archive", studies=2, seed=5, matrix=128, workers=1)
    cwd, home = tmp_path / "empty", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    out = subprocess.run(
        [
            *PDAC,
            "sweep",
            str(tmp_path / "archive" / "dicom"),
            "--store",
            str(tmp_path / "store"),
            "--demo-key",
            "--actors",
            "1",
        ],
        cwd=cwd,
        env=_bare_env(home),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert list(cwd.iterdir()) == []
    assert len(FindingsStore(tmp_path / "store").read_findings()) == 2
