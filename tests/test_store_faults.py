"""Store faults without a sweep: damaged parts quarantined, a full disk mid-write, the clock going
backwards, and paths replaced by keyed hashes."""

from __future__ import annotations

import datetime as dt
import errno
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pdacscreen.io.errors import ErrorCode, StoreError
from pdacscreen.io.store import FindingsStore

DAY = dt.date(2026, 1, 5)
KW = dict(sweep_date=DAY, model_version="0.2.0", config_hash="cafe")


def _rows(uids):
    return [
        {
            "study_instance_uid": u,
            "status": "ok",
            "pdac_probability": 0.25,
            "pdac_flag": False,
            "patient_key": "k" + u,
        }
        for u in uids
    ]


def _store_with_parts(tmp_path: Path) -> tuple[FindingsStore, list[Path]]:
    store = FindingsStore(tmp_path / "store")
    parts = [
        store.append_findings(_rows([f"1.{i}.{j}" for j in range(4)]), sweep_id=f"s{i}", **KW)
        for i in range(3)
    ]
    return store, parts


def _check_quarantined(store: FindingsStore, part: Path, expect_uids: set[str]) -> None:
    df = store.read_findings()
    assert set(df["study_instance_uid"]) == expect_uids
    assert df["study_instance_uid"].is_unique and store.dedupe_check() == 0
    assert not part.exists()
    moved = store.quarantine_dir / part.relative_to(store.root)
    assert moved.is_file()
    fails = store.read_failures()
    rec = fails[fails["error_code"] == ErrorCode.CORRUPT_STORE_PART]
    assert len(rec) == 1, fails
    assert rec.iloc[0]["stage"] == "store" and rec.iloc[0]["scope"] == "file"
    assert rec.iloc[0]["path"] == part.relative_to(store.root).as_posix()
    # recorded once: reading again finds nothing new to quarantine
    assert len(store.read_findings()) == len(expect_uids)
    assert (store.read_failures()["error_code"] == ErrorCode.CORRUPT_STORE_PART).sum() == 1
    # the studies of the damaged part are no longer processed: the next sweep plans them again
    done = store.processed_studies(model_version="0.2.0", config_hash="cafe")
    assert done == expect_uids


def test_truncated_part_is_quarantined_with_a_failures_row(tmp_path):
    store, parts = _store_with_parts(tmp_path)
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    keep = {f"1.{i}.{j}" for i in (0, 2) for j in range(4)}
    _check_quarantined(FindingsStore(store.root), parts[1], keep)


def test_corrupted_data_behind_a_good_footer_is_quarantined(tmp_path):
    store, parts = _store_with_parts(tmp_path)
    data = bytearray(parts[0].read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    body_end = len(data) - 8 - footer_len
    for i in range(8, body_end):  # every data byte garbled, the footer left intact
        data[i] ^= 0x5A
    parts[0].write_bytes(bytes(data))
    assert pq.read_schema(parts[0]) is not None  # the footer still reads
    keep = {f"1.{i}.{j}" for i in (1, 2) for j in range(4)}
    _check_quarantined(FindingsStore(store.root), parts[0], keep)


def test_foreign_parquet_left_by_another_tool_is_quarantined(tmp_path):
    store, parts = _store_with_parts(tmp_path)
    other = parts[0].parent / "export-from-bi-tool.parquet"
    pq.write_table(pa.table({"study_instance_uid": ["9.9"], "score": [0.9]}), other)
    keep = {f"1.{i}.{j}" for i in range(3) for j in range(4)}
    _check_quarantined(FindingsStore(store.root), other, keep)


def test_damaged_failures_part_is_quarantined(tmp_path):
    store = FindingsStore(tmp_path / "store")
    row = {"stage": "index", "scope": "file", "path": "a/b", "error_code": "truncated"}
    good = store.append_failures([row], sweep_id="s1")
    bad = store.append_failures([{**row, "path": "c/d"}], sweep_id="s2")
    bad.write_bytes(b"PAR1 not really")
    fails = store.read_failures()
    assert set(fails["path"]) == {"a/b", bad.relative_to(store.root).as_posix()}
    assert good.exists() and not bad.exists()
    assert (store.quarantine_dir / "failures" / bad.name).is_file()


def _fail_writes_under(monkeypatch, root: Path, *, after_bytes: int) -> list[int]:
    """os.write fails with ENOSPC once a file under ``root`` has taken ``after_bytes``."""
    real = os.write
    written: dict[int, int] = {}
    hits: list[int] = []

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(str(root)):
            return real(fd, data)
        room = after_bytes - written.get(fd, 0)
        if room <= 0:
            hits.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(data[:room]))
        written[fd] = written.get(fd, 0) + n
        return n

    monkeypatch.setattr(os, "write", write)
    return hits


