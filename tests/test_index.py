"""Archive index: rows and statuses, bad files, blank UIDs, privacy, incremental updates, CLI."""

from __future__ import annotations

import json
import os
import shutil

import pydicom
import pytest
from ingest_synth import write_series
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from pdacscreen.flows.cli import main as cli_main
from pdacscreen.io import index as index_mod
from pdacscreen.io.dicom.read import INDEX_COLUMNS, header_row
from pdacscreen.io.errors import PseudonymKeyError
from pdacscreen.io.index import read_index, read_removed, update_index
from pdacscreen.io.pseudonym import DEMO_KEY, load_key, patient_key
from pdacscreen.io.select import load_rules

KEY = b"index-test-key-0123456789"
SECRET_ID = "PAT-SECRET-4711"


def _no_pixels(path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.4", "CT"
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture()
def archive(tmp_path):
    root = tmp_path / "archive"
    write_series(root / "p1" / "a" / "b", name="s1", study="st1", n=6, patient_id=SECRET_ID)
    write_series(
        root / "p1" / "jls",
        name="s2",
        study="st1",
        n=4,
        patient_id=SECRET_ID,
        transfer_syntax=JPEGLSLossless,
    )
    write_series(root / "p2", name="s3", study="st2", n=5, patient_id=None, blank_uids=True)
    bad = root / "bad"
    bad.mkdir()
    (bad / "readme.txt").write_text("not a DICOM file")
    good = (root / "p1" / "a" / "b" / "IM0000.dcm").read_bytes()
    (bad / "truncated.dcm").write_bytes(good[: len(good) - 500])
    (bad / "cut_header.dcm").write_bytes(good[:700])
    _no_pixels(bad / "nopix.dcm")
    ds = pydicom.dcmread(root / "p1" / "a" / "b" / "IM0001.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # same image, implicit VR
    ds.save_as(bad / "implicit.dcm", implicit_vr=True, little_endian=True)
    return root


def _row(df, name):
    rows = df[df["path"].str.endswith(os.sep + name)]
    assert len(rows) == 1, name
    return rows.iloc[0]


def test_rows_statuses_and_blank_uids(archive, tmp_path):
    upd = update_index(archive, tmp_path / "idx", key=KEY, workers=1)
    df = read_index(tmp_path / "idx")
    assert len(df) == 6 + 4 + 5 + 5 and upd.new == len(df) and upd.read == len(df)
    assert upd.bad == 4 and set(INDEX_COLUMNS) <= set(df.columns)
    assert _row(df, "readme.txt")["error_code"] == "not_dicom"
    assert _row(df, "truncated.dcm")["error_code"] == "truncated"
    assert _row(df, "cut_header.dcm")["error_code"] == "truncated"
    assert _row(df, "nopix.dcm")["error_code"] == "no_pixel_data"
    imp = _row(df, "implicit.dcm")
    assert imp["status"] == "ok" and imp["transfer_syntax_uid"] == ImplicitVRLittleEndian
    ok = df[df["status"] == "ok"]
    first = ok[ok["path"].str.contains("p1/a/b/IM0000")].iloc[0]
    assert first["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL" and first["rows"] == 64
    assert list(first["image_orientation_patient"]) == [1, 0, 0, 0, 1, 0]
    assert first["series_description"] == "ABD NATIVE 2.5" and first["modality"] == "CT"
    assert first["patient_key"] == patient_key(SECRET_ID, key=KEY)
    blank = df[df["path"].str.contains("/p2/")]
    assert blank["series_instance_uid"].nunique() == 1  # one stable derived series key
    assert blank["sop_instance_uid"].nunique() == 5
    assert all("derived_series_uid" in f and "no_patient_id" in f for f in blank["flags"])
    assert blank["series_instance_uid"].iloc[0].startswith("2.25.")
    # same derived keys from a fresh index (stable) and from a single header read
    update_index(archive, tmp_path / "idx2", key=KEY, workers=1)
    df2 = read_index(tmp_path / "idx2")
    assert sorted(df2["series_instance_uid"].dropna()) == sorted(df["series_instance_uid"].dropna())
    one = header_row(blank["path"].iloc[0], key=KEY)
    assert one["series_instance_uid"] == blank["series_instance_uid"].iloc[0]


def test_patient_id_never_stored(archive, tmp_path):
    update_index(archive, tmp_path / "idx", key=KEY, workers=1)
    for part in (tmp_path / "idx").rglob("*"):
        if part.is_file():
            assert SECRET_ID.encode() not in part.read_bytes(), part
    assert not any(
        "patient_id" in c.lower() and c != "patient_key"
        for c in read_index(tmp_path / "idx").columns
    )


def test_incremental_reads_only_changes(archive, tmp_path):
    idx = tmp_path / "idx"
    first = update_index(archive, idx, key=KEY, workers=1)
    again = update_index(archive, idx, key=KEY, workers=1)
    assert (again.read, again.new, again.changed, again.removed) == (0, 0, 0, 0)
    assert again.unchanged == first.total_present
    # An unchanged file (same size and mtime) is not read again: replace its bytes with garbage
    # of the same size, restore the mtime, and its row must stay as it was.
    victim = archive / "p1" / "a" / "b" / "IM0002.dcm"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = update_index(archive, idx, key=KEY, workers=1)
    assert third.read == 0 and _row(read_index(idx), "b/IM0002.dcm")["status"] == "ok"
    # now change one (mtime), add one, delete one
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    shutil.copy(archive / "p1" / "a" / "b" / "IM0003.dcm", archive / "p1" / "new.dcm")
    (archive / "bad" / "readme.txt").unlink()
    fourth = update_index(archive, idx, key=KEY, workers=1)
    assert (fourth.read, fourth.new, fourth.changed, fourth.removed) == (2, 1, 1, 1)
    df = read_index(idx)
    assert _row(df, "b/IM0002.dcm")["error_code"] == "not_dicom"  # re-read: garbage now
    assert _row(df, "new.dcm")["status"] == "ok"
    assert not df["path"].str.endswith("readme.txt").any()
    removed = read_removed(idx)
    assert removed["path"].str.endswith("readme.txt").tolist() == [True]
    assert len(read_index(idx, include_removed=True)) == len(df) + 1
    # With a tombstone (null mtime) in the index, nothing unchanged is read again (a float64
    # mtime column once made every file look changed after the first deletion)
    fifth = update_index(archive, idx, key=KEY, workers=1)
    assert (fifth.read, fifth.new, fifth.changed, fifth.removed) == (0, 0, 0, 0)
    assert fifth.unchanged == fourth.total_present


def test_compaction_keeps_state(archive, tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "COMPACT_AFTER", 2)
    idx = tmp_path / "idx"
    update_index(archive, idx, key=KEY, workers=1)
    for k in range(3):
        shutil.copy(archive / "p1" / "a" / "b" / "IM0001.dcm", archive / f"copy{k}.dcm")
        update_index(archive, idx, key=KEY, workers=1)
    parts = list((idx / "parts").glob("*.parquet"))
    assert len(parts) <= 2
    df = read_index(idx)
    assert len(df) == 20 + 3 and df["path"].is_unique


def test_dask_processes_give_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "_IN_PROCESS_BELOW", 16)  # use the pool for a small archive
    monkeypatch.setattr(index_mod, "_CHUNK", 8)
    root = tmp_path / "many"
    for s in range(3):
        write_series(root / f"s{s}", name=f"s{s}", study="st", n=24, rows=16, cols=16)
    a = update_index(root, tmp_path / "i1", key=KEY, workers=1)
    b = update_index(root, tmp_path / "i2", key=KEY, workers=2)  # 72 files: Dask processes
    assert a.read == b.read == 72
    cols = [c for c in INDEX_COLUMNS if c not in ("mtime_ns",)]
    d1 = read_index(tmp_path / "i1").sort_values("path")[cols].reset_index(drop=True)
    d2 = read_index(tmp_path / "i2").sort_values("path")[cols].reset_index(drop=True)
    assert d1.astype(str).equals(d2.astype(str))


def test_key_configuration(archive, tmp_path, monkeypatch):
    update_index(archive, tmp_path / "idx", key=KEY, workers=1)
    with pytest.raises(PseudonymKeyError, match="another pseudonym key"):
        update_index(archive, tmp_path / "idx", key=b"another-key-0123456789", workers=1)
    monkeypatch.delenv("PDACSCREEN_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("PDACSCREEN_PSEUDONYM_KEY_FILE", raising=False)
    with pytest.raises(
        PseudonymKeyError, match="(?s)no pseudonym key configured.*secrets.token_hex"
    ):
        load_key()
    assert load_key(demo=True) == DEMO_KEY
    with pytest.raises(PseudonymKeyError, match="non-empty bytes"):
        update_index(archive, tmp_path / "idx2", key=None, workers=1)
    monkeypatch.setenv("PDACSCREEN_PSEUDONYM_KEY", "env-key-0123456789abcdef")
    assert load_key() == b"env-key-0123456789abcdef"
    monkeypatch.delenv("PDACSCREEN_PSEUDONYM_KEY")
    key_file = tmp_path / "key"
    key_file.write_bytes(b"file-key-0123456789abcdef\n")
    monkeypatch.setenv("PDACSCREEN_PSEUDONYM_KEY_FILE", str(key_file))
    assert load_key() == b"file-key-0123456789abcdef"
    assert (
        patient_key(" X1 ", key=b"k") == patient_key("X1", key=b"k") != patient_key("X1", key=b"j")
    )


def test_cli(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDACSCREEN_PSEUDONYM_KEY", "cli-key-0123456789abcdef")
    assert (
        cli_main(["index", str(archive), "--index", str(tmp_path / "idx"), "--workers", "1"]) == 0
    )
    assert "new=20" in capsys.readouterr().out.replace("\n", "")
    out = tmp_path / "sel.jsonl"
    assert cli_main(["select", "--index", str(tmp_path / "idx"), "--out", str(out)]) == 0
    assert f"rules {load_rules().version}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # st1, st2 (blank UIDs) and the studies of nopix.dcm and cut_header.dcm (derived UID)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"no_eligible_series"}
    assert (
        sum(any("z_coverage" in x for rs in r["rejections"].values() for x in rs) for r in rows)
        == 2
    )
