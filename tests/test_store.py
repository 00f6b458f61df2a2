"""The findings store: schema, write-then-read, validation, atomic appends under SIGKILL, the lock."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pdacscreen.io.errors import FindingsSchemaError, PdacscreenError, StoreLockedError
from pdacscreen.io.store import (
    FAILURES_SCHEMA,
    FINDINGS_COLUMNS,
    FINDINGS_SCHEMA,
    SCHEMA_VERSION,
    FindingsStore,
)

DAY = dt.date(2025, 3, 1)
KW = {"sweep_id": "sweep-a", "sweep_date": DAY, "model_version": "1.2.0", "config_hash": "cfg0"}
ISSUE_COLUMNS = [  # issue 6 section 2, in order, plus the three the analyses use
    "study_instance_uid", "series_instance_uid", "patient_key", "study_date", "model_name",
    "model_version", "config_hash", "pdac_probability", "pdac_flag", "operating_threshold",
    "lesion_count", "lesion_diameter_mm", "lesion_volume_ml", "lesion_center_x_mm",
    "lesion_center_y_mm", "lesion_center_z_mm", "lesion_location", "pancreas_volume_ml",
    "phase_estimate", "qc_flags", "status", "error_code", "evidence_path", "sweep_id",
    "processed_at", "duration_s",
]  # fmt: skip


def ok_row(uid: str, p: float = 0.8, **kw) -> dict:
    row = {
        "study_instance_uid": uid,
        "series_instance_uid": uid + ".1",
        "patient_key": "pk-" + uid[-1],
        "accession_key": "ak-" + uid[-1],
        "study_date": "20240105",
        "manufacturer": "SIEMENS",
        "slice_thickness_mm": 2.5,
        "model_name": "ref",
        "pdac_probability": p,
        "pdac_flag": p >= 0.5,
        "operating_threshold": 0.5,
        "lesion_count": 1,
        "lesion_diameter_mm": 18.5,
        "lesion_center_x_mm": 10.0,
        "lesion_center_y_mm": -5.0,
        "lesion_center_z_mm": -400.0,
        "lesion_location": "head",
        "pancreas_volume_ml": 71.2,
        "phase_estimate": "non_contrast",
        "qc_flags": ["gantry_tilt"],
        "status": "ok",
        "evidence_path": f"evidence/{uid}",
        "processed_at": dt.datetime(2025, 3, 1, 2, 0, 5, tzinfo=dt.UTC),
        "duration_s": 12.5,
    }
    row.update(kw)
    return row


def test_schema_has_the_documented_columns_and_types():
    assert set(FINDINGS_SCHEMA.names) == set(ISSUE_COLUMNS) | {
        "accession_key",
        "manufacturer",
        "slice_thickness_mm",
        "engine_backend",  # issue 11: what ran the model (runtime-device-precision)
        # issue 16: body composition at L3
        "l3_slice_z_mm",
        "skeletal_muscle_area_cm2",
        "visceral_fat_area_cm2",
        "subcutaneous_fat_area_cm2",
        "muscle_mean_hu",
        "skeletal_muscle_index_cm2_m2",
        "bodycomp_qc",
    }
    types = {f.name: f.type for f in FINDINGS_SCHEMA}
    assert types["lesion_count"] == pa.int32()
    assert types["qc_flags"] == pa.list_(pa.string())
    assert types["processed_at"] == pa.timestamp("us", tz="UTC")
    assert types["study_date"] == pa.date32()
    assert types["pdac_flag"] == pa.bool_()
    assert types["pdac_probability"] == pa.float64()
    for f in FINDINGS_SCHEMA:  # every column documented (the README table is generated from this)
        assert f.metadata[b"description"] and FINDINGS_COLUMNS[f.name][2]
    assert FAILURES_SCHEMA.names == [
        "sweep_id", "stage", "scope", "study_instance_uid", "series_instance_uid", "path",
        "error_code", "message", "occurred_at",
    ]  # fmt: skip


def test_write_then_read_round_trip(tmp_path):
    st = FindingsStore(tmp_path / "store")
    rows = [
        ok_row("1.2.3.1", study_date=dt.date(2024, 1, 5)),
        ok_row("1.2.3.2", 0.1, study_date="2024-01-05", qc_flags=None),
        {"study_instance_uid": "1.2.3.3", "status": "failed", "error_code": "truncated"},
    ]
    extra = {"model_sha256": "ab" * 32, "model_version": "spoof", "schema_version": "0"}
    path = st.append_findings(rows, **KW, extra_metadata=extra)
    assert path == st.findings_dir / "sweep_date=2025-03-01" / "part-sweep-a-00001.parquet"
    df = st.read_findings().set_index("study_instance_uid")
    assert list(df.index) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    one = df.loc["1.2.3.1"]
    assert one["pdac_probability"] == 0.8 and bool(one["pdac_flag"]) is True
    assert one["study_date"] == dt.date(2024, 1, 5) and one["sweep_date"] == DAY
    assert list(one["qc_flags"]) == ["gantry_tilt"] and one["lesion_count"] == 1
    assert one["model_version"] == "1.2.0" and one["config_hash"] == "cfg0"
    assert one["sweep_id"] == "sweep-a" and one["processed_at"].isoformat().startswith(
        "2025-03-01T02"
    )
    assert df.loc["1.2.3.2", "study_date"] == dt.date(2024, 1, 5)
    assert list(df.loc["1.2.3.2", "qc_flags"]) == []  # missing qc_flags -> []
    three = df.loc["1.2.3.3"]
    assert three["status"] == "failed" and three["error_code"] == "truncated"
    assert three["pdac_probability"] != three["pdac_probability"]  # NaN: optional -> null
    assert three["processed_at"] is not None  # filled with now (UTC)
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items()}
    assert meta["pdacscreen.schema_version"] == str(SCHEMA_VERSION)
    assert meta["pdacscreen.model_version"] == "1.2.0" and meta["pdacscreen.config_hash"] == "cfg0"
    assert st.metadata()["model_sha256"] == ["ab" * 32]
    # A second append gets the next deterministic name; the readers see both.
    second = st.append_findings([ok_row("1.2.3.4")], **KW)
    assert second.name == "part-sweep-a-00002.parquet"
    assert st.processed_studies(model_version="1.2.0", config_hash="cfg0") == {
        "1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"
    }  # fmt: skip
    assert st.processed_studies(model_version="1.2.0", config_hash="other") == set()
    assert st.dedupe_check() == 0
    # The same study again for the same model and config is counted as a duplicate.
    st.append_findings([ok_row("1.2.3.4")], **KW)
    assert st.dedupe_check() == 1
    assert st.append_findings([], **KW) is None


def test_table_append_matches_row_append(tmp_path):
    a, b = FindingsStore(tmp_path / "a"), FindingsStore(tmp_path / "b")
    rows = [
        ok_row("1.2.9.1", study_date=dt.date(2024, 1, 5)),
        ok_row("1.2.9.2", 0.2, study_date=None),
    ]
    a.append_findings(rows, **KW)
    table = pa.Table.from_pylist(rows).drop(["study_date"])
    b.append_findings_table(table, **KW)
    ta, tb = a.read_findings_table(), b.read_findings_table()
    assert ta.drop(["study_date"]).equals(tb.drop(["study_date"]))
    assert tb.column("study_date").null_count == 2


@pytest.mark.parametrize(
    ("row", "kw", "needle"),
    [
        ({"study_instance_uid": "x", "status": "ok", "colour": 1}, {}, "colour"),
        ({"study_instance_uid": "x", "status": "maybe", "error_code": "e"}, {}, "status"),
        ({"study_instance_uid": "x", "status": "ok"}, {}, "pdac_probability"),
        ({"study_instance_uid": "x", "status": "failed"}, {}, "error_code"),
        ({"status": "skipped", "error_code": "e"}, {}, "study_instance_uid"),
        ({"study_instance_uid": "x", "status": "ok", "pdac_probability": 1.5, "pdac_flag": True}, {}, "[0, 1]"),
        ({"study_instance_uid": "x", "status": "ok", "pdac_probability": "high"}, {}, "pdac_probability"),
        ({"study_instance_uid": "x", "status": "ok", "study_date": "05.01.2024"}, {}, "study_date"),
        ({"study_instance_uid": "x", "status": "failed", "error_code": "e", "model_version": "9"}, {}, "model_version"),
        ({"study_instance_uid": "x", "status": "failed", "error_code": "e"}, {"sweep_id": "../x"}, "sweep_id"),
    ],
)  # fmt: skip
def test_bad_rows_are_typed_errors_naming_the_field(tmp_path, row, kw, needle):
    st = FindingsStore(tmp_path)
    with pytest.raises(FindingsSchemaError) as e:
        st.append_findings([row], **{**KW, **kw})
    assert needle in str(e.value)
    assert e.value.code == "bad_findings_row" and isinstance(e.value, PdacscreenError)
    assert not st.findings_dir.exists() or not list(st.findings_dir.rglob("*.parquet"))


def test_one_study_twice_in_one_append_is_refused(tmp_path):
    with pytest.raises(FindingsSchemaError, match="1.2.3.1"):
        FindingsStore(tmp_path).append_findings([ok_row("1.2.3.1"), ok_row("1.2.3.1")], **KW)


def test_failures_round_trip_and_stage_check(tmp_path):
    st = FindingsStore(tmp_path)
    assert st.read_failures().empty and list(st.read_failures().columns) == FAILURES_SCHEMA.names
    rows = [
        {
            "stage": "load",
            "scope": "file",
            "path": "a/1.dcm",
            "error_code": "not_dicom",
            "message": "m",
        },
        {
            "stage": "select",
            "scope": "study",
            "study_instance_uid": "1.2",
            "error_code": "no_eligible_series",
        },
    ]
    path = st.append_failures(rows, sweep_id="sweep-a")
    assert path.parent == st.failures_dir
    df = st.read_failures()
    assert list(df["error_code"]) == ["not_dicom", "no_eligible_series"]
    assert list(df["sweep_id"]) == ["sweep-a"] * 2 and df["occurred_at"].notna().all()
    with pytest.raises(FindingsSchemaError, match="stage"):
        st.append_failures([{"stage": "lunch", "scope": "file", "error_code": "x"}], sweep_id="s")


def test_empty_store_reads_empty(tmp_path):
    st = FindingsStore(tmp_path / "nothing")
    df = st.read_findings()
    assert df.empty and "sweep_date" in df.columns and "qc_flags" in df.columns
    assert st.processed_studies(model_version="1", config_hash="c") == set()
    assert st.dedupe_check() == 0


_WRITER = """
import datetime as dt, sys
from pathlib import Path
import pyarrow as pa
from pdacscreen.io.store import FindingsStore
st = FindingsStore(Path(sys.argv[1]))
n = 20000
base = pa.table({
    "status": ["ok"] * n, "pdac_probability": [0.25] * n, "pdac_flag": [False] * n,
    "qc_flags": [["a", "b"]] * n, "model_name": ["ref"] * n,
})
for k in range(1000):
    uids = pa.array([f"1.2.{k}.{i}" for i in range(n)])
    st.append_findings_table(base.append_column("study_instance_uid", uids), sweep_id="s",
        sweep_date=dt.date(2025, 3, 1), model_version="1", config_hash="c")
    print(k, flush=True)
