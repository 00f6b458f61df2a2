"""DICOMweb source against a real Orthanc: STOW-RS up, QIDO-RS, metadata rows, WADO-RS retrieve of
one series in its stored transfer syntax, bytes over the wire, and errors as codes.

A small threaded HTTP proxy between the client and Orthanc counts the bytes Orthanc served per
request and can cut a response short (truncated multipart) or answer 503.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import requests
from orthanc_server import orthanc  # noqa: F401 - the session fixture
from pydantic import SecretStr

from pdacscreen.io.dicom.read import INDEX_COLUMNS, header_row
from pdacscreen.io.dicomweb import (
    DicomwebClient,
    DicomwebSource,
    fetch_series,
    index_source,
    instance_path,
    is_dicomweb,
    parse_instance_url,
    source_from_env,
)
from pdacscreen.io.errors import ErrorCode, InputError, SourceError
from pdacscreen.io.pseudonym import DEMO_KEY
from pdacscreen.io.select import select_series
from pdacscreen.io.store import FindingsStore

pytestmark = pytest.mark.timeout(600)
COMPARED = [
    c
    for c in INDEX_COLUMNS
    if c not in ("path", "size", "mtime_ns", "transfer_syntax_uid", "has_pixel_data")
]


class _Proxy:
    """HTTP proxy to ``target``: counts bytes served per path; ``mode`` "cut" sends half a body
    (announcing the whole length) for multipart responses, "503" answers 503 to everything,
    "deny-post" answers 403 to every POST (an account that may read but not store)."""

    def __init__(self, target: str) -> None:
        self.target, self.mode = target, None
        self.served: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.posts: Counter[str] = Counter()  # POST requests (STOW-RS) per path
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                proxy.hits[self.path.split("?")[0]] += 1
                if self.command == "POST":
                    proxy.posts[self.path.split("?")[0]] += 1
                if proxy.mode == "deny-post" and self.command == "POST":
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if proxy.mode == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host",)}
                r = requests.request(
                    self.command, proxy.target + self.path, headers=headers, data=body, timeout=120
                )
                data = r.content
                cut = proxy.mode == "cut" and "multipart" in r.headers.get("Content-Type", "")
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                sent = data[: len(data) // 2] if cut else data
                self.wfile.write(sent)
                proxy.served[self.path.split("?")[0]] += len(sent)
                if cut:
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _source(url: str, server, **kw) -> DicomwebSource:
    kw.setdefault("attempts", 2)
    kw.setdefault("backoff_s", 0.05)
    kw.setdefault("timeout_s", 30)
    return DicomwebSource(url, user=server.user, password=SecretStr(server.password), **kw)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three phantom studies at matrix 128, mixed compression (RLE, JPEG-LS, JPEG 2000, native)."""
    from pdacscreen.io.phantom.archive import generate_archive

    out = tmp_path_factory.mktemp("dw-archive")
    generate_archive(out, studies=3, seed=14, matrix=128, compress="mixed", workers=1)
    files = sorted(p for p in (out / "dicom").rglob("*") if p.is_file())
    return out, files


@pytest.fixture(scope="module")
def pacs(orthanc, archive):  # noqa: F811
    """Orthanc holding the phantom archive, uploaded by STOW-RS (our client)."""
    orthanc.clear()
    _, files = archive
    with DicomwebClient(_source(orthanc.dicomweb, orthanc)) as client:
        for i in range(0, len(files), 60):
            result = client.store(files[i : i + 60])
            assert all(v is None for v in result.values()), result
    return orthanc


@pytest.fixture()
def proxy(pacs):
    p = _Proxy(pacs.url)
    yield p
    p.close()


def _folder_rows(files) -> pd.DataFrame:
    return pd.DataFrame([header_row(p, key=DEMO_KEY) for p in files])


