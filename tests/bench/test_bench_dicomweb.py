"""DICOMweb sweep throughput against a folder sweep of the same studies, same machine, same run.

A phantom archive (mixed compression, matrix ``PDACSCREEN_BENCH_DW_MATRIX``, default 256,
``PDACSCREEN_BENCH_DW_STUDIES`` studies, default 4) is uploaded to a real Orthanc (the test
fixture: localhost, basic auth) by STOW-RS.  Then, inside one Prefect test server and one local
Ray runtime (``num_cpus=2``), each on a fresh store: a folder sweep, the DICOMweb sweep (QIDO,
metadata, WADO-RS of the chosen series into the per-study cache, the same loader and engine),
and a second folder sweep; the folder side is the faster of its two.  ``ratio`` is DICOMweb
studies/h over folder studies/h (target >= 0.8).  Only correctness is asserted (the same
findings on both sides), never speed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthanc_server import orthanc  # noqa: E402,F401 - the session fixture

from pdacscreen.io.dicomweb import DicomwebClient, DicomwebSource  # noqa: E402

pytestmark = pytest.mark.bench

N_STUDIES = int(os.environ.get("PDACSCREEN_BENCH_DW_STUDIES", "4"))
MATRIX = int(os.environ.get("PDACSCREEN_BENCH_DW_MATRIX", "256"))


def test_bench_dicomweb_vs_folder(orthanc, tmp_path, monkeypatch):  # noqa: F811
    import ray
    from prefect.testing.utilities import prefect_test_harness
    from pydantic import SecretStr

    from pdacscreen.flows.ray_pool import init_ray
    from pdacscreen.flows.sweep import nightly_sweep
    from pdacscreen.io.phantom.archive import generate_archive
    from pdacscreen.io.store import FindingsStore

    out = tmp_path / "archive"
    generate_archive(out, studies=N_STUDIES, seed=1414, matrix=MATRIX, compress="mixed")
    files = sorted(p for p in (out / "dicom").rglob("*") if p.is_file())
    orthanc.clear()
    src = DicomwebSource(orthanc.dicomweb, user=orthanc.user, password=SecretStr(orthanc.password))
    with DicomwebClient(src) as client:
        for i in range(0, len(files), 60):
            assert all(v is None for v in client.store(files[i : i + 60]).values())
    for p in files:  # a warm page cache for the folder side
        p.read_bytes()
    monkeypatch.setenv("PDACSCREEN_DICOMWEB_USER", orthanc.user)
    monkeypatch.setenv("PDACSCREEN_DICOMWEB_PASSWORD", orthanc.password)

    def run(archive: str, store: Path) -> float:
        t0 = time.perf_counter()
        summary = nightly_sweep(archive=archive, store=str(store), n_actors=1, demo_key=True)
        dt = time.perf_counter() - t0
        assert summary["processed"] == N_STUDIES
        return dt

    with prefect_test_harness(server_startup_timeout=180):
        init_ray(None, num_cpus=2, temp_dir=os.environ.get("RAY_TMPDIR"))
        try:
            t_f1 = run(str(out / "dicom"), tmp_path / "f1")
            t_w = run(orthanc.source, tmp_path / "w")
            t_f2 = run(str(out / "dicom"), tmp_path / "f2")
        finally:
            ray.shutdown()
    key = ["study_instance_uid", "series_instance_uid", "status", "pdac_flag"]
    f = FindingsStore(tmp_path / "f1").read_findings().sort_values("study_instance_uid")
    w = FindingsStore(tmp_path / "w").read_findings().sort_values("study_instance_uid")
    assert f[key].astype(str).values.tolist() == w[key].astype(str).values.tolist()
    diff = f["pdac_probability"].to_numpy(float) - w["pdac_probability"].to_numpy(float)
    assert not (abs(diff) > 1e-6).any()
    t_folder = min(t_f1, t_f2)
    folder_h, web_h = 3600 * N_STUDIES / t_folder, 3600 * N_STUDIES / t_w
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"BENCH dicomweb_vs_folder ratio={web_h / folder_h:.2f} dicomweb {web_h:.0f} studies/h "
        f"({t_w:.1f} s) folder {folder_h:.0f} studies/h ({t_f1:.1f} s, {t_f2:.1f} s) "
        f"studies={N_STUDIES} matrix={MATRIX} archive={mb:.1f} MB"
    )
