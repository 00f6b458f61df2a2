"""Hostile input at ingest (issue 13): typed refusals and flags in load_series, stray bad copies,
file names that are not UTF-8, and free text scrubbed before it reaches the index."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pydicom
import pytest
from ingest_synth import write_series

from pdacscreen.io.dicom.read import fs_path, header_row, index_path, read_slice
from pdacscreen.io.dicom.scrub import scrub_text
from pdacscreen.io.errors import (
    ErrorCode,
    GeometryError,
    MissingSliceError,
    MixedGeometryError,
    PdacscreenError,
    PixelFormatError,
    TooFewSlicesError,
    VolumeTooLargeError,
)
from pdacscreen.io.index import read_index, update_index
from pdacscreen.io.select import select_series
from pdacscreen.io.volume import MAX_VOLUME_BYTES, MIN_SLICES, load_series

KEY = b"hostile-test-key-0123456789"
BIG = dict(n=44, rows=24, cols=24, step=2.5)  # eligible for selection: 110 mm, tiny images


def _edit(path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def _series(tmp_path, name="s", **kw):
    return write_series(tmp_path / name, n=kw.pop("n", 10), rows=16, cols=16, **kw)


# --- 1. load_series: typed refusals -----------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("ImagePositionPatient", ["nan", "0", "10"], "bad_position"),
        ("ImageOrientationPatient", [0, 0, 0, 0, 0, 0], "bad_orientation"),
        ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "bad_orientation"),  # parallel
        ("PixelSpacing", [0, 0.8], "bad_pixel_spacing"),
        ("PixelSpacing", [-0.8, 0.8], "bad_pixel_spacing"),
        ("PixelSpacing", ["nan", 0.8], "bad_pixel_spacing"),
    ],
)
def test_bad_geometry_values_are_typed_refusals(tmp_path, field, value, code):
    files = _series(tmp_path)
    _edit(files[3], **{field: value})
    with pytest.raises(GeometryError) as e:
        load_series(files, key=KEY)
    assert e.value.code == code and e.value.code in ErrorCode._value2member_map_
    assert field in str(e.value) and "allowed" in str(e.value)


def test_one_slice_far_away_is_refused_before_allocating(tmp_path):
    files = _series(tmp_path)
    _edit(files[-1], ImagePositionPatient=[-25.0, -25.0, 1e12])
    for how in ("refuse", "resample"):
        with pytest.raises(VolumeTooLargeError) as e:
            load_series(files, key=KEY, on_missing_slice=how)
        assert e.value.code == "volume_too_large" and "GiB" in str(e.value)
    # an uneven outlier (not a whole number of steps away) hits the same bound
    _edit(files[-1], ImagePositionPatient=[-25.0, -25.0, 7.3e7])
    with pytest.raises(VolumeTooLargeError):
        load_series(files, key=KEY)
    assert MAX_VOLUME_BYTES == 4 * 1024**3


def test_rescale_slope_zero_is_refused(tmp_path):
    files = _series(tmp_path)
    _edit(files[2], RescaleSlope=0)
    with pytest.raises(PixelFormatError) as e:
        load_series(files, key=KEY)
    assert e.value.code == "bad_rescale" and "RescaleSlope=0" in str(e.value)
    row = header_row(files[2], key=KEY)
    assert row["status"] == "error" and row["error_code"] == "bad_rescale"


def test_non_orthogonal_orientation_is_flagged_or_refused(tmp_path):
    with pytest.raises(GeometryError, match="deg apart") as e:
        load_series(_series(tmp_path, "60", iop=(1, 0, 0, 0.5, 0.866, 0)), key=KEY)
    assert e.value.code == "bad_orientation"
    c, s = np.cos(np.radians(89.0)), np.sin(np.radians(89.0))
    files = _series(tmp_path, iop=(1, 0, 0, c, s, 0))  # row and column 89 deg apart
    vol = load_series(files, key=KEY)
    assert "non_orthogonal_orientation" in vol.flags
    assert "non_orthogonal_orientation" not in load_series(_series(tmp_path, "ok"), key=KEY).flags


def test_one_slice_with_another_pixel_format_is_refused(tmp_path):
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[4])  # the same HU stored unsigned: a consistent file on its own
    hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
    ds.PixelRepresentation, ds.RescaleIntercept = 0, -2048
    ds.PixelData = (hu + 2048).astype(np.uint16).tobytes()
    ds.save_as(files[4], enforce_file_format=True)
    assert read_slice(files[4], key=KEY).stored.dtype == np.uint16
    with pytest.raises(PixelFormatError) as e:
        load_series(files, key=KEY)
    assert e.value.code == "mixed_pixel_format" and "uint16" in str(e.value)
    # BitsAllocated changed without the data: its length contradicts the header
    other = _series(tmp_path, "b")
    _edit(other[1], BitsAllocated=8, BitsStored=8, HighBit=7)
    with pytest.raises(PixelFormatError) as e:
        load_series(other, key=KEY)
    assert e.value.code == "pixel_length_mismatch"


def test_a_slice_of_another_study_is_refused(tmp_path):
    files = _series(tmp_path)
    _edit(files[5], StudyInstanceUID="1.2.826.0.1.3680043.8.498.999")
    with pytest.raises(MixedGeometryError) as e:
        load_series(files, key=KEY)
    assert e.value.code == "mixed_study" and "2 studies" in str(e.value)


def test_two_slices_are_too_few(tmp_path):
    files = _series(tmp_path, n=2)
    with pytest.raises(TooFewSlicesError) as e:
        load_series(files, key=KEY)
    assert e.value.code == "too_few_slices" and f"at least {MIN_SLICES}" in str(e.value)
    assert load_series(files, key=KEY, min_slices=2).shape[0] == 2
    # geometry refusals come first: a gap is named as such, whatever the count
    with pytest.raises(MissingSliceError):
        load_series(_series(tmp_path, "g", positions=[0, 2.5, 5, 10]), key=KEY, min_slices=8)


# --- 2. a stray truncated copy does not make its series ineligible ---------------------------


def test_stray_truncated_copy_does_not_block_the_series(tmp_path):
    root = tmp_path / "archive"
    files = write_series(root / "s", name="s", study="st", description="Abdomen nativ", **BIG)
    good = files[7].read_bytes()
    (root / "s" / "copy_of_IM0007.dcm").write_bytes(good[: len(good) - 300])
    update_index(root, tmp_path / "idx", key=KEY, workers=1)
    df = read_index(tmp_path / "idx")
    bad = df[df["status"] != "ok"]
    assert len(bad) == 1 and bad["error_code"].iloc[0] == "truncated"  # still a failures row
    (sel,) = select_series(df)
    assert sel.status == "selected" and sel.rejections == {}
    assert len(sel.files) == BIG["n"] and not any("copy_of" in f for f in sel.files)
    vol = load_series(list(sel.files), key=KEY, series_instance_uid=sel.series_instance_uid)
    assert vol.shape == (BIG["n"], 24, 24) and "duplicate_files" not in vol.flags
    # a bad file that is NOT a copy of an intact one still makes the series ineligible
    ds = pydicom.dcmread(files[8])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.777"
    ds.save_as(root / "s" / "other.dcm", enforce_file_format=True)
    raw = (root / "s" / "other.dcm").read_bytes()
    (root / "s" / "other.dcm").write_bytes(raw[: len(raw) - 300])
    update_index(root, tmp_path / "idx", key=KEY, workers=1)
    (sel,) = select_series(read_index(tmp_path / "idx"))
    assert sel.status == "no_eligible_series"
    assert any(r.startswith("bad_files: 1 of") for r in next(iter(sel.rejections.values())))


# --- 3. file names that are not UTF-8 ---------------------------------------------------------


def test_index_path_round_trip():
    for real in ("/a/b.dcm", "/a/100%/x.dcm", "/a/%25.dcm", os.fsdecode(b"/a/x\xff\xfe.dcm")):
        text = index_path(real)
        text.encode("utf-8")  # storable
        assert fs_path(text) == real or not os.path.lexists(fs_path(text))
    assert index_path(os.fsdecode(b"/a/x\xff.dcm")) == "/a/x%FF.dcm"
    assert index_path("/a/%25.dcm") == "/a/%2525.dcm" and index_path("/a/b.dcm") == "/a/b.dcm"
    assert fs_path("/a/x%FF.dcm") == os.fsdecode(b"/a/x\xff.dcm")


def test_non_utf8_file_names_index_twice_and_load(tmp_path):
    root = tmp_path / "archive"
    files = write_series(root / "s", name="s", study="st", description="Abdomen nativ", **BIG)
    d = os.fsencode(root / "s")
    os.rename(os.fsencode(files[0]), d + b"/x\xff.dcm")
    os.rename(os.fsencode(files[1]), d + b"/caf\xe9.dcm")  # latin-1 name
    os.rename(os.fsencode(files[2]), d + b"/50%.dcm")  # a literal percent sign
    idx = tmp_path / "idx"
    first = update_index(root, idx, key=KEY, workers=1)
    assert first.new == BIG["n"] and first.bad == 0
    again = update_index(root, idx, key=KEY, workers=1)  # incremental: the same paths match
    assert (again.new, again.changed, again.removed, again.read) == (0, 0, 0, 0)
    df = read_index(idx)
    assert len(df) == BIG["n"] and all(p.encode("utf-8") for p in df["path"])
    assert df["path"].str.endswith("/x%FF.dcm").sum() == 1
    assert df["path"].str.endswith("/50%25.dcm").sum() == 1
    (sel,) = select_series(df)
    assert sel.status == "selected" and len(sel.files) == BIG["n"]
    vol = load_series(list(sel.files), key=KEY, series_instance_uid=sel.series_instance_uid)
    assert vol.shape[0] == BIG["n"]
    os.unlink(d + b"/x\xff.dcm")  # a removal is recorded against the same stored path
    gone = update_index(root, idx, key=KEY, workers=1)
    assert gone.removed == 1 and len(read_index(idx)) == BIG["n"] - 1


# --- 4. free text is scrubbed before it is stored -----------------------------------------------

PLANTED = ("DOE^JANE", "Jane Doe", "JANE", "DOE", "19650412", "MRN7781234")


def test_scrub_text_keeps_imaging_words_only():
    assert scrub_text("DOE^JANE Abdomen nativ 2.5 Br40") == "x^x Abdomen nativ 2.5 Br40"
    assert scrub_text("Oberbauch portalvenös") == "Oberbauch portalvenös"
    assert scrub_text("腹部 単純CT") == "腹部 単純CT"
    assert scrub_text("C+ PV 70s for Jane Doe 19650412") == "C+ PV 70s for x x x"
    assert scrub_text("PAT 12345678 w/o") == "x x w/o"
    assert scrub_text(None) is None


def test_planted_names_never_reach_the_index(tmp_path):
    root = tmp_path / "archive"
    files = write_series(
        root / "s", name="s", study="st", description="DOE^JANE Abdomen nativ 2.5", **BIG
    )
    for f in files:
        _edit(
            f,
            ProtocolName="Jane Doe abdomen",
            StudyDescription="CT ABDOMEN DOE^JANE 19650412",
            ContrastBolusAgent="MRN7781234",
        )
    update_index(root, tmp_path / "idx", key=KEY, workers=1)
    import pyarrow.parquet as pq

    parts = list((tmp_path / "idx").rglob("*"))
    seen = 0
    for part in parts:
        if not part.is_file():
            continue
        raw = part.read_bytes().lower()
        text = []
        if part.suffix == ".parquet":
            t = pq.read_table(part)
            text = [str(v) for col in t.to_pydict().values() for v in col]
            text.append(str(t.schema.metadata))
            seen += t.num_rows
        for s in PLANTED:
            assert s.lower().encode() not in raw, (part, s)
            assert not any(s.lower() in v.lower() for v in text), (part, s)
    assert seen == BIG["n"]
    df = read_index(tmp_path / "idx")
    assert set(df["series_description"]) == {"x^x Abdomen nativ 2.5"}
    assert set(df["protocol_name"]) == {"x x abdomen"}
    (sel,) = select_series(df)  # the scrubbed text still selects the series as non-contrast
    assert sel.status == "selected"
    cand = sel.candidates[0]
    assert cand.contrast_evidence == "noncontrast_description"
    assert cand.notes and "ContrastBolusAgent='x'" in cand.notes[0]  # still seen as an agent
    vol = load_series(list(sel.files), key=KEY)
    assert "jane" not in str(vol.provenance).lower()


def test_every_refusal_code_is_an_error_code(tmp_path):
    """The codes raised above are members of ErrorCode (stable strings for the tables)."""
    for cls in (GeometryError, PixelFormatError, TooFewSlicesError, VolumeTooLargeError):
        assert issubclass(cls, PdacscreenError) and cls.code in ErrorCode._value2member_map_
    shutil.rmtree(tmp_path, ignore_errors=True)
