"""Per-file DICOM access: header-only reads into index rows, and pixel decoding into HU.

Entry points, all per file and safe in worker processes or threads:

* :func:`header_row` reads a file's header only and returns one index row (a ``dict``).  It
  never raises for a bad file: the row carries ``status`` ("ok" or "error") and an
  ``error_code`` ("not_dicom", "truncated", "unreadable", "no_pixel_data",
  "unsupported_transfer_syntax", "multiframe_unsupported", "not_grayscale").  PatientID becomes
  ``patient_key`` (keyed hash) and is never put in the row.
* :func:`read_slice` reads one single-frame image and returns a :class:`DecodedSlice` (stored
  values plus the same header fields).  Raises typed errors naming the file.  It is
  :func:`read_header` (header only, checked: a :class:`SliceHeader`) then :func:`decode_slice`
  (pixels), so a caller can pick files by their headers before any pixel is read;
  :func:`decode_slices` decodes many in threads (up to :func:`available_cpus`, the process's CPU
  grant), which pays where :func:`releases_gil` (JPEG 2000 and HTJ2K through imagecodecs).
* :func:`to_hu`: ``stored * RescaleSlope + RescaleIntercept``; PixelPaddingValue (and
  PixelPaddingRangeLimit) and out-of-field values (below -1024 HU, e.g. -2000, -3024) -> -1024 HU.
* :func:`index_path` / :func:`fs_path`: a file's path as stored in rows (valid UTF-8 text) and
  back.  Bytes of a file name that are not UTF-8 (``os.fsdecode`` turns them into lone surrogates,
  which Parquet cannot store) are written ``%XX`` and a literal ``%`` is written ``%25``; every
  other path is stored as it is.  :func:`header_row` and :func:`read_slice` accept either form.

Hostile input: an image is refused before its pixels are decoded when Rows or Columns is outside
1..:data:`MAX_IMAGE_SIDE` or Rows x Columns x frames x BitsAllocated/8 exceeds
:data:`MAX_IMAGE_BYTES` (``image_too_large``); native pixel data whose length is not
Rows x Columns x BitsAllocated/8 (an even pad byte allowed) is refused (``pixel_length_mismatch``),
as is a RescaleSlope of 0 or a non-finite slope or intercept (``bad_rescale``).  Free text
(SeriesDescription, StudyDescription, ProtocolName, ContrastBolusAgent) is scrubbed
(:func:`pdacscreen.io.dicom.scrub.scrub_text`) before it enters a row.

Headers are read by a small scanner (below) for the common little-endian Part 10
files: it walks element headers, keeps the ~45 tags pdacscreen uses and skips the
rest, and knows exactly where the pixel data starts (so truncation is detected).  Anything it does
not handle (big endian, deflate, no preamble, malformed) goes through ``pydicom.dcmread``; both
paths give identical rows (tested).  Native (uncompressed) pixels are read straight from the file;
JPEG 2000 and HTJ2K (.90, .91, .201, .202, .203) frames by OpenJPEG through imagecodecs, which
releases the GIL (pydicom's plugin, pylibjpeg-openjpeg, holds it and has no threads; it still
decides every frame imagecodecs declines); other compressed ones by pydicom's plugins.
"""

from __future__ import annotations

import functools
import hashlib
import math
import multiprocessing as mp
import multiprocessing.util
import os
import re
import struct
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS

from pdacscreen.io.dicom.scrub import scrub_text
from pdacscreen.io.errors import (
    DicomReadError,
    ErrorCode,
    InputError,
    PdacscreenError,
    PixelFormatError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from pdacscreen.io.pseudonym import patient_key

__all__ = [
    "AIR_HU",
    "INDEX_COLUMNS",
    "DecodedSlice",
    "SliceHeader",
    "available_cpus",
    "check_decodable",
    "decode_slice",
    "decode_slices",
    "derived_uid",
    "fs_path",
    "header_row",
    "index_path",
    "read_header",
    "read_slice",
    "releases_gil",
    "to_hu",
]

AIR_HU = -1024.0
#: Largest Rows or Columns loaded (CT is 512, sometimes 1024; 8192 covers any CT detector).
MAX_IMAGE_SIDE = 8192
#: Largest decoded image, Rows x Columns x frames x BitsAllocated / 8 bytes (8192^2 x 16 bit).
MAX_IMAGE_BYTES = 128 * 1024**2
#: Free-text columns that are scrubbed before they are stored (see :mod:`.scrub`).
FREE_TEXT_COLUMNS = ("series_description", "study_description", "protocol_name")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_NATIVE = {_IMPLICIT_LE, _EXPLICIT_LE}
_LOSSY_TS = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.203",
}

