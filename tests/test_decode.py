"""JPEG 2000 / HTJ2K decoding: threaded decode equals pydicom's plain decode (exact for lossless),
HTJ2K files written with OpenJPH (imagecodecs) load, broken frames keep their typed refusals, only
the chosen series' pixels are read, and the thread count follows the CPUs granted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ingest_synth import phantom_slice, write_series
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
)

from pdacscreen.io.dicom import read as dicomio
from pdacscreen.io.dicom.read import (
    available_cpus,
    decode_slice,
    decode_slices,
    read_header,
    read_slice,
    releases_gil,
)
from pdacscreen.io.errors import DicomReadError, InputError
from pdacscreen.io.volume import load_series

KEY = b"decode-test-key-0123456789"
imagecodecs = pytest.importorskip("imagecodecs")


def _noisy(k: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(k)
    return phantom_slice(size, size, k) + rng.normal(0, 20, (size, size)).astype(np.float32)


def _series(out: Path, n: int = 10, **kw) -> list[Path]:
    return write_series(out, n=n, rows=96, cols=96, image_fn=_noisy, **kw)


def _recode(files: list[Path], ts: str, encode) -> list[Path]:
    """Rewrite each file's pixels as one encapsulated frame ``encode(stored)`` in syntax ``ts``."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = encapsulate([encode(ds.pixel_array)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(f, enforce_file_format=True)
    return files


def _ht_lossless(arr: np.ndarray) -> bytes:
    return imagecodecs.htj2k_encode(arr, reversible=True, tlm=True)  # RPCL order, TLM markers


def _ht_lossy(arr: np.ndarray) -> bytes:
    return imagecodecs.htj2k_encode(arr, reversible=False)  # 9/7 wavelet


def _fast(path: Path) -> np.ndarray | None:
    """The imagecodecs path's own answer for one file (None: left to pydicom's plugin)."""
    h = read_header(path, key=KEY)
    with open(h.file, "rb") as fp:
        return dicomio._j2k_pixels(fp, h.scan, h.info)


def _pydicom_stack(files: list[Path]) -> np.ndarray:
    return np.stack([pydicom.dcmread(f).pixel_array for f in files])


def test_threaded_j2k_decode_equals_pydicom_exactly(tmp_path):
    plain = _series(tmp_path / "plain", n=12)
    j2k = _series(tmp_path / "j2k", n=12, transfer_syntax=JPEG2000Lossless)
    assert releases_gil(JPEG2000Lossless)  # imagecodecs' OpenJPEG decodes it, GIL released
    headers = [read_header(f, key=KEY) for f in j2k]
    threaded = decode_slices(headers, threads=4)
    serial = decode_slices(headers, threads=1)
    ref = _pydicom_stack(j2k)
    np.testing.assert_array_equal(_fast(j2k[0]), ref[0])  # decoded there, not left to pydicom
    for s1, s4, r in zip(serial, threaded, ref, strict=True):
        assert s4.stored.dtype == r.dtype == np.int16
        np.testing.assert_array_equal(s4.stored, r)
        np.testing.assert_array_equal(s1.stored, r)
    np.testing.assert_array_equal(ref, _pydicom_stack(plain))  # lossless: the stored values
    v_plain = load_series(plain, key=KEY)
    for t in (1, 2, 3):
        vol = load_series(list(reversed(j2k)), key=KEY, threads=t)
        np.testing.assert_array_equal(vol.array, v_plain.array)
        assert vol.provenance["transfer_syntaxes"] == [str(JPEG2000Lossless)]
        assert "lossy_compression" not in vol.flags


def test_frame_in_several_fragments(tmp_path):
    files = _series(tmp_path / "s", n=3, transfer_syntax=JPEG2000Lossless)
    ref = _pydicom_stack(files)
    for f in files:
        ds = pydicom.dcmread(f)
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame], fragments_per_frame=3, has_bot=False)
        assert len(list(pydicom.encaps.generate_fragments(ds.PixelData))) == 1 + 3  # BOT, 3
        ds.save_as(f, enforce_file_format=True)
    np.testing.assert_array_equal(_fast(files[0]), ref[0])
    np.testing.assert_array_equal(_pydicom_stack(files), ref)
    got = decode_slices([read_header(f, key=KEY) for f in files], threads=2)
    np.testing.assert_array_equal(np.stack([s.stored for s in got]), ref)


