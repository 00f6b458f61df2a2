"""DICOM series -> :class:`CTVolume` (HU, true geometry), and the ``pdacscreen volume`` command.

Geometry comes from ImageOrientationPatient (IOP) and ImagePositionPatient (IPP) only: slices are
ordered by the projection of IPP on the slice normal ``n = row_dir x col_dir``, never by
InstanceNumber or SliceLocation, and the tilt tag is ignored.  What :func:`load_series` does with
each irregular case (tolerance ``tol = max(0.01 mm, 2 % of the step)``):

=====================  =====================================================================
case                   behaviour
=====================  =====================================================================
several series         refused unless ``series_instance_uid`` picks one (``InputError``)
duplicate file         same SOPInstanceUID twice: one kept, flag ``duplicate_files``
duplicate position     several images at one position: identical pixels -> one kept, flag
                       ``duplicate_positions``; different pixels -> ``DuplicatePositionError``
single image           ``NotAVolumeError``; all images at one position -> ``NotAVolumeError``
mixed matrix / pixel   ``MixedGeometryError`` (names the values found)
spacing / orientation
missing slice          gap that is a whole multiple of the step: ``MissingSliceError`` (names
                       the gap), or with ``on_missing_slice="resample"`` linear interpolation,
                       flag ``missing_slice_interpolated``
uneven spacing         any other varying gap: resampled (linear, along the slice line) onto a
                       regular grid at the median gap, flag ``uneven_spacing``; with
                       ``on_uneven="refuse"`` -> ``UnevenSpacingError``
gantry tilt            the step between slices is not along the normal: kept as acquired, the
                       affine's slice column is the true (sheared) step vector so world
                       coordinates are exact; flag ``gantry_tilt``, ``provenance["tilt_deg"]``
non-collinear slices   IPPs not on one line: ``GeometryError`` (code ``non_collinear``)
padding, out of field  PixelPaddingValue(/RangeLimit) and values below -1024 HU -> -1024 HU
compressed pixels      JPEG 2000 / HTJ2K by OpenJPEG through imagecodecs (GIL released,
                       ``threads`` threads), the rest by pydicom's plugins; a frame that fails
                       to decode: ``DicomReadError`` (``unreadable`` / ``truncated``), as
                       pydicom names it; unsupported -> UnsupportedTransferSyntaxError
lossy compression      loaded, flag ``lossy_compression``
multi-frame, colour    ``UnsupportedImageError``
bad geometry values    NaN/inf or wrong count in ImagePositionPatient (``bad_position``), an
                       ImageOrientationPatient with a zero or parallel row/column vector
                       (``bad_orientation``), PixelSpacing <= 0 or NaN (``bad_pixel_spacing``):
                       ``GeometryError`` naming the field, the value and what is allowed
non-orthogonal IOP     row . column between 1e-3 and 0.1 (0.06 to 5.7 deg off 90): loaded,
                       flag ``non_orthogonal_orientation``; above 0.1: ``bad_orientation``
rescale slope 0        ``PixelFormatError`` (``bad_rescale``): every voxel would be equal
mixed pixel format     slices with different BitsAllocated / PixelRepresentation (decoded
                       dtypes): ``PixelFormatError`` (``mixed_pixel_format``)
another study merged   a slice whose StudyInstanceUID differs from the rest: refused,
                       ``MixedGeometryError`` (``mixed_study``); which slice is wrong cannot be
                       told from the files, so none is dropped silently
too few slices         fewer than ``min_slices`` (default :data:`MIN_SLICES` = 3) distinct
                       positions: ``TooFewSlicesError`` (``too_few_slices``)
hung decoder           in the decoder pool (RLE / JPEG / JPEG-LS, > 16 files, ``workers`` > 1): a
                       chunk over ``DECODE_BUDGET_S`` per file is killed, ``DicomReadError``
                       (``decode_timeout``); decoding in this process (threads included) has no
                       budget (the sweep's loader timeout kills its task)
too large              decoded slices, the volume or its resampled grid above
                       :data:`MAX_VOLUME_BYTES` (4 GiB; e.g. one slice at z = 1e12 mm):
                       ``VolumeTooLargeError`` (``volume_too_large``), before allocating it
=====================  =====================================================================

Output: ``array`` float32 HU ``(z, y, x)``; ``spacing`` ``(dz, dy, dx)`` mm with ``dz`` the
distance between slice centres along the normal; ``affine`` maps ``(k, j, i, 1)`` to LPS mm.
Headers are read first (no pixels), so only the chosen series' pixels are decoded.  Uncompressed
pixels are copied straight from the files in this process; JPEG 2000 / HTJ2K frames are decoded
in ``threads`` threads of this process (imagecodecs' OpenJPEG releases the GIL; the default is the
CPU grant: 1 in the sweep's 1-CPU loader task); other compressed series by a pool of ``workers``
processes (the JPEG / JPEG-LS / RLE decoders hold the GIL, measured: two threads are no faster
than one).  Only one series is held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdacscreen.io.dicom.read import (
    _NATIVE,
    AIR_HU,
    DecodedSlice,
    SliceHeader,
    available_cpus,
    decode_slice,
    decode_slices,
    drop_worker_pool,
    read_header,
    read_slice,
    releases_gil,
    to_hu,
    worker_pool,
)
from pdacscreen.io.errors import (
    DicomReadError,
    DuplicatePositionError,
    GeometryError,
    InputError,
    MissingSliceError,
    MixedGeometryError,
    NotAVolumeError,
    PixelFormatError,
    TooFewSlicesError,
    UnevenSpacingError,
    VolumeTooLargeError,
)
from pdacscreen.io.pseudonym import check_key
from pdacscreen.io.types import CTVolume, affine_from_geometry

__all__ = ["MAX_VOLUME_BYTES", "MIN_SLICES", "load_series", "series_geometry", "SeriesGeometry"]

log = logging.getLogger(__name__)

_POS_TOL_MM = 0.01
_REL_TOL = 0.02
_DIR_TOL = 1e-3
_TILT_MIN_DEG = 0.1
_ORTHO_FLAG = 1e-3  # |row . column| above this: flag non_orthogonal_orientation
_ORTHO_MAX = 0.1  # above this: refused (bad_orientation)
#: Fewest distinct slice positions :func:`load_series` calls a volume (two gaps: a step can be
#: told from a gap).  Screening asks for more (selection rules: ``min_slices``, z coverage).
MIN_SLICES = 3
#: Largest float32 volume (and sum of decoded slices) :func:`load_series` allocates, bytes.
MAX_VOLUME_BYTES = 4 * 1024**3
#: Decode budget per compressed file in the decoder pool, seconds (a hung decoder is killed).
DECODE_BUDGET_S = 30.0


@dataclass(frozen=True)
class SeriesGeometry:
    """Slice geometry of a series, before any resampling.

    ``order``: indices of the input slices sorted along the normal; ``positions``: their
    distances along the normal (mm, ascending); ``gaps``: ``diff(positions)``; ``step``: median gap
    (mm); ``step_vector``: mean IPP difference per slice (LPS mm, the sheared step for a tilted
    series); ``tilt_deg``: angle between ``step_vector`` and the normal; ``kind``: "regular",
    "missing_slice" or "uneven"; ``missing``: slices missing per gap (0 where none).
    """

    order: tuple[int, ...]
    positions: tuple[float, ...]
    gaps: tuple[float, ...]
    step: float
    step_vector: tuple[float, float, float]
    normal: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    origin: tuple[float, float, float]
    tilt_deg: float
    kind: str
    missing: tuple[int, ...]
    row_col_dot: float = 0.0  # |row_dir . col_dir| (0 for an orthogonal orientation)


def _tol(step: float) -> float:
    return max(_POS_TOL_MM, _REL_TOL * abs(step))


def series_geometry(infos: Sequence[dict], *, series: str = "") -> SeriesGeometry:
    """Geometry of single-frame slices from their header fields (index-row style dicts).

    Raises typed errors for what cannot form a volume (see the module docstring).
    """
    where = f"series {series or '?'}: "
    n = len(infos)
    if n == 0:
        raise InputError(f"{where}no files given")
    if n == 1:
        raise NotAVolumeError(f"{where}a single image is not a volume (need >= 2 slices)")
    for key_, name in (
        ("image_orientation_patient", "ImageOrientationPatient"),
        ("image_position_patient", "ImagePositionPatient"),
        ("pixel_spacing", "PixelSpacing"),
    ):
        bad = [i for i in infos if not i.get(key_)]
        if bad:
            raise GeometryError(
                f"{where}{name} missing in {len(bad)} of {n} files (e.g. {bad[0].get('path')})",
                code="missing_geometry",
            )
    _check_values(infos, where)
    shapes = sorted({(i["rows"], i["columns"]) for i in infos})
    if len(shapes) > 1:
        raise MixedGeometryError(
            f"{where}mixed matrix sizes (rows, columns) {shapes}; allowed: one"
        )
    iops = np.array([i["image_orientation_patient"] for i in infos], float)
    if np.abs(iops - iops[0]).max() > _DIR_TOL:
        raise MixedGeometryError(
            f"{where}mixed ImageOrientationPatient: "
            f"{sorted({tuple(np.round(v, 4)) for v in iops})[:3]}"
        )
    pss = np.array([i["pixel_spacing"] for i in infos], float)
    if np.abs(pss - pss[0]).max() > 1e-4:
        raise MixedGeometryError(f"{where}mixed PixelSpacing {sorted({tuple(v) for v in pss})[:3]}")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    dot = float(abs(row_dir @ col_dir))
    if dot > _ORTHO_MAX:
        raise GeometryError(
            f"{where}ImageOrientationPatient {list(iops[0])}: row and column directions are "
            f"{np.degrees(np.arccos(min(dot, 1.0))):.1f} deg apart; allowed: 90 +- "
            f"{np.degrees(np.arcsin(_ORTHO_MAX)):.1f} deg",
            code="bad_orientation",
        )
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    ipp = np.array([i["image_position_patient"] for i in infos], float)
    d = ipp @ normal
    order = np.argsort(d, kind="stable")
    d, ipp = d[order], ipp[order]
    gaps = np.diff(d)
    if d[-1] - d[0] <= _POS_TOL_MM:
        raise NotAVolumeError(
            f"{where}all {n} images lie at one position ({d[0]:.2f} mm along the "
            "normal): not a volume (several acquisitions, echoes or a time series?)"
        )
    if (gaps <= _POS_TOL_MM).any():
        k = int(np.argmax(gaps <= _POS_TOL_MM))
        raise DuplicatePositionError(
            f"{where}{int((gaps <= _POS_TOL_MM).sum())} images share a slice position with "
            f"another (first at {d[k]:.2f} mm along the normal); allowed: one image per position"
        )
    step = float(np.median(gaps))
    tol = _tol(step)
    multiples = np.maximum(np.rint(gaps / step), 1)
    if np.abs(gaps - step).max() <= tol:
        kind, missing = "regular", np.zeros(len(gaps), int)
    elif np.abs(gaps - multiples * step).max() <= tol and (multiples >= 2).any():
        kind, missing = "missing_slice", (multiples - 1).astype(int)
    else:
        kind, missing = "uneven", np.zeros(len(gaps), int)
    # the slice line: IPPs must be collinear; the step vector is the direction per mm of normal
    span = ipp[-1] - ipp[0]
    per_mm = span / (d[-1] - d[0])  # LPS displacement per mm along the normal
    resid = ipp - (ipp[0] + np.outer(d - d[0], per_mm))
    if np.linalg.norm(resid, axis=1).max() > max(tol, 0.05):
        raise GeometryError(
            f"{where}slice positions are not on one line (max deviation "
            f"{np.linalg.norm(resid, axis=1).max():.3f} mm)",
            code="non_collinear",
        )
    step_vector = per_mm * step
    cosang = float(np.clip(abs(per_mm @ normal) / np.linalg.norm(per_mm), -1, 1))
    tilt = float(np.degrees(np.arccos(cosang)))
    return SeriesGeometry(
        order=tuple(int(o) for o in order),
        positions=tuple(float(v) for v in d),
        gaps=tuple(float(g) for g in gaps),
        step=step,
        step_vector=tuple(float(v) for v in step_vector),
        normal=tuple(float(v) for v in normal),
        row_dir=tuple(float(v) for v in row_dir),
        col_dir=tuple(float(v) for v in col_dir),
        pixel_spacing=(float(pss[0, 0]), float(pss[0, 1])),
        origin=tuple(float(v) for v in ipp[0]),
        tilt_deg=tilt,
        kind=kind,
        missing=tuple(int(m) for m in missing),
        row_col_dot=dot,
    )


_VALUE_CHECKS = (
    ("image_position_patient", "ImagePositionPatient", 3, "bad_position"),
    ("image_orientation_patient", "ImageOrientationPatient", 6, "bad_orientation"),
    ("pixel_spacing", "PixelSpacing", 2, "bad_pixel_spacing"),
)


def _check_values(infos: Sequence[dict], where: str) -> None:
    """Refuse geometry values that are not numbers a volume can be built from."""
    for key_, name, size, code in _VALUE_CHECKS:
        for i in infos:
            v = np.asarray(i[key_], float)
            ok = v.shape == (size,) and bool(np.isfinite(v).all())
            if ok and key_ == "pixel_spacing":
                ok = bool((v > 0).all()) and bool((v < 1e4).all())
            if ok and key_ == "image_orientation_patient":
                r, c = np.linalg.norm(v[:3]), np.linalg.norm(v[3:])
                ok = r > 1e-6 and c > 1e-6 and np.linalg.norm(np.cross(v[:3], v[3:])) > 1e-6 * r * c
            if not ok:
                allowed = {
                    "bad_position": "3 finite numbers (mm)",
                    "bad_orientation": "6 finite numbers: two non-zero, non-parallel directions",
                    "bad_pixel_spacing": "2 finite numbers > 0 (mm)",
                }[code]
                raise GeometryError(
                    f"{where}{name}={i[key_]} in {i.get('path')}; allowed: {allowed}", code=code
                )


def _n_regular(positions: np.ndarray, step: float) -> int:
    """Slices of the regular grid from the first to the last position at ``step``."""
    return int(np.floor((positions[-1] - positions[0]) / step + 1e-6)) + 1


def _check_bytes(n: int, rows: int, cols: int, what: str, where: str) -> None:
    need = n * rows * cols * 4
    if need > MAX_VOLUME_BYTES:
        raise VolumeTooLargeError(
            f"{where}{what} of {n} x {rows} x {cols} float32 voxels needs {need / 1024**3:.1f} GiB;"
            f" allowed up to {MAX_VOLUME_BYTES / 1024**3:.0f} GiB (MAX_VOLUME_BYTES)"
        )


_POOL_MIN_FILES = 16


def _decode_chunk(paths: list[str], key: bytes) -> list[DecodedSlice]:
    return [read_slice(p, key=key) for p in paths]


def _decode_all(
    headers: Sequence[SliceHeader], *, key: bytes, workers: int, threads: int
) -> list[DecodedSlice]:
    """Decode the files of checked headers, in their order.

    Native (uncompressed) pixels: read in this process (a plain copy, cheaper than shipping
    arrays between processes).  JPEG 2000 / HTJ2K: ``threads`` threads of this process (the
    decoder releases the GIL, :func:`releases_gil`).  Other compressed syntaxes: ``workers``
    processes, because pydicom's JPEG/JPEG-LS/RLE decoders hold the GIL (threads do not help)."""
    ts = headers[0].info["transfer_syntax_uid"]
    if ts in _NATIVE:
        return [decode_slice(h) for h in headers]
    if releases_gil(ts):
        return decode_slices(headers, threads=threads)
    if workers <= 1 or len(headers) <= _POOL_MIN_FILES:
        return [decode_slice(h) for h in headers]
    first, rest = decode_slice(headers[0]), [h.path for h in headers[1:]]
    size = max(1, min(16, len(rest) // (4 * workers)))
    chunks = [rest[i : i + size] for i in range(0, len(rest), size)]
    try:
        pool = worker_pool(workers)
        out = [first]
        futures = [pool.submit(_decode_chunk, c, key) for c in chunks]
        for fut, chunk in zip(futures, chunks, strict=True):
            try:
                out.extend(fut.result(timeout=DECODE_BUDGET_S * len(chunk)))
            except TimeoutError as e:  # a decoder that hangs: its processes are killed
                drop_worker_pool(workers, kill=True)
                raise DicomReadError(
                    f"decoding {len(chunk)} files from {chunk[0]} took more than "
                    f"{DECODE_BUDGET_S * len(chunk):g} s (DECODE_BUDGET_S per file); killed",
                    code="decode_timeout",
                ) from e
        return out
    except (OSError, BrokenProcessPool, AssertionError) as e:  # no children allowed here
        log.warning("decoder pool unavailable (%s); decoding in this process", e)
        drop_worker_pool(workers)
        return [first] + [decode_slice(h) for h in headers[1:]]


def _dedupe(slices: list[DecodedSlice], flags: list[str]) -> list[DecodedSlice]:
    seen: dict[str, DecodedSlice] = {}
    for s in slices:
        uid = s.info["sop_instance_uid"]
        if uid in seen:
            if "duplicate_files" not in flags:
                flags.append("duplicate_files")
            continue
        seen[uid] = s
    return list(seen.values())


def _drop_identical_positions(slices: list[DecodedSlice], flags: list[str]) -> list[DecodedSlice]:
    """Drop images whose position and pixels equal another's (a re-sent image with a new UID)."""
    keyed: dict[tuple, DecodedSlice] = {}
    out = []
    for s in slices:
        k = tuple(np.round(s.info["image_position_patient"] or (), 2))
        prev = keyed.get(k)
        if prev is not None and np.array_equal(prev.stored, s.stored):
            if "duplicate_positions" not in flags:
                flags.append("duplicate_positions")
            continue
        keyed.setdefault(k, s)
        out.append(s)
    return out


def load_series(
    files: Sequence[str | Path],
    *,
    workers: int = 2,
    series_instance_uid: str | None = None,
    key: bytes,
    on_uneven: str = "resample",
    on_missing_slice: str = "refuse",
    min_slices: int = MIN_SLICES,
    threads: int | None = None,
) -> CTVolume:
    """Load one CT series from its single-frame files into a :class:`CTVolume` in HU.

    ``files``: the series' files, any order (other series' files are ignored when
    ``series_instance_uid`` is given: they are picked by their headers, and only the chosen
    series' pixels are read).  ``workers``: decoding processes for compressed series whose decoder
    holds the GIL (RLE, JPEG, JPEG-LS).  ``threads``: decoding threads for JPEG 2000 / HTJ2K (the
    decoder releases the GIL); ``None``: the CPUs this process may use
    (:func:`~pdacscreen.io.dicom.read.available_cpus`: a Ray task's CPU grant, else the affinity
    mask).  ``key``: the pseudonym key (resolved once by the caller:
    :func:`pdacscreen.io.pseudonym.load_key`).  ``on_uneven``: "resample" | "refuse";
    ``on_missing_slice``: "refuse" | "resample".  ``min_slices``: fewest distinct positions
    accepted (>= 2).  See the module docstring for every case handled or refused, and the typed
    error raised.
    """
    for name, val, allowed in (
        ("on_uneven", on_uneven, ("resample", "refuse")),
        ("on_missing_slice", on_missing_slice, ("refuse", "resample")),
    ):
        if val not in allowed:
            raise InputError(f"{name}={val!r} is not allowed; use one of {allowed}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1 (or None: the CPUs granted), got {threads}")
    if min_slices < 2:
        raise InputError(f"min_slices must be >= 2, got {min_slices}")
    key = check_key(key)
    paths = [str(f) for f in files]
    if not paths:
        raise InputError("files is empty; pass the files of one series")
    headers = [read_header(p, key=key) for p in paths]  # headers only: no pixel read yet
    uids = sorted({h.info["series_instance_uid"] for h in headers})
    if series_instance_uid is not None:
        headers = [h for h in headers if h.info["series_instance_uid"] == series_instance_uid]
        if not headers:
            raise InputError(
                f"series_instance_uid={series_instance_uid!r} is not among the files' "
                f"series {uids[:5]}"
            )
    elif len(uids) > 1:
        raise InputError(
            f"files hold {len(uids)} series ({uids[:5]}); pass series_instance_uid",
            code="mixed_series",
        )
    series = headers[0].info["series_instance_uid"]
    where = f"series {series}: "
    rows, cols = headers[0].info["rows"], headers[0].info["columns"]
    if rows and cols:  # before any pixel is decoded (no Rows/Columns: the decoder refuses)
        _check_bytes(len(headers), rows, cols, f"decoding {len(headers)} files", "")
    slices = _decode_all(
        headers,
        key=key,
        workers=workers,
        threads=available_cpus() if threads is None else threads,
    )
    _check_consistent(slices, where)
    flags: list[str] = []
    slices = _drop_identical_positions(_dedupe(slices, flags), flags)
    geo = series_geometry([s.info | {"path": s.path} for s in slices], series=series)
    ordered = [slices[i] for i in geo.order]
    positions = np.asarray(geo.positions)
    rows, cols = ordered[0].stored.shape
    # refusals first, then the memory bound, then the one allocation
    n_out = len(ordered) if geo.kind == "regular" else _n_regular(positions, geo.step)
    _check_bytes(n_out, rows, cols, "the volume on a regular slice grid", where)
    if geo.kind == "missing_slice":
        gaps_at = [
            f"{positions[i]:.2f}->{positions[i + 1]:.2f} mm ({m} missing)"
            for i, m in enumerate(geo.missing)
            if m
        ]
        if on_missing_slice == "refuse":
            raise MissingSliceError(
                f"{where}{sum(geo.missing)} slice(s) missing: gap(s) {', '.join(gaps_at[:5])} "
                f"with a step of {geo.step:.3f} mm; allowed: none (or on_missing_slice='resample')"
            )
        flags.append("missing_slice_interpolated")
    elif geo.kind == "uneven":
        if on_uneven == "refuse":
            raise UnevenSpacingError(
                f"{where}uneven slice spacing: gaps from {min(geo.gaps):.3f} to {max(geo.gaps):.3f}"
                f" mm (median {geo.step:.3f}); allowed: one step (or on_uneven='resample')"
            )
        flags.append("uneven_spacing")
    if len(ordered) < min_slices:
        raise TooFewSlicesError(
            f"{where}{len(ordered)} slice position(s); allowed: at least {min_slices} (min_slices)"
        )
    array = np.empty((len(ordered), rows, cols), dtype=np.float32)
    for k, s in enumerate(ordered):
        to_hu(
            s.stored,
            slope=s.slope,
            intercept=s.intercept,
            padding_value=s.padding_value,
            padding_limit=s.padding_limit,
            out=array[k],
        )
    if geo.kind != "regular":
        array = _resample_regular(array, positions, geo.step)
    if geo.tilt_deg > _TILT_MIN_DEG:
        flags.append("gantry_tilt")
    if geo.row_col_dot > _ORTHO_FLAG:
        flags.append("non_orthogonal_orientation")
    if any(s.lossy for s in ordered):
        flags.append("lossy_compression")
    for s in ordered:
        for f in filter(None, s.info["flags"].split(",")):
            if f not in flags:
                flags.append(f)
    dy, dx = geo.pixel_spacing  # PixelSpacing = (between rows, between columns)
    affine = affine_from_geometry(
        origin=np.asarray(geo.origin),
        row_dir=np.asarray(geo.row_dir),
        col_dir=np.asarray(geo.col_dir),
        slice_dir=np.asarray(geo.step_vector) / geo.step,
        spacing=(geo.step, dy, dx),
    )
    first = ordered[0].info
    prov = {
        "n_files": len(paths),
        "n_slices_read": len(ordered),
        "transfer_syntaxes": sorted({s.info["transfer_syntax_uid"] for s in ordered}),
        "manufacturer": first["manufacturer"],
        "model": first["manufacturer_model_name"],
        "convolution_kernel": first["convolution_kernel"],
        "slice_thickness": first["slice_thickness"],
        "series_description": first["series_description"],
        "study_date": first["study_date"],
        "tilt_deg": round(geo.tilt_deg, 4),
        "geometry": geo.kind,
        "step_mm": geo.step,
        "gaps_mm": [round(g, 4) for g in geo.gaps] if geo.kind != "regular" else [],
        "source_positions_mm": [round(p, 4) for p in geo.positions]
        if geo.kind != "regular"
        else [],
    }
    vol = CTVolume(
        array=array,
        spacing=(abs(geo.step), dy, dx),
        affine=affine,
        study_instance_uid=first["study_instance_uid"] or "",
        series_instance_uid=series or "",
        patient_key=first["patient_key"] or "",
        flags=tuple(flags),
        provenance=prov,
    )
    log.debug("loaded series %s: shape %s flags %s", series, vol.shape, flags)
    return vol


def _check_consistent(slices: Sequence[DecodedSlice], where: str) -> None:
    """Refuse a series whose slices disagree on the study or on the pixel format."""
    studies = sorted({str(s.info["study_instance_uid"]) for s in slices})
    if len(studies) > 1:
        raise MixedGeometryError(
            f"{where}slices of {len(studies)} studies ({studies[:3]}) share the series UID; "
            "allowed: one StudyInstanceUID per series",
            code="mixed_study",
        )
    formats: dict[str, int] = {}
    for s in slices:
        formats[str(s.stored.dtype)] = formats.get(str(s.stored.dtype), 0) + 1
    if len(formats) > 1:
        raise PixelFormatError(
            f"{where}slices differ in BitsAllocated / PixelRepresentation (decoded as "
            f"{formats}); allowed: one pixel format per series",
            code="mixed_pixel_format",
        )


def _resample_regular(array: np.ndarray, positions: np.ndarray, step: float) -> np.ndarray:
    """Linear interpolation of slices at ``positions`` (ascending, mm) onto ``p0 + k * step``."""
    n_out = _n_regular(positions, step)
    targets = positions[0] + step * np.arange(n_out)
    out = np.empty((n_out,) + array.shape[1:], dtype=np.float32)
    hi = np.clip(np.searchsorted(positions, targets, side="left"), 1, len(positions) - 1)
    for k, (t, h) in enumerate(zip(targets, hi, strict=True)):
        lo_p, hi_p = positions[h - 1], positions[h]
        w = float(np.clip((t - lo_p) / (hi_p - lo_p), 0.0, 1.0))
        np.multiply(array[h - 1], np.float32(1 - w), out=out[k])
        out[k] += np.float32(w) * array[h]
    np.maximum(out, np.float32(AIR_HU), out=out)
    return out


def series_files(target: str, *, index: Path | None, key: bytes) -> tuple[list[str], str | None]:
    """Files of the requested series: a file, a folder (one series) or a SeriesInstanceUID."""
    p = Path(target)
    if p.exists():
        from pdacscreen.io.dicom.read import header_row

        paths = [str(p)] if p.is_file() else sorted(str(f) for f in p.rglob("*") if f.is_file())
        rows = [header_row(f, key=key) for f in paths]
        ok = [r for r in rows if r["status"] == "ok"]
        uids = sorted({r["series_instance_uid"] for r in ok})
        if len(uids) > 1:
            raise InputError(
                f"{target} holds {len(uids)} series: {uids}; pass one as --series",
                code="mixed_series",
            )
        if not ok:
            raise InputError(
                f"{target} holds no loadable image ({sorted({r['error_code'] for r in rows})})",
                code="no_images",
            )
        return [r["path"] for r in ok], uids[0]
    if index is None:
        raise InputError(
            f"{target!r} is neither a file nor a folder; a SeriesInstanceUID needs --index DIR"
        )
    from pdacscreen.io.index import read_index

    df = read_index(index)
    df = df[(df["series_instance_uid"] == target) & (df["status"] == "ok")]
    if df.empty:
        raise InputError(f"series_instance_uid={target!r} has no ok files in index {index}")
    return df["path"].tolist(), target