# index column -> (DICOM keyword, kind). kinds: str (backslash-joined values), int, float, floats.
_TAGS: dict[str, tuple[str, str]] = {
    "sop_class_uid": ("SOPClassUID", "str"),
    "modality": ("Modality", "str"),
    "image_type": ("ImageType", "str"),
    "study_instance_uid": ("StudyInstanceUID", "str"),
    "series_instance_uid": ("SeriesInstanceUID", "str"),
    "sop_instance_uid": ("SOPInstanceUID", "str"),
    "frame_of_reference_uid": ("FrameOfReferenceUID", "str"),
    "series_number": ("SeriesNumber", "int"),
    "acquisition_number": ("AcquisitionNumber", "int"),
    "instance_number": ("InstanceNumber", "int"),
    "image_position_patient": ("ImagePositionPatient", "floats"),
    "image_orientation_patient": ("ImageOrientationPatient", "floats"),
    "pixel_spacing": ("PixelSpacing", "floats"),
    "rows": ("Rows", "int"),
    "columns": ("Columns", "int"),
    "number_of_frames": ("NumberOfFrames", "int"),
    "samples_per_pixel": ("SamplesPerPixel", "int"),
    "photometric_interpretation": ("PhotometricInterpretation", "str"),
    "slice_thickness": ("SliceThickness", "float"),
    "gantry_detector_tilt": ("GantryDetectorTilt", "float"),
    "series_description": ("SeriesDescription", "str"),
    "study_description": ("StudyDescription", "str"),
    "protocol_name": ("ProtocolName", "str"),
    "contrast_bolus_agent": ("ContrastBolusAgent", "str"),
    "contrast_bolus_route": ("ContrastBolusRoute", "str"),
    "body_part_examined": ("BodyPartExamined", "str"),
    "convolution_kernel": ("ConvolutionKernel", "str"),
    "manufacturer": ("Manufacturer", "str"),
    "manufacturer_model_name": ("ManufacturerModelName", "str"),
    "study_date": ("StudyDate", "str"),
    "study_time": ("StudyTime", "str"),
    "lossy_image_compression": ("LossyImageCompression", "str"),
}
# read but not index columns (pixel module, derived-UID inputs, PatientID for the keyed hash)
_EXTRA = (
    "PatientID",
    "AccessionNumber",
    "StudyID",
    "AcquisitionTime",
    "ContentTime",
    "SpecificCharacterSet",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
)
_KEYWORDS = tuple(kw for kw, _ in _TAGS.values()) + _EXTRA
_TAG_OF = {kw: tag_for_keyword(kw) for kw in _KEYWORDS}
_KW_OF = {t: kw for kw, t in _TAG_OF.items()}
_VR_OF = {t: dictionary_VR(t) for t in _KW_OF}
_TEXT_VRS = {"SH", "LO", "ST", "LT", "UC", "UT", "PN"}
_NUM_VRS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}

#: Every column of an index row, in order.
INDEX_COLUMNS: tuple[str, ...] = (
    "path",
    "size",
    "mtime_ns",
    "status",
    "error_code",
    "error_message",
    "flags",
    "transfer_syntax_uid",
    *_TAGS,
    "patient_key",
    "accession_key",
    "has_pixel_data",
)


def _canon(kind: str, v):
    """One value in index form from either path (pydicom value, or scanner str / int tuple)."""
    if v is None or isinstance(v, bytes | bytearray):
        return None
    try:
        if isinstance(v, list | tuple | MultiValue):
            if kind == "str":
                v = "\\".join(str(x) for x in v)
            elif kind == "floats":
                return [float(x) for x in v] or None
            elif len(v) == 1:
                v = v[0]
            else:
                return None
        if isinstance(v, str):
            parts = [p.strip(" \x00") for p in v.split("\\")]
            if kind == "str":
                s = "\\".join(parts)
                return s if s.strip("\\") else None
            if not any(parts):
                return None
            if kind == "floats":
                return [float(p) for p in parts]
            if len(parts) != 1:
                return None
            f = float(parts[0])
            if kind == "float":
                return f
            return int(f) if f.is_integer() else None
        if kind == "str":
            return str(v)
        if kind == "floats":
            return [float(v)]
        return float(v) if kind == "float" else int(v)
    except (TypeError, ValueError, OverflowError):
        return None


def derived_uid(*parts: object) -> str:
    """A stable UID (``2.25.<int>``) from the given parts; used when a UID is blank."""
    h = hashlib.sha256("\x1f".join("" if p is None else str(p) for p in parts).encode())
    return "2.25." + str(int.from_bytes(h.digest()[:16], "big"))


_ESCAPED = re.compile(r"%(25|[89A-F][0-9A-F])")


def index_path(path: str | bytes | os.PathLike) -> str:
    """A file-system path as stored in rows: valid UTF-8 text, reversible by :func:`fs_path`.

    Undecodable file-name bytes (lone surrogates from ``os.fsdecode``) become ``%XX`` and a
    literal ``%`` becomes ``%25``; a path with neither is returned unchanged.
    """
    p = os.fsdecode(path)
    if "%" not in p and p.isascii():
        return p
    if "%" not in p and not any("\udc80" <= c <= "\udcff" for c in p):
        return p
    out = []
    for c in p:
        if c == "%":
            out.append("%25")
        elif "\udc80" <= c <= "\udcff":
            out.append(f"%{ord(c) - 0xDC00:02X}")
        else:
            out.append(c)
    return "".join(out)


def _unescape(m: re.Match) -> str:
    return "%" if m.group(1) == "25" else chr(0xDC00 + int(m.group(1), 16))


def fs_path(path: str | bytes | os.PathLike) -> str:
    """The file-system path (``str``, surrogate-escaped) of a path in either form.

    A row's path (:func:`index_path`) is decoded back; a path that is not in row form (it
    exists as it is and its decoded form does not) is returned unchanged.
    """
    p = os.fsdecode(path)
    if "%" not in p:
        return p
    real = _ESCAPED.sub(_unescape, p)
    if real != p and not os.path.lexists(real) and os.path.lexists(p):
        return p
    return real