def test_disk_full_mid_write_leaves_nothing_partial(tmp_path, monkeypatch):
    store = FindingsStore(tmp_path / "store")
    first = store.append_findings(_rows(["2.1", "2.2"]), sweep_id="s1", **KW)
    hits = _fail_writes_under(monkeypatch, store.root.resolve(), after_bytes=300)
    with pytest.raises(StoreError) as err:
        store.append_findings(_rows(["2.3", "2.4"]), sweep_id="s2", **KW)
    assert err.value.code == ErrorCode.STORE_FULL and hits
    assert "disk is full" in str(err.value) and "run the sweep again" in str(err.value)
    monkeypatch.undo()
    # nothing partial anywhere: only the first part, no hidden temporary file
    files = sorted(p.name for p in (store.findings_dir).rglob("*") if p.is_file())
    assert files == [first.name]
    assert sorted(store.read_findings()["study_instance_uid"]) == ["2.1", "2.2"]
    # with space again the same rows go in
    store.append_findings(_rows(["2.3", "2.4"]), sweep_id="s2", **KW)
    assert sorted(store.read_findings()["study_instance_uid"]) == ["2.1", "2.2", "2.3", "2.4"]
    assert not (store.root / "quarantine").exists()


def test_sweep_ids_stay_ordered_when_the_clock_goes_backwards(tmp_path):
    store = FindingsStore(tmp_path / "store")
    t = dt.datetime(2026, 3, 1, 2, 0, 0, tzinfo=dt.UTC)
    ids = []
    for step in (0, -3600, -86400 * 30, 5):  # the clock jumps back an hour, then a month
        sid = store.new_sweep_id(now=t + dt.timedelta(seconds=step), host="node")
        store.append_findings(_rows([f"3.{len(ids)}"]), sweep_id=sid, **KW)
        ids.append(sid)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    parts = sorted(p.name for p in store.findings_dir.rglob("*.parquet"))
    assert len(parts) == 4 and [p.split("-node-")[0] for p in parts] == [
        "part-" + i.split("-node-")[0] for i in ids
    ]
    # a manifest from a future clock counts too
    (store.root / "sweeps").mkdir()
    (store.root / "sweeps" / "20991231T235959Z-other-1.json").write_text("{}")
    assert store.new_sweep_id(now=t, host="node") > "20991231T235959Z"


def test_paths_become_keyed_hashes(tmp_path):
    archive = tmp_path / "archive"
    name_dir = archive / "DOE^JANE_19450312"
    key = b"k" * 32
    store = FindingsStore(tmp_path / "store", path_key=key, path_root=archive)
    raw = str(name_dir / "IM0001")
    store.append_failures(
        [
            {
                "stage": "index",
                "scope": "file",
                "path": raw,
                "error_code": "truncated",
                "message": f"cannot read {raw}: file is truncated",
            }
        ],
        sweep_id="s1",
    )
    fails = store.read_failures()
    text = fails.to_csv()
    assert "DOE" not in text and "JANE" not in text and "19450312" not in text
    token = fails.iloc[0]["path"]
    assert token.startswith("path:") and len(token) == 5 + 24
    assert token in fails.iloc[0]["message"]
    # deterministic, relative to the archive root (the same archive elsewhere: same token)
    moved = FindingsStore(tmp_path / "s2", path_key=key, path_root=tmp_path / "elsewhere")
    assert moved.path_token(str(tmp_path / "elsewhere" / "DOE^JANE_19450312" / "IM0001")) == token
    assert FindingsStore(tmp_path / "s3", path_key=b"x" * 32).path_token(raw) != token
    assert FindingsStore(tmp_path / "s4").path_token(raw) == raw  # off by default