def test_lossy_j2k_equals_pydicom(tmp_path):
    from openjpeg.utils import encode_array

    files = _recode(
        _series(tmp_path / "s", n=5),
        JPEG2000,
        lambda a: encode_array(a, compression_ratios=[15], use_mct=False),
    )
    ref = _pydicom_stack(files)
    np.testing.assert_array_equal(_fast(files[0]), ref[0])
    got = np.stack(
        [s.stored for s in decode_slices([read_header(f, key=KEY) for f in files], threads=2)]
    )
    np.testing.assert_array_equal(got, ref)  # the same OpenJPEG family: equal, not just close
    assert "lossy_compression" in load_series(files, key=KEY, threads=2).flags


@pytest.mark.parametrize("ts", [HTJ2KLossless, HTJ2KLosslessRPCL])
def test_htj2k_lossless_equals_uncompressed(tmp_path, ts):
    plain = _series(tmp_path / "plain")
    ht = _recode(_series(tmp_path / "ht"), ts, _ht_lossless)
    assert pydicom.dcmread(ht[0]).file_meta.TransferSyntaxUID == ts
    assert releases_gil(ts)
    ref = _pydicom_stack(plain)
    np.testing.assert_array_equal(_pydicom_stack(ht), ref)  # pydicom's own decode agrees
    np.testing.assert_array_equal(_fast(ht[0]), ref[0])
    for f, r in zip(ht, ref, strict=True):
        np.testing.assert_array_equal(read_slice(f, key=KEY).stored, r)
    vol = load_series(ht, key=KEY, threads=2)
    np.testing.assert_array_equal(vol.array, load_series(plain, key=KEY).array)
    assert vol.provenance["transfer_syntaxes"] == [str(ts)]
    assert "lossy_compression" not in vol.flags


def test_htj2k_lossy_equals_pydicom_and_is_flagged(tmp_path):
    plain = _series(tmp_path / "plain", n=5)
    ht = _recode(_series(tmp_path / "ht", n=5), HTJ2K, _ht_lossy)
    ref = _pydicom_stack(ht)
    np.testing.assert_array_equal(_fast(ht[0]), ref[0])
    got = np.stack([read_slice(f, key=KEY).stored for f in ht])
    np.testing.assert_array_equal(got, ref)  # equal to pydicom's plugin (same OpenJPEG)
    err = np.abs(ref.astype(np.int32) - _pydicom_stack(plain)).max()
    assert 0 < err <= 2  # irreversible: not exact, still the same image
    vol = load_series(ht, key=KEY, threads=2)
    assert "lossy_compression" in vol.flags