def _text(message: str) -> str:
    """A message safe for Parquet: lone surrogates (undecodable path bytes) written as escapes."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def check_decodable(transfer_syntax_uid: str, *, where: str = "") -> None:
    """Raise :class:`UnsupportedTransferSyntaxError` unless an installed plugin decodes the TS."""
    if transfer_syntax_uid in _NATIVE:
        return
    from pydicom.pixels import get_decoder

    ts = UID(transfer_syntax_uid)
    try:
        ok = get_decoder(ts).is_available
    except NotImplementedError:
        ok = False
    if not ok:
        name = ts.name if ts.is_valid else "unknown"
        raise UnsupportedTransferSyntaxError(
            f"{where}transfer syntax {ts} ({name}) cannot be decoded by the installed pydicom "
            "plugins (pylibjpeg, pyjpegls, pillow); allowed: native, deflate, RLE, JPEG "
            "baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K. Transcode the file (e.g. with "
            "gdcmconv or dcmdjpeg) or install a decoder that supports it."
        )


# --- the header scanner -----------------------------------------------------------------------


class _Unhandled(Exception):
    """The scanner does not handle this file; use pydicom."""


@dataclass
class _Scan:
    """What the scanner found: decoded values by keyword, TS, and where the pixel data is."""

    values: dict
    ts: str
    pixel_offset: int | None  # byte offset of the pixel value (after the element header)
    pixel_length: int | None  # 0xFFFFFFFF for encapsulated
    error: str | None  # "truncated" | "no_pixel_data" | None


class _Reader:
    def __init__(self, fp, size: int) -> None:
        self.fp, self.size, self.buf = fp, size, bytearray()

    def need(self, end: int) -> None:
        """Make bytes [0, end) available; EOFError if the file is shorter."""
        if end > self.size:  # never ask the file for more than it has (mutated lengths)
            raise EOFError(f"needs {end} bytes, file has {self.size}")
        if end > len(self.buf):
            self.fp.seek(len(self.buf))
            self.buf += self.fp.read(max(end - len(self.buf), 32768))
            if end > len(self.buf):
                raise EOFError(f"needs {end} bytes, file has {len(self.buf)}")


def _element(r: _Reader, off: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value length, header length) of the element at ``off``."""
    r.need(off + 8)
    g, e = struct.unpack_from("<HH", r.buf, off)
    tag = g << 16 | e
    if implicit or g == 0xFFFE:
        return tag, None, struct.unpack_from("<I", r.buf, off + 4)[0], 8
    vr = bytes(r.buf[off + 4 : off + 6])
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unhandled(f"bad VR {vr!r} at {off}")
    if vr in _LONG_VRS:
        r.need(off + 12)
        return tag, vr.decode(), struct.unpack_from("<I", r.buf, off + 8)[0], 12
    return tag, vr.decode(), struct.unpack_from("<H", r.buf, off + 6)[0], 8


def _skip_undefined(r: _Reader, off: int, implicit: bool, depth: int = 0) -> int:
    """Skip the items of an undefined-length sequence starting at ``off``; returns the end."""
    if depth > 16:
        raise _Unhandled("sequences nested too deep")
    while True:
        tag, _, length, hdr = _element(r, off, True)
        off += hdr
        if tag == 0xFFFEE0DD:  # sequence delimiter
            return off
        if tag != 0xFFFEE000:
            raise _Unhandled(f"expected an item at {off - hdr}, got {tag:08X}")
        if length != 0xFFFFFFFF:
            off += length
            continue
        while True:  # item of undefined length: elements up to the item delimiter
            tag, vr, length, hdr = _element(r, off, implicit)
            if tag == 0xFFFEE00D:
                off += hdr
                break
            off += hdr
            if length == 0xFFFFFFFF:
                off = _skip_undefined(r, off, implicit or vr == "UN", depth + 1)
            else:
                off += length


def _decode_value(raw: bytes, tag: int, vr: str | None, charset: list[str], signed: bool):
    vr = vr or _VR_OF[tag]
    if vr == "US or SS":
        vr = "SS" if signed else "US"
    if vr in _NUM_VRS:
        code = _NUM_VRS[vr]
        n = len(raw) // struct.calcsize(code)
        return struct.unpack_from(f"<{n}{code}", raw) if n else None
    if vr in _TEXT_VRS:
        return decode_bytes(raw, charset, TEXT_VR_DELIMS).rstrip("\x00 ")
    return raw.decode("latin-1").rstrip("\x00 ")


