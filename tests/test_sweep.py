"""The nightly sweep end to end: real Prefect flow runs, a real Ray runtime, real Parquet.

One small phantom archive (matrix 128) is generated per session and copied for each scenario.
In-process sweeps share one Prefect test server and one local Ray runtime; the kill -9 test and the
cluster test run the ``pdacscreen`` command in subprocesses, as a scheduler would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

N_STUDIES = 6
PDAC = [sys.executable, "-m", "pdacscreen.flows.cli"]


@pytest.fixture(scope="session")
def base_archive(tmp_path_factory) -> Path:
    from pdacscreen.io.phantom.archive import generate_archive

    out = tmp_path_factory.mktemp("sweep") / "archive"
    generate_archive(
        out, studies=N_STUDIES, seed=7, matrix=128, compress="mixed", pdac_fraction=0.5
    )
    return out


@pytest.fixture
def archive(base_archive, tmp_path) -> Path:
    dst = tmp_path / "archive"
    shutil.copytree(base_archive, dst)
    return dst


def sweep(archive: Path, store: Path, **kw) -> dict:
    """An in-process flow run over the archive's DICOM tree (truth and labels sit beside it)."""
    from pdacscreen.flows.sweep import nightly_sweep

    return nightly_sweep(
        archive=str(archive / "dicom"), store=str(store), n_actors=1, demo_key=True, **kw
    )


def findings(store: Path) -> pd.DataFrame:
    from pdacscreen.io.store import FindingsStore

    return FindingsStore(store).read_findings()


