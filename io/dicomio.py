"""Per-file DICOM access: header-only reads into index rows, and pixel decoding into HU.

Two entry points, both per file and both safe to call in worker processes or threads:

* :func:`header_row` reads a file's header only (no pixel decoding) and returns one index row
  (a plain ``dict``).  It never raises for a bad file: the row carries ``status`` ("ok" or
  "error") and an ``error_code`` from :mod:`pdacscreen.io.errors` codes ("not_dicom", "truncated",
  "unreadable", "no_pixel_data", "unsupported_transfer_syntax", "unsupported_image").
  PatientID is turned into ``patient_key`` (keyed hash) and is never put in the row.
* :func:`read_slice` reads one single-frame image fully and returns a :class:`DecodedSlice`:
  stored values as decoded by pydicom's pixel plugins, plus the geometry and rescale fields.
  It raises typed errors (:class:`DicomReadError` and subclasses) naming the file.

:func:`to_hu` turns stored values into HU: ``stored * RescaleSlope + RescaleIntercept``, with
PixelPaddingValue (and PixelPaddingRangeLimit) and out-of-field values (anything below -1024 HU,
e.g. -2000 or -3024) set to air, -1024 HU.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pdacscreen.io.errors import (
    DicomReadError,
    PdacscreenError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from pdacscreen.io.pseudonym import patient_key

__all__ = [
    "AIR_HU",
    "INDEX_COLUMNS",
    "DecodedSlice",
    "check_decodable",
    "derived_uid",
    "header_row",
    "read_slice",
    "to_hu",
]

AIR_HU = -1024.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)

# index column -> (DICOM keyword, kind). kinds: str, multi (backslash-joined), int, float, floats.
_TAGS: dict[str, tuple[str, str]] = {
    "sop_class_uid": ("SOPClassUID", "str"),
    "modality": ("Modality", "str"),
    "image_type": ("ImageType", "multi"),
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
    "convolution_kernel": ("ConvolutionKernel", "multi"),
    "manufacturer": ("Manufacturer", "str"),
    "manufacturer_model_name": ("ManufacturerModelName", "str"),
    "study_date": ("StudyDate", "str"),
    "study_time": ("StudyTime", "str"),
    "lossy_image_compression": ("LossyImageCompression", "str"),
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
    "has_pixel_data",
)


def _value(ds: pydicom.Dataset, keyword: str, kind: str):
    try:
        v = ds.get(keyword, None)
    except Exception:  # noqa: BLE001 - a malformed value is treated as missing
        return None
    if v is None or v == "":
        return None
    try:
        if kind == "str":
            s = str(v).strip(" \x00")
            return s or None
        if kind == "multi":
            vals = v if isinstance(v, list | tuple | pydicom.multival.MultiValue) else [v]
            s = "\\".join(str(x).strip() for x in vals)
            return s or None
        if kind == "int":
            return int(v)
        if kind == "float":
            return float(v)
        if kind == "floats":
            vals = v if isinstance(v, list | tuple | pydicom.multival.MultiValue) else [v]
            return [float(x) for x in vals]
    except (TypeError, ValueError):
        return None
    raise ValueError(f"unknown kind {kind!r}")


def derived_uid(*parts: object) -> str:
    """A stable UID (``2.25.<int>``) from the given parts; used when a UID is blank."""
    h = hashlib.sha256("\x1f".join("" if p is None else str(p) for p in parts).encode())
    return "2.25." + str(int.from_bytes(h.digest()[:16], "big"))


def check_decodable(transfer_syntax_uid: str, *, where: str = "") -> None:
    """Raise :class:`UnsupportedTransferSyntaxError` unless an installed plugin decodes the TS."""
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
            "baseline/extended/lossless, JPEG-LS, JPEG 2000. Transcode the file (e.g. with "
            "gdcmconv or dcmdjpeg) or install a decoder that supports it."
        )


def _pixel_data_check(fp, ds: pydicom.Dataset, size: int) -> str | None:
    """After a stop-before-pixels read: None if pixel data follows intact, else an error code."""
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8:
        return _ended_mid_element(ds, size)
    little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
    implicit = ds.original_encoding[0]
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    if (group << 16 | elem) not in _PIXEL_TAGS:
        return "truncated"  # stopped with bytes left that are not pixel data: a cut element
    if implicit:
        (length,) = struct.unpack(end + "I", head[4:8])
        start = pos + 8
    else:
        if len(head) < 12:
            return "truncated"
        (length,) = struct.unpack(end + "I", head[8:12])
        start = pos + 12
    if length == 0xFFFFFFFF:  # encapsulated: must end with a sequence delimiter item
        fp.seek(max(size - 8, start))
        tail = fp.read(8)
        return None if tail[:4] == b"\xfe\xff\xdd\xe0" else "truncated"
    return None if start + length <= size else "truncated"


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


def _read_header(fp, path: str) -> tuple[pydicom.Dataset, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        except InvalidDicomError:
            fp.seek(0)
            start = fp.read(4)
            # A preamble-less dataset that starts with a group-0008 element (old ACR-NEMA style).
            if len(start) == 4 and start[:2] == b"\x08\x00" and start[3:4] == b"\x00":
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            else:
                raise
    return ds, [str(w.message) for w in caught]


def header_row(path: str | Path, *, key: bytes) -> dict:
    """Index row for one file from a header-only read. Never raises for a bad file."""
    path = str(path)
    row: dict = {c: None for c in INDEX_COLUMNS}
    row.update(path=path, status="ok", flags="", has_pixel_data=False)
    try:
        st = os.stat(path)
        row.update(size=int(st.st_size), mtime_ns=int(st.st_mtime_ns))
        with open(path, "rb") as fp:
            ds, warns = _read_header(fp, path)
            deflated = ds.file_meta.get("TransferSyntaxUID", "") == pydicom.uid.DeflatedExplicitVRLittleEndian
            if deflated:  # the whole dataset is compressed: check pixels with a full read
                fp.seek(0)
                full = pydicom.dcmread(fp)
                pix_err = None if "PixelData" in full else "no_pixel_data"
            else:
                pix_err = _pixel_data_check(fp, ds, row["size"])
    except InvalidDicomError as e:
        return _error(row, "not_dicom", f"not a DICOM file (no DICM prefix): {e}")
    except (EOFError, struct.error) as e:
        return _error(row, "truncated", f"file ends early: {e}")
    except Exception as e:  # noqa: BLE001 - a bad file is a row, never a crashed crawl
        return _error(row, "unreadable", f"{type(e).__name__}: {e}")
    if any("End of file" in w or "EOF" in w for w in warns):
        pix_err = "truncated"
    row["transfer_syntax_uid"] = str(ds.file_meta.get("TransferSyntaxUID", "")) or None
    for col, (kw, kind) in _TAGS.items():
        row[col] = _value(ds, kw, kind)
    flags = _fill_ids(row, ds, key=key)
    row["flags"] = ",".join(flags)
    row["has_pixel_data"] = pix_err is None
    if pix_err is not None:
        msg = {"no_pixel_data": "no pixel data element", "truncated": "pixel data cut short"}
        return _error(row, pix_err, msg[pix_err])
    try:
        _check_image(row, where="")
        if row["transfer_syntax_uid"]:
            check_decodable(row["transfer_syntax_uid"])
    except PdacscreenError as e:
        return _error(row, e.code, str(e))
    return row


def _error(row: dict, code: str, message: str) -> dict:
    row.update(status="error", error_code=code, error_message=message[:500])
    return row


def _fill_ids(row: dict, ds: pydicom.Dataset, *, key: bytes) -> list[str]:
    """patient_key and derived UIDs for blank ones; returns the flags raised."""
    flags: list[str] = []
    pid = _value(ds, "PatientID", "str")
    study = row["study_instance_uid"]
    if study is None:
        flags.append("derived_study_uid")
        study = row["study_instance_uid"] = derived_uid(
            "study", pid and patient_key(pid, key=key), row["study_date"], row["study_time"],
            _value(ds, "AccessionNumber", "str"), _value(ds, "StudyID", "str"),
        )
    if pid is None:
        flags.append("no_patient_id")
        row["patient_key"] = patient_key("study:" + study, key=key)
    else:
        row["patient_key"] = patient_key(pid, key=key)
    if row["series_instance_uid"] is None:
        flags.append("derived_series_uid")
        iop = row["image_orientation_patient"]
        row["series_instance_uid"] = derived_uid(
            "series", study, row["series_number"], row["series_description"], row["modality"],
            row["frame_of_reference_uid"], iop and [round(v, 3) for v in iop],
            row["rows"], row["columns"], row["convolution_kernel"],
        )
    if row["sop_instance_uid"] is None:
        flags.append("derived_sop_uid")
        row["sop_instance_uid"] = derived_uid(
            "sop", row["series_instance_uid"], row["instance_number"],
            row["image_position_patient"], row["acquisition_number"],
            _value(ds, "AcquisitionTime", "str"), _value(ds, "ContentTime", "str"),
        )
    return flags


def _check_image(info: dict, *, where: str) -> None:
    """Refuse images pdacscreen does not load (multi-frame, colour)."""
    nf = info.get("number_of_frames")
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


@dataclass(frozen=True)
class DecodedSlice:
    """One decoded single-frame image.

    ``stored`` is ``(rows, columns)`` as decoded (stored values, not HU).  Geometry fields are in
    patient LPS mm; ``pixel_spacing`` is (row spacing = between rows, column spacing).
    """

    path: str
    stored: np.ndarray
    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None
    transfer_syntax_uid: str
    image_position: tuple[float, float, float] | None
    image_orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    acquisition_number: int | None
    slope: float
    intercept: float
    padding_value: int | None
    padding_limit: int | None
    slice_thickness: float | None
    manufacturer: str | None
    convolution_kernel: str | None
    patient_id_present: bool
    lossy: bool


def read_slice(path: str | Path) -> DecodedSlice:
    """Read and decode one single-frame image (stored values). Raises typed errors."""
    path = str(path)
    where = f"{path}: "
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DicomReadError(f"{where}not a DICOM file: {e}", code="not_dicom") from e
    except (EOFError, struct.error) as e:
        raise DicomReadError(f"{where}file ends early: {e}", code="truncated") from e
    except Exception as e:  # noqa: BLE001
        raise DicomReadError(f"{where}{type(e).__name__}: {e}") from e
    if "PixelData" not in ds:
        raise DicomReadError(f"{where}no pixel data element (7FE0,0010)", code="no_pixel_data")
    ts = str(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian))
    info = {k: _value(ds, kw, kind) for k, (kw, kind) in _TAGS.items()}
    _check_image(info, where=where)
    check_decodable(ts, where=where)
    try:
        stored = ds.pixel_array
    except NotImplementedError as e:
        raise UnsupportedTransferSyntaxError(f"{where}transfer syntax {ts}: {e}") from e
    except Exception as e:  # noqa: BLE001 - bad lengths, corrupt codestreams
        code = "truncated" if "length" in str(e).lower() else "unreadable"
        raise DicomReadError(f"{where}pixel data cannot be decoded: {e}", code=code) from e
    if stored.ndim != 2:
        raise UnsupportedImageError(f"{where}decoded pixel array has shape {stored.shape}, not 2-D")
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    ipp, iop, ps = (info["image_position_patient"], info["image_orientation_patient"],
                    info["pixel_spacing"])
    pad = _value(ds, "PixelPaddingValue", "int")
    pad_lim = _value(ds, "PixelPaddingRangeLimit", "int")
    lossy = (info["lossy_image_compression"] == "01") or UID(ts) in _LOSSY_TS
    return DecodedSlice(
        path=path,
        stored=stored,
        sop_instance_uid=info["sop_instance_uid"],
        series_instance_uid=info["series_instance_uid"],
        study_instance_uid=info["study_instance_uid"],
        transfer_syntax_uid=ts,
        image_position=tuple(ipp) if ipp and len(ipp) == 3 else None,
        image_orientation=tuple(iop) if iop and len(iop) == 6 else None,
        pixel_spacing=tuple(ps) if ps and len(ps) == 2 else None,
        instance_number=info["instance_number"],
        acquisition_number=info["acquisition_number"],
        slope=_value(ds, "RescaleSlope", "float") or 1.0,
        intercept=_value(ds, "RescaleIntercept", "float") or 0.0,
        padding_value=pad,
        padding_limit=pad_lim,
        slice_thickness=info["slice_thickness"],
        manufacturer=info["manufacturer"],
        convolution_kernel=info["convolution_kernel"],
        patient_id_present=_value(ds, "PatientID", "str") is not None,
        lossy=lossy,
    )


_LOSSY_TS = {
    UID("1.2.840.10008.1.2.4.50"),
    UID("1.2.840.10008.1.2.4.51"),
    UID("1.2.840.10008.1.2.4.81"),
    UID("1.2.840.10008.1.2.4.91"),
    UID("1.2.840.10008.1.2.4.203"),
}


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
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)
    if padding_value is not None:
        if padding_limit is not None:
            lo, hi = sorted((padding_value, padding_limit))
            pad = (stored >= lo) & (stored <= hi)
        else:
            pad = stored == padding_value
        out[pad] = AIR_HU
    np.maximum(out, np.float32(AIR_HU), out=out)
    return out