def _scan(fp, size: int) -> _Scan:
    """Scan a little-endian Part 10 file up to its pixel data. Raises _Unhandled otherwise."""
    r = _Reader(fp, size)
    off, ts = 132, None
    try:
        r.need(132)
        if bytes(r.buf[128:132]) != b"DICM":
            raise _Unhandled("no DICM prefix")
        while True:  # file meta: explicit VR little endian, group 0002
            r.need(off + 8)
            if struct.unpack_from("<H", r.buf, off)[0] != 0x0002:
                break
            tag, vr, length, hdr = _element(r, off, False)
            if tag == 0x00020010:
                r.need(off + hdr + length)
                ts = bytes(r.buf[off + hdr : off + hdr + length]).decode("latin-1").rstrip("\x00 ")
            off += hdr + length
    except EOFError as e:  # cut inside the preamble or file meta: let pydicom judge
        raise _Unhandled("short file meta") from e
    if ts == "1.2.840.10008.1.2.1.99":
        _check_inflated_size(fp, off)
    if ts is None or ts == "1.2.840.10008.1.2.2" or ts == "1.2.840.10008.1.2.1.99":
        raise _Unhandled(f"transfer syntax {ts}")
    implicit = ts == _IMPLICIT_LE
    raws: dict[int, tuple[bytes, str | None]] = {}
    pixel_offset = pixel_length = None
    error = None
    try:
        while True:
            if off == size:
                error = "no_pixel_data"
                break
            tag, vr, length, hdr = _element(r, off, implicit)
            if tag in _PIXEL_TAGS:
                pixel_offset, pixel_length = off + hdr, length
                break
            off += hdr
            if length == 0xFFFFFFFF:
                off = _skip_undefined(r, off, implicit or vr == "UN")
                continue
            if tag in _KW_OF:
                r.need(off + length)
                raws[tag] = (bytes(r.buf[off : off + length]), vr)
            off += length
            if off > size:
                error = "truncated"
                break
    except EOFError:
        error = "truncated"
    cs_raw = raws.get(_TAG_OF["SpecificCharacterSet"])
    charset = convert_encodings(
        [c.strip() for c in cs_raw[0].decode("latin-1").split("\\")] if cs_raw else None
    )
    pr = raws.get(_TAG_OF["PixelRepresentation"])
    signed = bool(pr and len(pr[0]) >= 2 and struct.unpack_from("<H", pr[0])[0] == 1)
    values = {
        _KW_OF[t]: _decode_value(raw, t, vr, charset, signed) for t, (raw, vr) in raws.items()
    }
    if error is None and pixel_length != 0xFFFFFFFF and pixel_offset + pixel_length > size:
        error = "truncated"
    if error is None and pixel_length == 0xFFFFFFFF:
        fp.seek(max(size - 8, pixel_offset))
        if fp.read(4) != b"\xfe\xff\xdd\xe0":
            error = "truncated"
    return _Scan(
        values=values, ts=ts, pixel_offset=pixel_offset, pixel_length=pixel_length, error=error
    )


_MAX_INFLATED = MAX_IMAGE_BYTES + 64 * 1024**2
_DEFER = 1024**2  # pydicom reads values longer than this lazily (a mutated length is not read)


class _Bounded:
    """A file whose ``read(n)`` never asks for more than the bytes left: a mutated length of 4 GB
    inside a sequence (where pydicom ignores ``defer_size``) is not an allocation of 4 GB."""

    def __init__(self, fp, size: int) -> None:
        self._fp, self._size = fp, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._fp.tell())
        return self._fp.read(left if n is None or n < 0 else min(n, left))

    def __getattr__(self, name: str):
        return getattr(self._fp, name)


def _check_inflated_size(fp, offset: int) -> None:
    """A deflated dataset is inflated whole by pydicom: measure it first, in bounded chunks."""
    fp.seek(offset)
    z, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while chunk := fp.read(65536):
            data = z.decompress(chunk, 1 << 24)
            total += len(data)
            while z.unconsumed_tail and total <= _MAX_INFLATED:
                data = z.decompress(z.unconsumed_tail, 1 << 24)
                total += len(data)
            if total > _MAX_INFLATED:
                raise UnsupportedImageError(
                    f"deflated dataset inflates to more than {_MAX_INFLATED} bytes; allowed up "
                    f"to {_MAX_INFLATED}",
                    code="image_too_large",
                )
            if z.eof:
                break
    except zlib.error:
        pass  # not valid deflate: pydicom reports it
    fp.seek(0)


# --- the pydicom path (fallback) ---------------------------------------------------------------


def _ended_mid_element(ds: pydicom.Dataset, size: int) -> str:
    """No pixel data before EOF: "truncated" if the last element is cut short, else "no_pixel_data"."""
    if len(ds) == 0:
        return "truncated"
    last = ds._dict[max(ds._dict)]
    tell, length, value = (getattr(last, a, None) for a in ("value_tell", "length", "value"))
    if tell is None or length is None or length == 0xFFFFFFFF:
        return "no_pixel_data"  # ends in a sequence: cannot tell, and it has no pixels anyway
    if (isinstance(value, bytes) and len(value) < length) or tell + length != size:
        return "truncated"
    return "no_pixel_data"


def _pydicom_header(fp, size: int) -> _Scan:
    """Header via pydicom (any encoding); pixel data presence checked like the scanner."""
    fp = _Bounded(fp, size)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER)
    except InvalidDicomError:
        fp.seek(0)
        start = fp.read(4)
        # A preamble-less dataset that starts with a group-0008 element (old ACR-NEMA style).
        if not (len(start) == 4 and start[:2] == b"\x08\x00" and start[3:4] == b"\x00"):
            raise
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True, defer_size=_DEFER)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or _IMPLICIT_LE)
    values = {}
    for kw in _KEYWORDS:
        try:
            raw = ds.get_item(_TAG_OF[kw])
            deferred = (
                raw is not None and raw.value is None and (getattr(raw, "length", 0) or 0) > _DEFER
            )
            v = None if deferred else ds.get(kw, None)  # a huge value is not one we read
        except Exception:  # noqa: BLE001 - a malformed value is treated as missing
            v = None
        values[kw] = str(v) if isinstance(v, pydicom.valuerep.PersonName) else v
    if ts == "1.2.840.10008.1.2.1.99":  # deflated: the whole dataset is compressed
        fp.seek(0)
        full = pydicom.dcmread(fp, defer_size=_DEFER)
        return _Scan(values, ts, None, None, None if "PixelData" in full else "no_pixel_data")
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return _Scan(values, ts, None, None, _ended_mid_element(ds, size))
    implicit, little = ds.original_encoding[0], ds.original_encoding[1] is not False
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group << 16 | elem) not in _PIXEL_TAGS:
        return _Scan(values, ts, None, None, "truncated")
    hdr = 8 if implicit else 12
    if len(head) < hdr:
        return _Scan(values, ts, None, None, "truncated")
    length = struct.unpack(end + "I", head[hdr - 4 : hdr])[0]
    err = None
    if length == 0xFFFFFFFF:
        fp.seek(max(size - 8, pos + hdr))
        err = None if fp.read(4) == b"\xfe\xff\xdd\xe0" else "truncated"
    elif pos + hdr + length > size:
        err = "truncated"
    return _Scan(values, ts, pos + hdr, length, err)