def series_files(archive: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in archive.rglob("*"):
        if p.is_file() and p.suffix not in (".parquet", ".gz", ".png", ".json"):
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:
                continue
            out.setdefault(str(ds.SeriesInstanceUID), []).append(p)
    return out


def test_end_to_end_one_row_per_study(archive, tmp_path, prefect_server, local_ray):
    store = tmp_path / "store"
    summary = sweep(archive, store)
    truth = pd.read_parquet(archive / "truth.parquet")
    df = findings(store)
    assert sorted(df["study_instance_uid"]) == sorted(truth["study_instance_uid"])
    assert (df["status"] == "ok").all(), df[["status", "error_code"]]
    assert summary["processed"] == N_STUDIES and summary["failed"] == 0
    assert df["pdac_probability"].between(0, 1).all()
    # The chosen series is the non-contrast one.
    merged = df.merge(truth, on="study_instance_uid")
    assert (merged["series_instance_uid"] == merged["noncontrast_series_uid"]).all()
    # Patient keys are pseudonymous: no PatientID of the archive appears in the store.
    assert not set(truth["patient_id"]) & set(df["patient_key"])
    # Body composition was attempted on every loaded series: an area or the reason there is none
    # (these matrix-128 phantoms have 3 mm pixels: resolution_too_coarse).
    measured = df["skeletal_muscle_area_cm2"].notna()
    assert (measured | df["bodycomp_qc"].notna()).all(), df[["bodycomp_qc"]]
    assert (df.loc[~measured, "bodycomp_qc"] != "not_measured").all()
    flagged = df[df["pdac_flag"]]
    for rel in flagged["evidence_path"]:
        folder = store / rel
        assert (folder / "key.png").is_file()
        assert (folder / "lesion_mask.nii.gz").is_file()
        assert (folder / "pancreas_mask.nii.gz").is_file()
    # Parquet metadata carries schema version, model version and config hash.
    import pyarrow.parquet as pq

    some = next((store / "findings").rglob("*.parquet"))
    meta = pq.read_schema(some).metadata
    keys = {k.decode() for k in meta}
    assert any("schema" in k for k in keys) and any("config" in k for k in keys)

    # Second run: incremental, nothing new, no new rows.
    again = sweep(archive, store)
    assert again["studies_planned"] == 0 and again["already_done"] == N_STUDIES
    assert len(findings(store)) == N_STUDIES


def test_incremental_adds_only_new_studies(archive, tmp_path, prefect_server, local_ray):
    from pdacscreen.io.phantom.archive import generate_archive

    store = tmp_path / "store"
    sweep(archive, store)
    extra = tmp_path / "extra"
    generate_archive(extra, studies=3, seed=7, start=N_STUDIES, matrix=128, compress="none")
    shutil.copytree(extra / "dicom", archive / "dicom" / "incoming-batch-2")
    summary = sweep(archive, store)
    assert summary["studies_planned"] == 3
    assert summary["processed"] == 3
    df = findings(store)
    assert len(df) == N_STUDIES + 3
    assert df["study_instance_uid"].is_unique


def test_bad_input_becomes_rows_and_the_rest_go_on(archive, tmp_path, prefect_server, local_ray):
    truth = pd.read_parquet(archive / "truth.parquet")
    by_series = series_files(archive)
    # 1. non-DICOM and truncated files.
    (archive / "dicom" / "notes.txt").write_text("not a dicom file")
    victim = sorted(by_series[truth.loc[0, "contrast_series_uid"]])[0]
    data = victim.read_bytes()
    (archive / "dicom" / "truncated.dcm").write_bytes(data[: len(data) // 3])
    # 2. a missing slice in study 1's non-contrast series.
    nc1 = by_series[truth.loc[1, "noncontrast_series_uid"]]
    zs = sorted(
        nc1,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    zs[len(zs) // 2].unlink()
    # 3. a study with only a contrast series (study 2's non-contrast series removed).
    for p in by_series[truth.loc[2, "noncontrast_series_uid"]]:
        p.unlink()
    # 4. an MR series, as its own study.
    mr = pydicom.dcmread(zs[0])
    mr.Modality = "MR"
    mr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    mr.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.999.1"
    mr.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.999.2"
    mr.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.999.3"
    (archive / "dicom" / "mr").mkdir()
    mr.save_as(archive / "dicom" / "mr" / "IM0001", enforce_file_format=True)

    store = tmp_path / "store"
    summary = sweep(archive, store)
    df = findings(store).set_index("study_instance_uid")
    fails = pd.read_parquet(store / "failures") if (store / "failures").exists() else None
    assert fails is not None
    codes = set(fails["error_code"])
    assert {"not_dicom", "truncated"} <= codes, codes
    assert df.loc[truth.loc[1, "study_instance_uid"], "status"] == "failed"
    assert df.loc[truth.loc[1, "study_instance_uid"], "error_code"] == "missing_slice"
    assert df.loc[truth.loc[2, "study_instance_uid"], "status"] == "skipped"
    assert df.loc[truth.loc[2, "study_instance_uid"], "error_code"] == "no_eligible_series"
    assert df.loc["1.2.826.0.1.3680043.8.498.999.1", "status"] == "skipped"
    others = truth["study_instance_uid"].iloc[3:]
    assert (df.loc[others, "status"] == "ok").all()
    assert summary["failed"] == 1 and summary["skipped"] == 2


def test_second_sweep_on_a_locked_store_exits_at_once(archive, tmp_path):
    from pdacscreen.io.store import FindingsStore

    store = tmp_path / "store"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pdacscreen.io.store import FindingsStore\n"
            "with FindingsStore(Path(sys.argv[1])).lock(sweep_id='holder'):\n"
            "    print('locked', flush=True); time.sleep(120)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        out = subprocess.run(
            [*PDAC, "sweep", str(archive / "dicom"), "--store", str(store), "--demo-key"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 3, out.stdout + out.stderr
        assert "lock" in (out.stdout + out.stderr).lower()
        assert time.monotonic() - t0 < 60  # it did not start Prefect or Ray
    finally:
        holder.kill()
        holder.wait()
    assert not FindingsStore(store).read_findings().shape[0]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(REPO / "work" / "prefect"))
    env.pop("PREFECT_API_URL", None)
    return env


def test_kill_9_then_rerun_is_exactly_once(archive, tmp_path):
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
    proc = subprocess.Popen(
        cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            parts = (
                list((store / "findings").rglob("*.parquet"))
                if (store / "findings").exists()
                else []
            )
            if parts or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (
            "sweep finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = findings(store)
    assert 0 < len(before) < N_STUDIES
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    after = findings(store)
    truth = pd.read_parquet(archive / "truth.parquet")
    assert sorted(after["study_instance_uid"]) == sorted(
        truth["study_instance_uid"]
    )  # no gap, no double
    # The rows written before the kill are kept as they were.
    kept = after.set_index("study_instance_uid").loc[before["study_instance_uid"], "sweep_id"]
    assert list(kept) == list(before["sweep_id"])
    # No partial files are visible.
    assert not [
        p for p in store.rglob("*") if p.name.startswith((".", "_")) and p.suffix == ".parquet"
    ]


def _stop_ray_session(temp: Path) -> None:
    """Stop only the Ray processes of the head started with ``--temp-dir temp``.

    ``ray stop`` would kill every Ray process on the machine, including this test session's own
    local runtime (whose driver then exits when its GCS disappears).
    """
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(proc.info["cmdline"] or []):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@contextlib.contextmanager
def _ray_cluster(workers: int):
    """A real multi-node Ray cluster on this machine: a head and ``workers`` worker nodes (each
    its own raylet, 2 logical CPUs), started with `ray start` as an operator would. Yields
    ``(address, env, worker node-manager ports)``."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = 6390 + os.getpid() % 50
    temp = Path(f"/tmp/pdac-rh-{os.getpid()}")  # short: Ray's socket paths must stay < 108 bytes
    env = _env()
    # Ray >= 2.5x: a head started by `ray start` uses token auth; the head and every client must
    # agree on RAY_AUTH_MODE and share the token (README, "Running on a Ray cluster").
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    common = ["--num-cpus=2", "--disable-usage-stats"]
    head = [f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false"]
    node_ports = [port + 100 + i for i in range(workers)]
    try:
        for args in [["--head", *head]] + [
            [f"--address=127.0.0.1:{port}", f"--node-manager-port={p}"] for p in node_ports
        ]:
            start = subprocess.run(
                [ray_bin, "start", *args, *common],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert start.returncode == 0, start.stdout + start.stderr
        yield f"127.0.0.1:{port}", env, node_ports
    finally:
        _stop_ray_session(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _manifest(store: Path) -> dict:
    import json

    (path,) = sorted((store / "sweeps").glob("*.json"))[-1:]
    return json.loads(path.read_text())


def test_sweep_on_a_two_node_ray_cluster_by_address(archive, tmp_path):
    with _ray_cluster(workers=1) as (address, env, _):
        store = tmp_path / "store"
        cmd = [*PDAC, "sweep", str(archive / "dicom"), "--store", str(store)]
        out = subprocess.run(
            [*cmd, "--ray-address", address, "--limit", "4", "--demo-key"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        df = findings(store)
        assert len(df) == 4 and (df["status"] == "ok").all()
        summary = _manifest(store)["summary"]
        # one engine actor per node (SPREAD): both nodes ran studies
        by_node = summary["studies_by_node"]
        assert len(by_node) == 2 and sum(by_node.values()) == 4, by_node


def _raylet(node_port: int):
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "raylet" in cmd and f"--node_manager_port={node_port}" in cmd:
            return proc
    return None


def test_losing_a_ray_node_mid_sweep_is_exactly_once(archive, tmp_path):
    """A worker node dies (its raylet and every process on it SIGKILLed) while an engine actor
    on it holds a study: the pool resubmits that work on the surviving node; every study once."""
    import psutil

    with _ray_cluster(workers=1) as (address, env, (node_port,)):
        store = tmp_path / "store"
        cmd = [*PDAC, "sweep", str(archive / "dicom"), "--store", str(store)]
        proc = subprocess.Popen(
            [*cmd, "--ray-address", address, "--demo-key"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its Prefect server inherits the pipe: kill them together
        )
        raylet = _raylet(node_port)
        assert raylet is not None

        def actor_titles() -> list[str]:
            titles = []
            for kid in raylet.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                    titles.append(" ".join(kid.cmdline()))
            return [t for t in titles if "EngineActor" in t]

        # Kill the node while its engine actor holds a study ("ray::EngineActor.process"); an
        # actor placed there but not seen busy for 60 s (polling can miss a study) is killed idle.
        deadline, placed_at = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            titles = actor_titles()
            if any("EngineActor.process" in t for t in titles):
                break
            if titles and placed_at is None:
                placed_at = time.monotonic()
            if placed_at is not None and time.monotonic() - placed_at > 60:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before the worker node could be killed"
        assert actor_titles(), "no engine actor was ever placed on the worker node"
        for victim in [raylet, *raylet.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        try:
            output, _ = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate(timeout=30)
            raise AssertionError("the sweep hung after losing a node:\n" + output[-4000:]) from None
        assert proc.returncode == 0, output[-4000:]
    df = findings(store)
    assert df["study_instance_uid"].is_unique and len(df) == N_STUDIES
    assert (df["status"] == "ok").all(), df[["status", "error_code"]]


def test_pool_retries_a_dead_actors_work(tmp_path, local_ray):
    import ray

    from pdacscreen.flows.ray_pool import WorkItem, run_pool

    # Defined here so Ray ships them by value (workers cannot import the tests folder).
    class CrashOnce:
        """An engine actor that dies (process exit) the first time it sees study-2."""

        def __init__(self, marker: str) -> None:
            self.marker = Path(marker)

        def process(self, key, loaded):
            if key == "study-2" and not self.marker.exists():
                self.marker.write_text("crashed")
                os._exit(1)
            return {"key": key, "sum": float(np.sum(loaded))}

    def _load(payload):
        return np.full(4, payload, dtype=np.float64)

    cls = ray.remote(CrashOnce).options(num_cpus=0.5)
    marker = str(tmp_path / "crashed")
    items = [WorkItem(f"study-{i}", i) for i in range(5)]
    outs = {
        o.key: o
        for o in run_pool(
            items, load=_load, actor_factory=lambda: cls.remote(marker), n_actors=1, max_in_flight=2
        )
    }
    assert sorted(outs) == [f"study-{i}" for i in range(5)]
    assert all(o.error_code is None for o in outs.values()), [
        (o.key, o.error_code, o.message) for o in outs.values()
    ]
    assert outs["study-2"].attempts == 2 and outs["study-2"].value["sum"] == 8.0
    assert Path(marker).exists()


@pytest.mark.parametrize("room", [1, 2])
def test_a_dead_actor_is_replaced_only_if_the_cluster_has_room(tmp_path, local_ray, room):
    """Two actors; one dies. Its slot waits (the cluster may still count a lost node), then is
    refilled if ``capacity()`` says there is room, else the pool goes on with one actor."""
    import ray

    from pdacscreen.flows.ray_pool import WorkItem, run_pool

    class Engine:
        def __init__(self, marker: str) -> None:
            self.marker = Path(marker)

        def process(self, key, loaded):
            if key == "study-1" and not self.marker.exists():
                self.marker.write_text("crashed")
                os._exit(1)
            return os.getpid()

    def _load(payload):
        time.sleep(0.5)
        return payload

    cls = ray.remote(Engine).options(num_cpus=0.25)
    made = []

    def factory():
        made.append(cls.remote(str(tmp_path / "crashed")))
        return made[-1]

    items = [WorkItem(f"study-{i}", i) for i in range(20)]
    outs = list(
        run_pool(
            items,
            load=_load,
            actor_factory=factory,
            n_actors=2,
            max_in_flight=3,
            capacity=lambda: room,
            replace_after_s=1.0,
        )
    )
    assert sorted(o.key for o in outs) == sorted(i.key for i in items)
    assert all(o.error_code is None for o in outs), [(o.key, o.message) for o in outs]
    assert [o.attempts for o in outs if o.key == "study-1"] == [2]
    assert len(made) == 2 + (room == 2)  # replaced only when there was room


def test_a_hung_loader_is_killed_and_the_pool_goes_on(local_ray):
    """A decoder that never returns (as on a corrupted JPEG-LS codestream) costs one study."""
    import ray

    from pdacscreen.flows.ray_pool import WorkItem, run_pool

    class Engine:
        def process(self, key, loaded):
            return float(np.sum(loaded))

    def _load(payload):
        if payload == 1:
            time.sleep(3600)  # hangs
        return np.full(4, payload, dtype=np.float64)

    cls = ray.remote(Engine).options(num_cpus=0.5)
    items = [WorkItem(f"study-{i}", i) for i in range(4)]
    t0 = time.monotonic()
    outs = {
        o.key: o
        for o in run_pool(
            items,
            load=_load,
            actor_factory=cls.remote,
            n_actors=1,
            max_in_flight=2,
            load_options={"num_cpus": 0.5},
            load_timeout_s=3.0,
        )
    }
    assert sorted(outs) == [f"study-{i}" for i in range(4)]
    assert outs["study-1"].error_code == "decode_timeout"
    assert [outs[f"study-{i}"].value for i in (0, 2, 3)] == [0.0, 8.0, 12.0]
    assert time.monotonic() - t0 < 600  # (not a timing assertion: it did not wait an hour)


def test_deployment_has_a_nightly_cron_schedule(tmp_path):
    from pdacscreen.flows.deploy import DEFAULT_CRON, build_deployment

    dep = build_deployment(archive=str(tmp_path / "a"), store=str(tmp_path / "s"))
    crons = [s.schedule.cron for s in dep.schedules]
    assert crons == [DEFAULT_CRON]
    assert dep.parameters["store"].endswith("s")


def test_follow_up_archive_swept_gives_timelines_and_lead_time(tmp_path, prefect_server, local_ray):
    """Phantom follow-ups as DICOM: swept like any archive, one patient key per patient, its
    studies in date order in the timeline, the skeletal muscle index where PatientSize is
    written, and ``evaluate --diagnoses`` on the archive's diagnoses.csv."""
    from pdacscreen.flows.leadtime import evaluate_lead_time
    from pdacscreen.flows.timeline import patient_timeline
    from pdacscreen.io.phantom.archive import generate_archive

    arch, store = tmp_path / "fu", tmp_path / "store"
    # matrix 256: body composition needs pixels under 2 mm (matrix 128 has about 3 mm)
    generate_archive(arch, studies=2, seed=77, matrix=256, follow_up_months=(0, 12, 24))
    truth = pd.read_parquet(arch / "truth.parquet")
    assert (
        len(truth) == 6
        and truth.groupby("patient_id")["visit_months"]
        .apply(list)
        .map(lambda m: m == [0.0, 12.0, 24.0])
        .all()
    )
    summary = sweep(arch, store)
    assert summary["processed"] == 6 and summary["failed"] == 0
    df = findings(store).merge(truth, on="study_instance_uid")
    assert (df["status"] == "ok").all() and len(df) == 6
    keys = df.groupby("patient_id")["patient_key"].nunique()
    assert (keys == 1).all() and df["patient_key"].nunique() == 2  # keyed hash per patient
    assert not df["patient_key"].isin(truth["patient_id"]).any()
    tall = truth["patient_height_m"].notna()
    assert 0 < tall.sum() < 6  # seed 77: patient 1 has a PatientSize, patient 0 none
    for _, group in df.groupby("patient_id"):
        tl = patient_timeline(store, group["patient_key"].iloc[0]).to_pylist()
        assert [r["study_instance_uid"] for r in tl] == list(
            group.sort_values("visit_months")["study_instance_uid"]
        )
        smi = group["skeletal_muscle_index_cm2_m2"]
        height = group["patient_height_m"]
        muscle = group["skeletal_muscle_area_cm2"]
        assert smi.notna().equals(height.notna() & muscle.notna())
        ok = smi.notna()
        # both columns are rounded to 0.01
        np.testing.assert_allclose(smi[ok], muscle[ok] / height[ok] ** 2, atol=0.01)
    measured = df["skeletal_muscle_index_cm2_m2"].notna()
    assert measured.any() and not measured[df["patient_height_m"].isna()].any()
    lt = evaluate_lead_time(store, arch / "diagnoses.csv", n_boot=50)
    counts = lt.metrics["counts"]
    progressor = int((truth["course"] == "progressor").sum())
    assert counts["positive_studies"] == progressor
    assert counts["negative_studies"] == 6 - progressor
    assert progressor == 3  # one progressor, three pre-diagnostic studies (2, 14, 26 months)
    intervals = sorted(lt.lead.cases.loc[lt.lead.cases["y"], "interval_months"].round(1))
    assert intervals == [2.0, 14.0, 26.0]
