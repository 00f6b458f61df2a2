"""Nightly sweep speed on a matrix-512 phantom archive (mixed compression), three ways in one run.

* sweep (headline): ``nightly_sweep(n_actors=1)`` in-process, on a fresh store, inside
  ``prefect_test_harness()`` with a local Ray (``num_cpus=2``); timed from before the Prefect test
  server starts to the flow's return, so Prefect and Ray start-up are *included*.  The fan-out task
  alone (from Prefect's task-run record) and the flow alone are printed beside it.
* decode floor: the very series the sweep chose (read back from its findings), only read and
  decoded: ``load_series(workers=2)``, one study after the other (decoder pool warmed first).
* naive: per study, a pydicom loop, ``scipy.ndimage.zoom(order=1)`` of the whole volume to the
  stage-2 spacing and the stage-2 network in torch eager mode, sliding window over the whole scan
  (:mod:`baselines`).

All archive files are read once beforehand so every side sees a warm page cache.  Only
correctness is asserted (one ok row per study, the same series and HU everywhere), never speed.
The archive is cached under ``work/bench/`` keyed by its parameters (``generate_archive`` resumes).
Env: ``PDACSCREEN_BENCH_SWEEP_STUDIES`` (default 3), ``PDACSCREEN_BENCH_SWEEP_MATRIX`` (512).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from baselines import naive_whole_abdomen, torch_eager_predictor
from conftest import REPO

pytestmark = pytest.mark.bench

N_STUDIES = int(os.environ.get("PDACSCREEN_BENCH_SWEEP_STUDIES", "3"))
MATRIX = int(os.environ.get("PDACSCREEN_BENCH_SWEEP_MATRIX", "512"))
SEED = 512
COMPRESS = "mixed"


def _archive() -> tuple[Path, float]:
    """The cached phantom archive (generated on first use); returns (folder, seconds spent)."""
    from pdacscreen.io.phantom.archive import generate_archive

    out = REPO / "work" / "bench" / f"sweep-archive-s{SEED}-m{MATRIX}-n{N_STUDIES}-{COMPRESS}"
    t = time.perf_counter()
    summary = generate_archive(
        out, studies=N_STUDIES, seed=SEED, matrix=MATRIX, compress=COMPRESS, workers=2
    )
    assert summary.studies_total == N_STUDIES
    return out, time.perf_counter() - t


def _warm_cache(root: Path) -> int:
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass
            n += 1
    return n


def _task_seconds(flow_run_id) -> dict[str, float]:
    """Wall seconds of each task run of the flow run, by task name (Prefect's own record)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out: dict[str, float] = {}
    for r in runs:
        if r.start_time and r.end_time:
            name = r.name.rsplit("-", 1)[0]
            out[name] = out.get(name, 0.0) + (r.end_time - r.start_time).total_seconds()
    return out


def _run_sweep(archive: Path, store: Path) -> dict:
    import ray
    from prefect.testing.utilities import prefect_test_harness

    from pdacscreen.flows.ray_pool import init_ray
    from pdacscreen.flows.sweep import nightly_sweep

    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        t1 = time.perf_counter()
        init_ray(None, num_cpus=2, temp_dir=os.environ.get("RAY_TMPDIR"))
        t2 = time.perf_counter()
        state = nightly_sweep(
            archive=str(archive / "dicom"),
            store=str(store),
            n_actors=1,
            demo_key=True,
            return_state=True,
        )
        t3 = time.perf_counter()
        summary = state.result()
        tasks = _task_seconds(state.state_details.flow_run_id)
    ray.shutdown()
    return {
        "summary": summary,
        "tasks": tasks,
        "prefect_start_s": t1 - t0,
        "ray_start_s": t2 - t1,
        "flow_s": t3 - t2,
        "headline_s": t3 - t0,
    }


def _fingerprint(hu: np.ndarray) -> np.ndarray:
    """Per-slice mean HU after the air clip load_series applies (cheap to keep, exact enough)."""
    return np.maximum(hu, np.float32(-1024)).mean(axis=(1, 2), dtype=np.float64)


@pytest.mark.timeout(3600)  # first run generates the archive (~1 min per 512 study)
def test_bench_sweep_vs_floor_and_naive(tmp_path):
    import torch

    from pdacscreen.engine.package import load_package
    from pdacscreen.io.index import read_index
    from pdacscreen.io.select import load_rules, select_series
    from pdacscreen.io.store import FindingsStore
    from pdacscreen.io.volume import load_series

    archive, gen_s = _archive()
    n_files = _warm_cache(archive / "dicom")
    print(f"\narchive {archive.name}: {N_STUDIES} studies, {n_files} files (ready in {gen_s:.0f}s)")

    # (a) the real sweep, start-up included
    store = tmp_path / "store"
    sw = _run_sweep(archive, store)
    summary = sw["summary"]
    found = FindingsStore(store).read_findings()
    assert summary["processed"] == N_STUDIES and summary["ok"] == N_STUDIES, summary
    assert sorted(found["status"]) == ["ok"] * N_STUDIES
    assert found["study_instance_uid"].nunique() == N_STUDIES
    chosen = dict(zip(found["study_instance_uid"], found["series_instance_uid"], strict=True))

    # the same series, from the index the sweep wrote
    sels = [
        s
        for s in select_series(read_index(store / "index"), rules=load_rules(None))
        if s.status == "selected"
    ]
    assert {s.study_instance_uid: s.series_instance_uid for s in sels} == chosen
    sels.sort(key=lambda s: s.study_instance_uid)

    # (b) decode floor
    warm = sels[0]  # start the decoder pool (a subset of slices: gaps are interpolated)
    load_series(
        list(warm.files)[:40],
        workers=2,
        series_instance_uid=warm.series_instance_uid,
        on_missing_slice="resample",
    )
    floor_s, prints, shapes = [], {}, {}
    for s in sels:
        t = time.perf_counter()
        vol = load_series(list(s.files), workers=2, series_instance_uid=s.series_instance_uid)
        floor_s.append(time.perf_counter() - t)
        prints[s.study_instance_uid] = _fingerprint(vol.array)
        shapes[s.study_instance_uid] = (vol.shape, vol.spacing)
        del vol

    # (c) naive sequential pipeline
    package = load_package()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        predict = torch_eager_predictor(package.stage2)
        naive = []
        for s in sels:
            r = naive_whole_abdomen(list(s.files), package, predict=predict)
            shape, spacing = shapes[s.study_instance_uid]
            assert r["hu"].shape == shape
            np.testing.assert_allclose(r["spacing"], spacing, rtol=1e-4)
            np.testing.assert_allclose(
                _fingerprint(r.pop("hu")), prints[s.study_instance_uid], rtol=1e-6, atol=1e-3
            )
            naive.append(r)
    finally:
        torch.set_num_threads(threads)

    n = N_STUDIES
    per_h = lambda seconds: 3600.0 * n / seconds  # noqa: E731
    tasks = sw["tasks"]
    fan_s = tasks.get("fan-out", float("nan"))
    sweep_h, flow_h, fan_h = per_h(sw["headline_s"]), per_h(sw["flow_s"]), per_h(fan_s)
    floor_h = per_h(sum(floor_s))
    naive_t = sum(r["total_s"] for r in naive)
    naive_h = per_h(naive_t)
    rows_s = float(found["duration_s"].sum())
    print(
        f"sweep: {sw['headline_s']:.1f}s = Prefect test server start {sw['prefect_start_s']:.1f}s"
        f" + Ray init {sw['ray_start_s']:.1f}s + flow {sw['flow_s']:.1f}s (summary duration_s "
        f"{summary['duration_s']:.1f}s; tasks: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(tasks.items(), key=lambda kv: -kv[1]))
        + f"); per-study load+detect (rows' duration_s) sum {rows_s:.1f}s;"
        f" {summary['flagged']} flagged"
    )
    print(
        f"decode floor: {sum(floor_s):.1f}s ("
        + ", ".join(f"{t:.1f}" for t in floor_s)
        + f" s/study), shapes {[v[0] for v in shapes.values()]}"
    )
    print(
        f"naive: {naive_t:.1f}s = decode {sum(r['decode_s'] for r in naive):.1f}s + zoom "
        f"{sum(r['zoom_s'] for r in naive):.1f}s + torch eager sliding window "
        f"{sum(r['window_s'] for r in naive):.1f}s; windows/study {[r['windows'] for r in naive]}"
        f" on grids {[r['grid'] for r in naive]}"
    )
    print(
        f"BENCH sweep_vs_naive ratio={sweep_h / naive_h:.2f} sweep {sweep_h:.0f} studies/h "
        f"(nightly_sweep end to end incl. Prefect+Ray start-up, 1 engine actor, 2 Ray CPUs) vs "
        f"naive {naive_h:.0f} studies/h (pydicom loop + ndimage.zoom + torch eager whole-abdomen "
        f"sliding window), matrix {MATRIX}, {n} studies (target >= 5x)"
    )
    print(
        f"BENCH sweep_vs_decode_floor ratio={sweep_h / floor_h:.2f} sweep {sweep_h:.0f} studies/h"
        f" vs decode floor {floor_h:.0f} studies/h (load_series workers=2 of the same series, "
        f"sequential) (target: end-to-end within 2x of the floor, i.e. ratio >= 0.5)"
    )
    print(
        f"BENCH sweep_breakdown ratio={fan_h / floor_h:.2f} fan-out task alone {fan_h:.0f} "
        f"studies/h vs decode floor {floor_h:.0f}/h; flow alone {flow_h:.0f}/h "
        f"(ratio {flow_h / floor_h:.2f} to the floor); fan-out vs naive {fan_h / naive_h:.2f}x; "
        f"start-up {sw['prefect_start_s'] + sw['ray_start_s']:.1f}s of {sw['headline_s']:.1f}s"
    )
    assert all(np.isfinite(r["cls"]) for r in naive)