def _header(fp, size: int) -> _Scan:
    try:
        return _scan(fp, size)
    except (_Unhandled, struct.error, UnicodeDecodeError, LookupError, ValueError):
        fp.seek(0)
        return _pydicom_header(fp, size)


# --- rows ---------------------------------------------------------------------------------------


def _get(scan: _Scan, keyword: str, kind: str):
    return _canon(kind, scan.values.get(keyword))


def _info(scan: _Scan, *, key: bytes) -> dict:
    info = {col: _get(scan, kw, kind) for col, (kw, kind) in _TAGS.items()}
    info["transfer_syntax_uid"] = scan.ts
    info["flags"] = ",".join(_fill_ids(info, scan, key=key))
    for col in (*FREE_TEXT_COLUMNS, "contrast_bolus_agent"):  # after the derived UIDs: stable
        info[col] = scrub_text(info[col])
    return info


def header_row(path: str | Path, *, key: bytes) -> dict:
    """Index row for one file from a header-only read. Never raises for a bad file."""
    path = fs_path(path)
    row: dict = {c: None for c in INDEX_COLUMNS}
    row.update(path=index_path(path), status="ok", flags="", has_pixel_data=False)
    try:
        st = os.stat(path)
        row.update(size=int(st.st_size), mtime_ns=int(st.st_mtime_ns))
        with open(path, "rb") as fp:
            scan = _header(fp, row["size"])
    except PdacscreenError as e:
        return _error(row, e.code, str(e))
    except InvalidDicomError as e:
        return _error(row, "not_dicom", f"not a DICOM file (no DICM prefix): {e}")
    except (EOFError, struct.error) as e:
        return _error(row, "truncated", f"file ends early: {e}")
    except Exception as e:  # noqa: BLE001 - a bad file is a row, never a crashed crawl
        return _error(row, "unreadable", f"{type(e).__name__}: {e}")
    try:
        row.update(_info(scan, key=key))
    except Exception as e:  # noqa: BLE001 - values no reader expected
        return _error(row, "unreadable", f"header values: {type(e).__name__}: {e}")
    row["has_pixel_data"] = scan.error is None
    if scan.error is not None:
        msg = {"no_pixel_data": "no pixel data element", "truncated": "file cut short"}
        return _error(row, scan.error, msg[scan.error])
    try:
        _check_image(row, where="", bits=_get(scan, "BitsAllocated", "int"))
        check_decodable(scan.ts)
        _rescale(scan, "")
    except PdacscreenError as e:
        return _error(row, e.code, str(e))
    return row


def _error(row: dict, code: str, message: str) -> dict:
    code = str(code) if code in ErrorCode._value2member_map_ else ErrorCode.UNREADABLE
    row.update(status="error", error_code=str(code), error_message=_text(message[:500]))
    return row


def _fill_ids(row: dict, scan: _Scan, *, key: bytes) -> list[str]:
    """patient_key and derived UIDs for blank ones; returns the flags raised."""
    flags: list[str] = []
    pid = _get(scan, "PatientID", "str")
    study = row["study_instance_uid"]
    if study is None:
        flags.append("derived_study_uid")
        study = row["study_instance_uid"] = derived_uid(
            "study",
            pid and patient_key(pid, key=key),
            row["study_date"],
            row["study_time"],
            _get(scan, "AccessionNumber", "str"),
            _get(scan, "StudyID", "str"),
        )
    if pid is None:
        flags.append("no_patient_id")
        row["patient_key"] = patient_key("study:" + study, key=key)
    else:
        row["patient_key"] = patient_key(pid, key=key)
    accession = _get(scan, "AccessionNumber", "str")
    # Domain-separated from patient keys, so an accession never collides with a patient's key.
    row["accession_key"] = patient_key("accession:" + accession, key=key) if accession else None
    if row["series_instance_uid"] is None:
        flags.append("derived_series_uid")
        iop = row["image_orientation_patient"]
        row["series_instance_uid"] = derived_uid(
            "series",
            study,
            row["series_number"],
            row["series_description"],
            row["modality"],
            row["frame_of_reference_uid"],
            iop and [round(v, 3) for v in iop],
            row["rows"],
            row["columns"],
            row["convolution_kernel"],
        )
    if row["sop_instance_uid"] is None:
        flags.append("derived_sop_uid")
        row["sop_instance_uid"] = derived_uid(
            "sop",
            row["series_instance_uid"],
            row["instance_number"],
            row["image_position_patient"],
            row["acquisition_number"],
            _get(scan, "AcquisitionTime", "str"),
            _get(scan, "ContentTime", "str"),
        )
    return flags