def test_codestream_signed_unlike_header_is_left_to_pydicom(tmp_path):
    """Unsigned 12-bit codestream, PixelRepresentation 1: pydicom's sign correction decides."""
    from openjpeg.utils import encode_array

    files = _series(tmp_path / "s", n=3)
    for f in files:
        ds = pydicom.dcmread(f)
        raw = (ds.pixel_array.astype(np.int32) & 0xFFF).astype(np.uint16)  # 12-bit two's compl.
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = encapsulate([encode_array(raw, bits_stored=12, use_mct=False)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(f, enforce_file_format=True)
    assert _fast(files[0]) is None  # decoded as uint16, the header says int16
    for f in files:
        s = read_slice(f, key=KEY)
        ref = pydicom.dcmread(f).pixel_array
        assert s.stored.dtype == ref.dtype == np.int16 and ref.min() < 0
        np.testing.assert_array_equal(s.stored, ref)


def _break_frame(path: Path, edit) -> None:
    """Replace the file's codestream by ``edit(codestream)``, keeping the items well formed."""
    ds = pydicom.dcmread(path)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([edit(frame)])
    ds.save_as(path, enforce_file_format=True)


def _msg(e: BaseException) -> str:
    return re.sub(r"0x[0-9a-f]+", "0x?", str(e))  # object addresses in decoder messages


def _flip_siz_rows(b: bytes) -> bytes:
    i = b.index(b"\xff\x51") + 13  # SIZ: the low byte of Ysiz (image height)
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (lambda b: b[: len(b) // 2], "unreadable"),  # cut codestream: OpenJPEG refuses it
        (lambda b: b"\x00" * 16 + b[16:], "unreadable"),  # no SOC/SIZ: not a codestream
        (_flip_siz_rows, "unreadable"),  # decodes, but not to Rows x Columns
    ],
)
@pytest.mark.parametrize("ts", [JPEG2000Lossless, HTJ2KLossless])
def test_broken_frame_keeps_the_typed_refusal(tmp_path, ts, edit, code):
    if ts == JPEG2000Lossless:
        files = _series(tmp_path / "s", n=8, transfer_syntax=ts)
    else:
        files = _recode(_series(tmp_path / "s", n=8), ts, _ht_lossless)
    bad = files[5]
    _break_frame(bad, edit)
    # what pydicom's plugin alone says about the frame (the loader's answer before this path)
    h = read_header(bad, key=KEY)
    with pytest.raises(DicomReadError) as plain:
        dicomio._pydicom_pixels(h.file, f"{h.path}: ")
    assert plain.value.code == code and "cannot be decoded" in str(plain.value)
    for threads in (1, 3):
        with pytest.raises(DicomReadError) as e:
            load_series(files, key=KEY, threads=threads)
        assert e.value.code == code and _msg(e.value) == _msg(plain.value)
    with pytest.raises(DicomReadError) as one:
        read_slice(bad, key=KEY)
    assert one.value.code == code and _msg(one.value) == _msg(plain.value)


def test_only_the_chosen_series_pixels_are_read(tmp_path):
    """Files of another series with broken pixels do not stop the chosen series' load: series are
    picked by their headers, before any pixel is decoded."""
    chosen = _series(tmp_path / "a", n=6, transfer_syntax=JPEG2000Lossless)
    other = _series(tmp_path / "b", n=6, name="other", transfer_syntax=JPEG2000Lossless)
    for f in other:
        _break_frame(f, lambda b: b[: len(b) // 3])
    uid = pydicom.dcmread(chosen[0], stop_before_pixels=True).SeriesInstanceUID
    vol = load_series(chosen + other, key=KEY, series_instance_uid=uid, threads=2)
    np.testing.assert_array_equal(vol.array, load_series(chosen, key=KEY).array)
    assert vol.provenance["n_slices_read"] == 6
    with pytest.raises(InputError) as e:  # refused from the headers: no pixel decoded
        load_series(chosen + other, key=KEY)
    assert e.value.code == "mixed_series"


def test_native_and_gil_holding_syntaxes_unchanged(tmp_path):
    from pydicom.uid import RLELossless

    assert not releases_gil(ExplicitVRLittleEndian) and not releases_gil(RLELossless)
    rle = _series(tmp_path / "rle", n=4, transfer_syntax=RLELossless)
    plain = _series(tmp_path / "plain", n=4)
    a, b = load_series(rle, key=KEY, threads=2), load_series(plain, key=KEY, threads=2)
    np.testing.assert_array_equal(a.array, b.array)
    h = read_header(plain[0], key=KEY)
    np.testing.assert_array_equal(decode_slice(h).stored, pydicom.dcmread(plain[0]).pixel_array)


def test_threads_validated():
    with pytest.raises(InputError, match="threads must be >= 1"):
        load_series(["x.dcm"], key=KEY, threads=0)
    with pytest.raises(InputError, match="got 0"):
        decode_slices([], threads=0)


def test_available_cpus_follows_the_affinity_mask():
    assert available_cpus() == len(os.sched_getaffinity(0))
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from pdacscreen.io.dicom.read import available_cpus; print(available_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


@pytest.mark.slow
def test_available_cpus_is_the_ray_grant(local_ray):
    """A Ray task may use the CPUs it was granted, not every CPU of the node (Ray pins none)."""
    import ray

    probe = ray.remote(available_cpus)
    assert ray.get(probe.options(num_cpus=1).remote()) == 1
    assert ray.get(probe.options(num_cpus=2).remote()) == 2
    assert available_cpus() == len(os.sched_getaffinity(0))  # the driver: no grant
