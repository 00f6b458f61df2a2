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


# ---------------------------------------------------------------- faults during a sweep
N_FAULT_STUDIES = 4


@pytest.fixture(scope="module")
def fault_archive(tmp_path_factory) -> Path:
    from pdacscreen.io.phantom.archive import generate_archive

    out = tmp_path_factory.mktemp("faults") / "archive"
    generate_archive(out, studies=N_FAULT_STUDIES, seed=21, matrix=128, workers=1)
    return out


@pytest.fixture
def archive(fault_archive, tmp_path) -> Path:
    dst = tmp_path / "archive"
    shutil.copytree(fault_archive, dst)
    return dst


def _sweep(archive: Path, store: Path, **kw) -> dict:
    from pdacscreen.flows.sweep import nightly_sweep

    return nightly_sweep(
        archive=str(archive / "dicom"), store=str(store), n_actors=1, demo_key=True, **kw
    )


def _exactly_once(archive: Path, store: Path):
    import pandas as pd

    from pdacscreen.io.store import FindingsStore

    fs = FindingsStore(store)
    df = fs.read_findings()
    truth = pd.read_parquet(archive / "truth.parquet")
    assert sorted(df["study_instance_uid"]) == sorted(truth["study_instance_uid"])
    assert fs.dedupe_check() == 0
    assert not [p for p in store.rglob("*") if p.is_file() and ".tmp-" in p.name]
    return df


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_a_rerun_completes(archive, tmp_path):
    import json
    import signal
    import time

    from pdacscreen.io.store import FindingsStore

    store = tmp_path / "store"
    cmd = [
        *PDAC,
        "sweep",
        str(archive / "dicom"),
        "--store",
        str(store),
        "--flush-every",
        "1",
        "--actors",
        "1",
        "--demo-key",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if list((store / "findings").rglob("*.parquet")) if (store / "findings").exists() else []:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "sweep ended before SIGTERM: " + proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGTERM)  # the driver only, as a scheduler's stop would
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM" in out
    manifests = [json.loads(p.read_text()) for p in (store / "sweeps").glob("*.json")]
    stopped = [m for m in manifests if m.get("status") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["summary"]["status"] == "stopped", manifests
    before = FindingsStore(store).read_findings()
    assert 0 < len(before) < N_FAULT_STUDIES
    assert before["study_instance_uid"].is_unique
    assert stopped[0]["summary"]["processed"] == len(before)  # the batch was flushed, counted
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = _exactly_once(archive, store)
    kept = after.set_index("study_instance_uid").loc[before["study_instance_uid"], "sweep_id"]
    assert list(kept) == list(before["sweep_id"])


@pytest.mark.slow
def test_disk_full_mid_sweep_stops_with_a_clear_error_and_a_rerun_completes(
    archive, tmp_path, monkeypatch, prefect_server, local_ray
):
    import errno

    from pdacscreen.io.errors import ErrorCode, StoreError
    from pdacscreen.io.store import FindingsStore

    store = tmp_path / "store"
    findings_dir = str((store / "findings").resolve())
    real_write = os.write
    parts = []

    def write(fd, data):  # the first findings part goes in; the next meets a full disk halfway
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(findings_dir):
            parts.append(target)
            if len(set(parts)) > 1:
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(StoreError) as err:
        _sweep(archive, store, flush_every=1)
    assert err.value.code == ErrorCode.STORE_FULL and "disk is full" in str(err.value)
    monkeypatch.undo()
    fs = FindingsStore(store)
    visible = sorted((store / "findings").rglob("*.parquet"))
    assert len(visible) == 1  # only the complete part; the half-written one is gone
    assert not [p for p in (store / "findings").rglob("*") if p.name.startswith(".")]
    assert len(fs.read_findings()) == 1 and not (store / "quarantine").exists()
    summary = _sweep(archive, store)
    assert summary["already_done"] == 1 and summary["processed"] == N_FAULT_STUDIES - 1
    _exactly_once(archive, store)


@pytest.mark.slow
def test_files_that_vanish_or_change_between_index_and_load(
    archive, tmp_path, monkeypatch, prefect_server, local_ray
):
    from pdacscreen.flows import sweep as sweep_mod
    from pdacscreen.io.store import FindingsStore

    real_plan = sweep_mod.plan
    damaged: dict[str, str] = {}

    def plan_then_damage(selections, done, limit):
        todo = real_plan.fn(selections, done, limit)
        chosen = [s for s in todo if s.status == "selected"]
        vanish, change = chosen[0], chosen[1]
        files = sorted(map(str, vanish.files))
        os.unlink(files[len(files) // 2])  # a slice vanishes after the index saw it
        victim = Path(sorted(map(str, change.files))[1])
        victim.write_bytes(os.urandom(victim.stat().st_size))  # overwritten in place
        damaged.update(vanish=vanish.study_instance_uid, change=change.study_instance_uid)
        return todo

    monkeypatch.setattr(sweep_mod, "plan", plan_then_damage)
    summary = _sweep(archive, tmp_path / "store")
    df = _exactly_once(archive, tmp_path / "store").set_index("study_instance_uid")
    for uid in damaged.values():
        assert df.loc[uid, "status"] == "failed" and df.loc[uid, "error_code"], df.loc[uid]
    others = df.drop(index=list(damaged.values()))
    assert (others["status"] == "ok").all(), others[["status", "error_code"]]
    assert summary["failed"] == 2 and summary["ok"] == N_FAULT_STUDIES - 2
    fails = FindingsStore(tmp_path / "store").read_failures()
    study_fails = fails[fails["scope"] == "study"].set_index("study_instance_uid")
    assert set(damaged.values()) <= set(study_fails.index)
    assert set(study_fails.loc[list(damaged.values()), "stage"]) == {"load"}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
def test_read_only_archive_and_a_clock_behind_the_store(
    archive, tmp_path, prefect_server, local_ray
):
    """The sweep writes nothing into the archive (read-only folders), and with the store's last
    sweep dated in the future (a clock gone backwards) its sweep id and part names still follow."""
    import json
    import stat

    from pdacscreen.io.store import FindingsStore

    store = tmp_path / "store"
    (store / "sweeps").mkdir(parents=True)
    future = "20991231T235959Z-otherhost-1"
    (store / "sweeps" / f"{future}.json").write_text(json.dumps({"sweep_id": future}))
    before = _tree(archive)
    for p in [archive, *archive.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        enforced = True
        try:
            (archive / "dicom" / "probe").write_text("x")
            enforced = False  # root: permissions do not bind; the tree comparison still does
            (archive / "dicom" / "probe").unlink()
        except PermissionError:
            pass
        summary = _sweep(archive, store)
    finally:
        for p in [archive, *archive.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert _tree(archive) == before  # nothing written, renamed or touched in the archive
    if not enforced:
        print("read-only archive: running as root, chmod does not bind; checked by tree compare")
    assert summary["ok"] + summary["not_assessable"] == N_FAULT_STUDIES
    _exactly_once(archive, store)
    assert summary["sweep_id"] > future
    fs = FindingsStore(store)
    names = [p.name for d in ("findings", "failures") for p in (store / d).rglob("part-*.parquet")]
    assert names and all(n.startswith(f"part-{summary['sweep_id']}-") for n in names)
    assert len(names) == len(set(names))
    assert set(fs.read_findings()["sweep_id"]) == {summary["sweep_id"]}