def _check_image(info: dict, *, where: str, bits: int | None = None) -> None:
    """Refuse images pdacscreen does not load (multi-frame, colour, absurd sizes), before any
    pixel is decoded."""
    rows, cols, nf = info.get("rows"), info.get("columns"), info.get("number_of_frames")
    for name, v in (("Rows", rows), ("Columns", cols)):
        if v is not None and not 1 <= v <= MAX_IMAGE_SIDE:
            raise UnsupportedImageError(
                f"{where}{name}={v}: allowed 1..{MAX_IMAGE_SIDE}", code="image_too_large"
            )
    if rows and cols:
        need = rows * cols * max(1, nf or 1) * max(1, math.ceil((bits or 16) / 8))
        if need > MAX_IMAGE_BYTES:
            raise UnsupportedImageError(
                f"{where}Rows x Columns x frames x BitsAllocated = {rows}x{cols}x{nf or 1}x"
                f"{bits or 16} bits needs {need} bytes; allowed up to {MAX_IMAGE_BYTES}",
                code="image_too_large",
            )
    if nf is not None and nf > 1:
        raise UnsupportedImageError(
            f"{where}NumberOfFrames={nf}: multi-frame images are not loaded (allowed: 1)",
            code="multiframe_unsupported",
        )
    spp = info.get("samples_per_pixel")
    if spp is not None and spp != 1:
        raise UnsupportedImageError(
            f"{where}SamplesPerPixel={spp}: colour images are not loaded (allowed: 1)",
            code="not_grayscale",
        )


# --- pixels ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedSlice:
    """One decoded single-frame image.

    ``stored`` is ``(rows, columns)`` as decoded (stored values, not HU; see :func:`to_hu`).
    ``info`` holds the same header fields as an index row (UIDs, possibly derived, with
    ``patient_key`` and ``flags``; geometry in patient LPS mm).
    """

    path: str
    stored: np.ndarray
    info: dict
    slope: float
    intercept: float
    padding_value: int | None
    padding_limit: int | None
    lossy: bool