"""


def test_writer_killed_mid_write_leaves_no_partial_file(tmp_path):
    """SIGKILL a writer while a temporary file is being written: readers never see a partial file,
    every visible file is complete, and the next lock holder removes the leftover."""
    st = FindingsStore(tmp_path / "store")
    part = st.findings_dir / "sweep_date=2025-03-01"
    killed_mid_write = False
    for _attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(st.root)], stdout=subprocess.PIPE, text=True
        )
        try:
            proc.stdout.readline()  # at least one file complete
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not list(part.glob(".*.tmp-*")):
                time.sleep(0.0005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        if list(part.glob(".*.tmp-*")):
            killed_mid_write = True
            break
    assert killed_mid_write, "never caught the writer with a temporary file open"
    visible = sorted(part.glob("*.parquet"))
    assert visible and all(not p.name.startswith((".", "_")) for p in visible)
    for p in visible:  # every visible file is complete and readable
        assert pq.read_metadata(p).num_rows == 20000
    table = st.read_findings_table(["study_instance_uid"])
    assert table.num_rows == 20000 * len(visible)
    assert st.dedupe_check() == 0
    from pdacscreen.flows.query import query

    assert (
        query(st.root, "SELECT count(*) AS n FROM findings").column("n")[0].as_py()
        == table.num_rows
    )
    with st.lock(sweep_id="cleanup"):
        assert not list(part.glob(".*.tmp-*"))


_HOLDER = """
import sys, time
from pathlib import Path
from pdacscreen.io.store import FindingsStore
with FindingsStore(Path(sys.argv[1])).lock(sweep_id="nightly-1"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_locker_fails_at_once_and_dead_holder_releases(tmp_path):
    st = FindingsStore(tmp_path / "store")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(st.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as e, st.lock(sweep_id="nightly-2"):
            pytest.fail("lock taken twice")
        msg = str(e.value)
        assert e.value.code == "store_locked"
        assert f"pid {holder.pid}" in msg and "nightly-1" in msg and "started 20" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The OS released the dead holder's flock: the store can be locked again, and re-entered after.
    with st.lock(sweep_id="nightly-3") as info:
        assert info.pid == os.getpid() and info.sweep_id == "nightly-3"
    with st.lock(sweep_id="nightly-4"):
        pass


def test_lock_in_the_same_process_is_exclusive_too(tmp_path):
    st = FindingsStore(tmp_path)
    with (
        st.lock(sweep_id="a"),
        pytest.raises(StoreLockedError),
        FindingsStore(tmp_path).lock(sweep_id="b"),
    ):
        pass


def test_paths(tmp_path):
    st = FindingsStore(tmp_path)
    assert (st.findings_dir, st.failures_dir, st.evidence_dir, st.index_dir) == (
        Path(tmp_path) / "findings",
        Path(tmp_path) / "failures",
        Path(tmp_path) / "evidence",
        Path(tmp_path) / "index",
    )


def test_concurrent_appends_from_threads_never_overwrite(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    st = FindingsStore(tmp_path)

    def batch(k: int) -> None:
        st.append_findings([ok_row(f"1.5.{k}.{i}") for i in range(10)], **KW)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(batch, range(20)))
    files = sorted(p.name for p in st.findings_dir.rglob("*.parquet"))
    assert files == [f"part-sweep-a-{i:05d}.parquet" for i in range(1, 21)]
    assert len(st.read_findings()) == 200 and st.dedupe_check() == 0
    assert not list(st.findings_dir.rglob(".*"))  # no temporary file left behind