def test_source_string_and_credentials(tmp_path):
    assert is_dicomweb("dicomweb+http://h:1/dicom-web") and not is_dicomweb("/data/archive")
    with pytest.raises(InputError, match="must not hold credentials"):
        DicomwebSource("dicomweb+http://u:secret@h:1/dicom-web")
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    src = source_from_env(
        "dicomweb+https://pacs:443/dicom-web/",
        environ={"PDACSCREEN_DICOMWEB_TOKEN_FILE": str(token_file)},
    )
    assert src.url == "https://pacs:443/dicom-web" and src.token.get_secret_value() == "tok-123"
    assert "tok-123" not in repr(src) and "tok-123" not in str(src.describe())
    assert src.verify is True
    with pytest.raises(InputError, match="PDACSCREEN_DICOMWEB_USER"):
        source_from_env("dicomweb+http://h/dw", environ={"PDACSCREEN_DICOMWEB_PASSWORD": "x"})
    p = instance_path("http://h:1/dw", "1.2", "1.3", "1.4")
    ref = parse_instance_url(p)
    assert (ref.url, ref.study, ref.series, ref.sop) == ("http://h:1/dw", "1.2", "1.3", "1.4")


def test_index_rows_match_folder_and_selection_agrees(pacs, archive):
    _, files = archive
    idx = index_source(_source(pacs.dicomweb, pacs), key=DEMO_KEY)
    assert idx.problems == [] and idx.studies_found == 3 and idx.studies_indexed == 3
    web = pd.DataFrame(idx.rows)
    folder = _folder_rows(files)
    assert len(web) == len(folder)
    assert not web["path"].str.contains("PHANTOM").any()  # no PatientID in any path
    w = web.set_index("sop_instance_uid").sort_index()
    f = folder.set_index("sop_instance_uid").sort_index()
    assert list(w.index) == list(f.index)
    for col in COMPARED:
        if col == "sop_instance_uid":
            continue
        a, b = w[col].tolist(), f[col].tolist()
        assert [x if x == x else None for x in a] == [x if x == x else None for x in b], col
    sw, sf = select_series(web), select_series(folder)
    assert [s.series_instance_uid for s in sw] == [s.series_instance_uid for s in sf]
    assert all(s.series_instance_uid for s in sw)
    # incremental: nothing asked again for a known study with the same instance count
    known = web.groupby("study_instance_uid").size().to_dict()
    again = index_source(_source(pacs.dicomweb, pacs), key=DEMO_KEY, known=known)
    assert again.studies_found == 3 and again.studies_indexed == 0 and again.rows == []


def test_retrieve_only_the_chosen_series_as_stored(pacs, archive, proxy, tmp_path):
    _, files = archive
    idx = index_source(_source(pacs.dicomweb, pacs), key=DEMO_KEY)
    web = pd.DataFrame(idx.rows)
    by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    checked_ts = set()
    for sel in select_series(web):
        paths = [p.replace(pacs.dicomweb, proxy.url) for p in sel.files]
        proxy.served.clear()
        proxy.hits.clear()
        got = fetch_series(_source(proxy.url, pacs), paths, folder=tmp_path / "cache")
        assert len(got) == len(sel.files)
        # only this series went over the wire: one retrieve request, of this series
        series_path = (
            f"/dicom-web/studies/{sel.study_instance_uid}/series/{sel.series_instance_uid}"
        )
        assert dict(proxy.hits) == {series_path: 1}
        series_bytes = sum(by_sop[parse_instance_url(p).sop].stat().st_size for p in sel.files)
        served = proxy.served[series_path]
        assert 0.9 * series_bytes < served < 1.1 * series_bytes + 20000, (served, series_bytes)
        for path in got:
            a = pydicom.dcmread(path)
            b = pydicom.dcmread(by_sop[str(a.SOPInstanceUID)])
            assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
            assert a.PixelData == b.PixelData  # byte for byte, compressed as stored
            checked_ts.add(str(a.file_meta.TransferSyntaxUID))
    assert len(checked_ts) >= 2, checked_ts


def _first_selection(pacs):
    idx = index_source(_source(pacs.dicomweb, pacs), key=DEMO_KEY)
    return select_series(pd.DataFrame(idx.rows))[0]


def test_jpeg2000_series_round_trip(pacs, archive, tmp_path):
    """A JPEG 2000 series (if the archive holds one) comes back as JPEG 2000, byte-identical."""
    _, files = archive
    j2k = {}
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
            j2k.setdefault((ds.StudyInstanceUID, ds.SeriesInstanceUID), []).append(p)
    assert j2k, "the mixed phantom archive holds no JPEG 2000 series"
    (study, series), originals = next(iter(j2k.items()))
    with DicomwebClient(_source(pacs.dicomweb, pacs)) as client:
        got = client.retrieve_series(study, series, sops=None, folder=tmp_path / "j2k")
    assert len(got) == len(originals)
    orig = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in originals}
    for path in got:
        a = pydicom.dcmread(path)
        assert a.file_meta.TransferSyntaxUID.startswith("1.2.840.10008.1.2.4.9")
        assert a.PixelData == orig[str(a.SOPInstanceUID)].PixelData