def _native_pixels(fp, scan: _Scan, info: dict, where: str) -> np.ndarray:
    """Uncompressed little-endian pixels straight from the file (as pydicom would return them)."""
    rows, cols = info["rows"], info["columns"]
    alloc = _get(scan, "BitsAllocated", "int")
    stored_bits = _get(scan, "BitsStored", "int") or alloc
    signed = _get(scan, "PixelRepresentation", "int") == 1
    if rows is None or cols is None or alloc not in (8, 16, 32):
        raise UnsupportedImageError(
            f"{where}pixel module not loadable (Rows={rows}, Columns="
            f"{cols}, BitsAllocated={alloc}); allowed BitsAllocated: 8, "
            "16, 32",
            code="unsupported_bits",
        )
    dtype = np.dtype(f"<{'i' if signed else 'u'}{alloc // 8}")
    nbytes = rows * cols * dtype.itemsize
    if scan.pixel_length < nbytes:
        raise DicomReadError(
            f"{where}pixel data has {scan.pixel_length} bytes, a {rows}x{cols} "
            f"image of {alloc} bits needs {nbytes}",
            code="truncated",
        )
    if scan.pixel_length > nbytes + (nbytes & 1):  # a pad byte to even length is allowed
        raise PixelFormatError(
            f"{where}pixel data has {scan.pixel_length} bytes, a {rows}x{cols} image of {alloc} "
            f"bits needs {nbytes}: Rows, Columns or BitsAllocated contradict the data"
        )
    fp.seek(scan.pixel_offset)
    arr = np.empty((rows, cols), dtype=dtype.newbyteorder("="))
    view = memoryview(arr).cast("B")
    if fp.readinto(view) < nbytes:
        raise DicomReadError(f"{where}file ends inside the pixel data", code="truncated")
    if not dtype.isnative:  # big-endian machine reading little-endian data
        arr = arr.byteswap()
    if stored_bits < alloc:  # as pydicom: drop the unused high bits (sign-extending if signed)
        shift = alloc - stored_bits
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def _pydicom_pixels(path: str, where: str) -> np.ndarray:
    try:
        with open(path, "rb") as raw:
            ds = pydicom.dcmread(_Bounded(raw, os.fstat(raw.fileno()).st_size), defer_size=_DEFER)
            arr = ds.pixel_array
    except NotImplementedError as e:
        raise UnsupportedTransferSyntaxError(f"{where}{e}") from e
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - bad lengths, corrupt codestreams, and the Rust
        # decoders' PanicException (a BaseException, not an Exception)
        code = "truncated" if "length" in str(e).lower() else "unreadable"
        raise DicomReadError(f"{where}pixel data cannot be decoded: {e}", code=code) from e
    if arr.ndim != 2:
        raise UnsupportedImageError(f"{where}decoded pixel array has shape {arr.shape}, not 2-D")
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def _rescale(scan: _Scan, where: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept); absent: (1, 0).  A slope of 0 would make every voxel
    equal, and a non-finite value every voxel NaN: both refused (``bad_rescale``)."""
    slope, intercept = _get(scan, "RescaleSlope", "float"), _get(scan, "RescaleIntercept", "float")
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if slope == 0 or not math.isfinite(slope) or not math.isfinite(intercept):
        raise PixelFormatError(
            f"{where}RescaleSlope={slope}, RescaleIntercept={intercept}: allowed a finite, "
            "non-zero slope and a finite intercept",
            code="bad_rescale",
        )
    return slope, intercept


#: JPEG 2000 and HTJ2K (lossless, lossless RPCL, lossy): OpenJPEG decodes them all.
_J2K_TS = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)
_MAX_ENCAPSULATED = MAX_IMAGE_BYTES + 64 * 1024**2  # larger: left to pydicom (and refused)


@functools.cache
def _imagecodecs():
    """imagecodecs, whose JPEG 2000 codec (OpenJPEG) releases the GIL; None when it is missing."""
    try:
        import imagecodecs
    except ImportError:
        return None
    return imagecodecs if imagecodecs.JPEG2K.available else None


def releases_gil(transfer_syntax_uid: str) -> bool:
    """Whether this process decodes the transfer syntax without holding the GIL, so that threads
    scale (JPEG 2000 and HTJ2K through imagecodecs).  pydicom's plugins hold it (measured: two
    threads are no faster than one), and pylibjpeg-openjpeg 2.6 has no threads of its own (its
    OpenJPEG is built without thread support: ``OPJ_NUM_THREADS`` changes nothing)."""
    return transfer_syntax_uid in _J2K_TS and _imagecodecs() is not None


def _one_frame(data: bytes) -> bytes:
    """The codestream of a single-frame encapsulated Pixel Data value: its items after the Basic
    Offset Table, joined.  ``ValueError`` when the items do not parse."""
    off, parts = 0, []
    while True:
        if off + 8 > len(data):
            raise ValueError("no sequence delimiter after the fragments")
        group, elem, length = struct.unpack_from("<HHI", data, off)
        off += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000) or off + length > len(data):
            raise ValueError(f"bad item ({group:04X},{elem:04X}) of {length} bytes")
        parts.append(data[off : off + length])
        off += length
    if len(parts) < 2:
        raise ValueError("no fragment after the Basic Offset Table")
    return parts[1] if len(parts) == 2 else b"".join(parts[1:])


def _j2k_pixels(fp, scan: _Scan, info: dict) -> np.ndarray | None:
    """One JPEG 2000 / HTJ2K frame decoded by OpenJPEG through imagecodecs (the GIL released, no
    decoder threads: frames are decoded in parallel instead, :func:`decode_slices`).

    ``None`` leaves the frame to pydicom's plugin (pylibjpeg-openjpeg, the same OpenJPEG family,
    strict in both: equal pixels, the same codestreams refused, tested): imagecodecs missing,
    items or a codestream it cannot read, or a result other than the ``(Rows, Columns)`` array
    of the header's pixel format (e.g. a codestream signed unlike PixelRepresentation, which
    pydicom corrects).  OpenJPH (imagecodecs' HTJ2K codec, twice as fast) is not used: it decodes
    a truncated codestream without an error.
    """
    codec = _imagecodecs()
    if codec is None or scan.pixel_offset is None or scan.pixel_length != 0xFFFFFFFF:
        return None
    alloc = _get(scan, "BitsAllocated", "int")
    size = os.fstat(fp.fileno()).st_size
    if alloc not in (8, 16, 32) or size - scan.pixel_offset > _MAX_ENCAPSULATED:
        return None
    fp.seek(scan.pixel_offset)
    try:
        arr = codec.jpeg2k_decode(_one_frame(fp.read(size - scan.pixel_offset)), numthreads=1)
    except Exception:  # noqa: BLE001 - pydicom's plugin decides and names the error
        return None
    signed = _get(scan, "PixelRepresentation", "int") == 1
    want = np.dtype(f"{'i' if signed else 'u'}{alloc // 8}")
    if arr.shape != (info["rows"], info["columns"]) or arr.dtype != want:
        return None
    return arr


@dataclass(frozen=True)
class SliceHeader:
    """A single-frame image's header, read and checked, before any pixel is read.

    ``path``: the row form (:func:`index_path`); ``file``: the file-system path; ``info``: the
    index-row fields (as :attr:`DecodedSlice.info`); ``slope``/``intercept``: the checked rescale.
    """

    path: str
    file: str
    info: dict
    slope: float
    intercept: float
    scan: _Scan


def _typed(where: str, e: BaseException, what: str) -> DicomReadError:
    """The typed error for an unexpected exception while reading a file."""
    if isinstance(e, InvalidDicomError):
        return DicomReadError(f"{where}not a DICOM file: {e}", code="not_dicom")
    if isinstance(e, EOFError | struct.error):
        return DicomReadError(f"{where}file ends early: {e}", code="truncated")
    if isinstance(e, OSError):
        return DicomReadError(f"{where}{e}")
    return DicomReadError(f"{where}{what} unreadable: {type(e).__name__}: {e}")


def read_header(path: str | Path, *, key: bytes) -> SliceHeader:
    """Read and check one single-frame image's header; no pixel is read. Raises typed errors
    (those :func:`read_slice` raises before decoding).  ``path``: either form."""
    real = fs_path(path)
    path = index_path(real)
    where = f"{_text(path)}: "
    try:
        with open(real, "rb") as fp:
            scan = _header(fp, os.fstat(fp.fileno()).st_size)
        if scan.error is not None:
            raise DicomReadError(f"{where}{scan.error.replace('_', ' ')}", code=scan.error)
        info = _info(scan, key=key)
        _check_image(info, where=where, bits=_get(scan, "BitsAllocated", "int"))
        check_decodable(scan.ts, where=where)
        slope, intercept = _rescale(scan, where)
    except PdacscreenError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed headers (deep nesting, bad values ...)
        raise _typed(where, e, "header") from e
    return SliceHeader(path, real, info, slope, intercept, scan)


def decode_slice(header: SliceHeader) -> DecodedSlice:
    """Decode the pixels of a :func:`read_header` result (stored values). Raises typed errors.

    Native pixels are read straight from the file, JPEG 2000 / HTJ2K frames by
    :func:`_j2k_pixels` (GIL released), everything else (and what that declines) by pydicom's
    plugins.  Safe to call from several threads.
    """
    scan, info = header.scan, header.info
    where = f"{_text(header.path)}: "
    stored = None
    try:
        with open(header.file, "rb") as fp:
            if scan.ts in _NATIVE and scan.pixel_offset is not None:
                stored = _native_pixels(fp, scan, info, where)
            elif scan.ts in _J2K_TS:
                stored = _j2k_pixels(fp, scan, info)
    except PdacscreenError:
        raise
    except Exception as e:  # noqa: BLE001 - a file changed or cut since its header was read
        raise _typed(where, e, "pixel data") from e
    if stored is None:
        stored = _pydicom_pixels(header.file, where)
    if stored.shape != (info["rows"], info["columns"]):
        raise PixelFormatError(
            f"{where}decoded image is {stored.shape}, the header says Rows={info['rows']}, "
            f"Columns={info['columns']}"
        )
    return DecodedSlice(
        path=header.path,
        stored=stored,
        info=info,
        slope=header.slope,
        intercept=header.intercept,
        padding_value=_get(scan, "PixelPaddingValue", "int"),
        padding_limit=_get(scan, "PixelPaddingRangeLimit", "int"),
        lossy=info["lossy_image_compression"] == "01" or scan.ts in _LOSSY_TS,
    )


def read_slice(path: str | Path, *, key: bytes) -> DecodedSlice:
    """Read and decode one single-frame image (stored values). Raises typed errors.

    ``path``: a file-system path or a row's path (:func:`index_path`); ``DecodedSlice.path`` is
    the row form."""
    return decode_slice(read_header(path, key=key))


def decode_slices(headers: Sequence[SliceHeader], *, threads: int) -> list[DecodedSlice]:
    """Decode ``headers`` in order, in up to ``threads`` threads, one frame per thread at a time.

    Threads pay only where the decoder releases the GIL (:func:`releases_gil`); ``threads`` should
    not exceed the CPUs granted (:func:`available_cpus`).  The first error in file order is raised;
    frames not yet started are then cancelled.
    """
    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    if threads == 1 or len(headers) < 2:
        return [decode_slice(h) for h in headers]
    with ThreadPoolExecutor(min(threads, len(headers)), thread_name_prefix="decode") as pool:
        futures = [pool.submit(decode_slice, h) for h in headers]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def available_cpus() -> int:
    """CPUs this process may decode on: the CPU grant of the Ray task or actor it runs in (Ray
    pins no CPUs, so the affinity mask would overstate a 1-CPU loader), else the CPU affinity
    mask (``os.sched_getaffinity``: a container's or ``taskset``'s limit)."""
    ray = sys.modules.get("ray")  # Ray only when it is already loaded: never imported here
    # and only inside a runtime (a Ray worker, or a driver after ray.init): asked outside one,
    # get_runtime_context() starts a local Ray (15-20 s)
    if ray is not None and ray.is_initialized():
        try:
            grant = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:  # noqa: BLE001 - the driver or no runtime: no grant to respect
            pass
        else:
            return max(1, int(grant or 1))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks on this OS
        return max(1, os.cpu_count() or 1)


def to_hu(
    stored: np.ndarray,
    *,
    slope: float,
    intercept: float,
    padding_value: int | None = None,
    padding_limit: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stored values -> HU (float32), padding and out-of-field (< -1024 HU) set to -1024 HU.

    ``padding_value``/``padding_limit`` are PixelPaddingValue/PixelPaddingRangeLimit in stored
    units; with a limit, every stored value between the two (inclusive) is padding.
    """
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if slope == 1.0:
        np.add(stored, np.float32(intercept), out=out, casting="unsafe")
    else:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
        out += np.float32(intercept)
    if padding_value is not None:
        if padding_limit is not None:
            lo, hi = sorted((padding_value, padding_limit))
            out[(stored >= lo) & (stored <= hi)] = AIR_HU
        elif padding_value * slope + intercept > AIR_HU:  # else the clip below covers it
            out[stored == padding_value] = AIR_HU
    np.maximum(out, np.float32(AIR_HU), out=out)
    return out


# --- worker processes shared by the index crawl and series decoding ---------------------------

_POOLS: dict[int, ProcessPoolExecutor] = {}


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes shared by the index crawl and the series decoder until
    :func:`shutdown_worker_pools` (the sweep calls it after indexing) or the process exits, so a
    second call does not pay their start again (forkserver with this module preloaded: safe with
    threads).

    The exit hook is a ``multiprocessing`` finalizer, not ``atexit``: a process that was itself
    started by ``multiprocessing`` (as Prefect's runner starts each flow run) joins its children
    before any ``atexit`` hook runs, so idle workers that were never told to stop hung its exit.
    """
    pool = _POOLS.get(workers)
    if pool is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["pdacscreen.io.dicom.read"])
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        _POOLS[workers] = pool
        multiprocessing.util.Finalize(
            pool, pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, exitpriority=10
        )
    return pool


def shutdown_worker_pools() -> None:
    """End every shared worker pool now (their processes exit; the next call starts new ones)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.shutdown(wait=True, cancel_futures=True)


def drop_worker_pool(workers: int, *, kill: bool = False) -> None:
    """Forget a broken pool so the next call starts a fresh one; ``kill``: end its processes
    first (a decode that hangs in a C decoder cannot be interrupted any other way)."""
    pool = _POOLS.pop(workers, None)
    if kill and pool is not None:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