def test_server_down_is_source_unavailable_after_retries(pacs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    waits = []
    src = _source(f"http://127.0.0.1:{port}/dicom-web", pacs, attempts=3, backoff_s=0.01)
    client = DicomwebClient(src, sleep=waits.append)
    with pytest.raises(SourceError) as e:
        client.studies()
    assert e.value.code == ErrorCode.SOURCE_UNAVAILABLE
    assert waits == [0.01, 0.02]  # exponential backoff between the three attempts
    assert pacs.password not in str(e.value)
    idx = index_source(src, key=DEMO_KEY)
    assert idx.rows == [] and [p["error_code"] for p in idx.problems] == ["source_unavailable"]


def test_503_retried_then_unavailable(pacs, proxy):
    proxy.mode = "503"
    src = _source(proxy.url, pacs, attempts=3, backoff_s=0.01)
    with pytest.raises(SourceError) as e:
        DicomwebClient(src).studies()
    assert e.value.code == ErrorCode.SOURCE_UNAVAILABLE
    assert sum(proxy.hits.values()) == 3


def test_401_is_unauthorized_and_not_retried(pacs, proxy):
    src = DicomwebSource(
        proxy.url, user=pacs.user, password=SecretStr("wrong"), attempts=4, backoff_s=0.01
    )
    with pytest.raises(SourceError) as e:
        DicomwebClient(src).studies()
    assert e.value.code == ErrorCode.SOURCE_UNAUTHORIZED
    assert sum(proxy.hits.values()) == 1  # not retried
    assert "wrong" not in str(e.value)
    idx = index_source(src, key=DEMO_KEY)
    assert [p["error_code"] for p in idx.problems] == ["source_unauthorized"]


def test_truncated_multipart_is_truncated_response(pacs, proxy, tmp_path):
    sel = _first_selection(pacs)
    proxy.mode = "cut"
    paths = [p.replace(pacs.dicomweb, proxy.url) for p in sel.files]
    with pytest.raises(SourceError) as e:
        fetch_series(_source(proxy.url, pacs, attempts=2), paths, folder=tmp_path / "c")
    assert e.value.code == ErrorCode.TRUNCATED_RESPONSE
    series_path = f"/dicom-web/studies/{sel.study_instance_uid}/series/{sel.series_instance_uid}"
    assert proxy.hits[series_path] == 2  # retried once, then the code


def test_series_deleted_between_query_and_retrieve(pacs, archive, tmp_path):
    sel = _first_selection(pacs)
    src = _source(pacs.dicomweb, pacs)
    found = pacs.rest(
        "POST",
        "/tools/find",
        json={"Level": "Series", "Query": {"SeriesInstanceUID": sel.series_instance_uid}},
    ).json()
    assert len(found) == 1
    pacs.rest("DELETE", f"/series/{found[0]}")
    try:
        with pytest.raises(SourceError) as e:
            fetch_series(src, sel.files, folder=tmp_path / "gone")
        assert e.value.code == ErrorCode.SERIES_VANISHED
    finally:  # put it back for the other tests
        _, files = archive
        mine = [
            p
            for p in files
            if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
            == sel.series_instance_uid
        ]
        with DicomwebClient(src) as client:
            assert all(v is None for v in client.store(mine).values())


# -- the sweep over DICOMweb ---------------------------------------------------------------------


FINDING_COLUMNS = [
    "study_instance_uid",
    "series_instance_uid",
    "patient_key",
    "status",
    "error_code",
    "pdac_flag",
    "lesion_count",
    "phase_estimate",
]


@pytest.mark.slow
def test_sweep_over_dicomweb_equals_folder_sweep(
    pacs, archive, tmp_path, prefect_server, local_ray, monkeypatch
):
    from pdacscreen.flows.sweep import nightly_sweep
    from pdacscreen.io.store import FindingsStore

    out, _ = archive
    monkeypatch.setenv("PDACSCREEN_DICOMWEB_USER", pacs.user)
    monkeypatch.setenv("PDACSCREEN_DICOMWEB_PASSWORD", pacs.password)
    common = {"n_actors": 1, "demo_key": True}
    folder = nightly_sweep(archive=str(out / "dicom"), store=str(tmp_path / "f"), **common)
    web = nightly_sweep(archive=pacs.source, store=str(tmp_path / "w"), **common)
    assert web["processed"] == folder["processed"] == 3
    f = FindingsStore(tmp_path / "f").read_findings()
    w = FindingsStore(tmp_path / "w").read_findings()
    # rows in study order, labels 0..n-1 (parts are read in no particular order)
    f = f.sort_values("study_instance_uid").reset_index(drop=True)
    w = w.sort_values("study_instance_uid").reset_index(drop=True)
    assert (w["config_hash"] == f["config_hash"]).all()
    for col in FINDING_COLUMNS:
        a, b = w[col].tolist(), f[col].tolist()
        assert [x if x == x else None for x in a] == [x if x == x else None for x in b], col
    pf, pw = f["pdac_probability"].to_numpy(float), w["pdac_probability"].to_numpy(float)
    assert ((abs(pf - pw) <= 1e-6) | (pf != pf) & (pw != pw)).all(), (pf, pw)
    assert not (tmp_path / "w" / "cache").exists() or not any((tmp_path / "w" / "cache").iterdir())
    manifest = Path(web["manifest"]).read_text()
    assert pacs.password not in manifest and "PHANTOM-" not in manifest
    index = FindingsStore(tmp_path / "w").index_dir
    assert not any(
        pacs.password in p.read_bytes().decode("latin-1") for p in index.rglob("*.parquet")
    )
    # rerun: incremental, exactly once
    again = nightly_sweep(archive=pacs.source, store=str(tmp_path / "w"), **common)
    assert again["processed"] == 0 and again["already_done"] == 3
    assert FindingsStore(tmp_path / "w").dedupe_check() == 0
    assert len(FindingsStore(tmp_path / "w").read_findings()) == 3


@pytest.mark.slow
def test_sweep_with_the_source_down_is_a_failures_row(tmp_path, prefect_server, local_ray):
    from pdacscreen.flows.sweep import nightly_sweep
    from pdacscreen.io.store import FindingsStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    summary = nightly_sweep(
        archive=f"dicomweb+http://127.0.0.1:{port}/dicom-web",
        store=str(tmp_path / "s"),
        n_actors=1,
        demo_key=True,
    )
    assert summary["processed"] == 0
    fails = FindingsStore(tmp_path / "s").read_failures()
    assert fails["error_code"].tolist() == ["source_unavailable"]


@pytest.mark.slow
def test_kill_9_mid_dicomweb_sweep_then_rerun_is_exactly_once(pacs, archive, tmp_path):
    """The CLI sweeping Orthanc is SIGKILLed after its first findings batch; the rerun processes
    the rest: every study once, the first rows kept, no cache or temporary part left behind."""
    out, _ = archive
    truth = pd.read_parquet(out / "truth.parquet")
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PDACSCREEN_DICOMWEB_USER": pacs.user, "PDACSCREEN_DICOMWEB_PASSWORD": pacs.password}
    cmd = [sys.executable, "-m", "pdacscreen.flows.cli", "sweep", pacs.source, "--store"]
    cmd += [str(store), "--flush-every", "1", "--actors", "1", "--demo-key"]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "findings").is_dir() and any((store / "findings").rglob("*.parquet")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "sweep ended before the kill: " + proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = FindingsStore(store).read_findings()
    assert 0 < len(before) < len(truth)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = FindingsStore(store).read_findings()
    assert sorted(after["study_instance_uid"]) == sorted(truth["study_instance_uid"])
    assert FindingsStore(store).dedupe_check() == 0
    kept = after.set_index("study_instance_uid").loc[before["study_instance_uid"], "sweep_id"]
    assert list(kept) == list(before["sweep_id"])
    assert not (store / "cache").exists() or not any((store / "cache").iterdir())
    assert not [p for p in store.rglob(".*.tmp-*")]
