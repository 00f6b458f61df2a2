"""Error hierarchy shared by every pdacscreen stage.

Each error carries a stable ``code`` (snake_case) that ends up in the ``error_code`` column of the
index, failures and findings tables, so analysts can count failures by cause.  Messages say what was
wrong and, where possible, how to fix it.  Wrap lower-level exceptions with ``raise ... from e``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "Status",
    "ErrorCode",
    "PdacscreenError",
    "InputError",
    "DicomReadError",
    "NotAVolumeError",
    "GeometryError",
    "UnsupportedTransferSyntaxError",
]


class Status(StrEnum):
    """What happened to a study (the findings ``status`` column); the words mean what they say.

    ``ok``: assessed, with a probability.  ``not_assessable``: read, but the engine could not
    assess it (no pancreas found, a field of view that misses it ...): no probability, never
    ``ok``; the reason is the row's ``error_code``.  ``skipped``: not sent to the engine on
    purpose (no eligible series, contrast phase).  ``failed``: an error stopped it (bad data, a
    dead worker); ``error_code`` says which.
    """

    OK = "ok"
    NOT_ASSESSABLE = "not_assessable"
    SKIPPED = "skipped"
    FAILED = "failed"


class ErrorCode(StrEnum):
    """Stable machine-readable causes recorded in ``error_code`` columns (index, failures, findings).

    Plain strings compare equal to members (``ErrorCode.TRUNCATED == "truncated"``), so Parquet
    columns stay strings.  Add a member here before raising a new code.
    """

    # generic
    ERROR = "error"
    BAD_INPUT = "bad_input"
    # files (index, decode)
    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    UNREADABLE = "unreadable"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    UNSUPPORTED_IMAGE = "unsupported_image"
    UNSUPPORTED_BITS = "unsupported_bits"
    NOT_GRAYSCALE = "not_grayscale"
    MULTIFRAME_UNSUPPORTED = "multiframe_unsupported"
    MISSING_GEOMETRY = "missing_geometry"
    NO_IMAGES = "no_images"
    MIXED_SERIES = "mixed_series"
    # series geometry (volume)
    NOT_A_VOLUME = "not_a_volume"
    BAD_GEOMETRY = "bad_geometry"
    MISSING_SLICE = "missing_slice"
    UNEVEN_SPACING = "uneven_spacing"
    DUPLICATE_POSITION = "duplicate_position"
    MIXED_GEOMETRY = "mixed_geometry"
    NON_COLLINEAR = "non_collinear"
    BAD_POSITION = "bad_position"
    BAD_ORIENTATION = "bad_orientation"
    BAD_PIXEL_SPACING = "bad_pixel_spacing"
    BAD_RESCALE = "bad_rescale"
    MIXED_PIXEL_FORMAT = "mixed_pixel_format"
    MIXED_STUDY = "mixed_study"
    TOO_FEW_SLICES = "too_few_slices"
    VOLUME_TOO_LARGE = "volume_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    PIXEL_LENGTH_MISMATCH = "pixel_length_mismatch"
    DECODE_TIMEOUT = "decode_timeout"
    # selection and phase
    NO_ELIGIBLE_SERIES = "no_eligible_series"
    PHASE_MISMATCH = "phase_mismatch"
    # engine
    ENGINE_ERROR = "engine_error"
    INFERENCE_FAILED = "inference_failed"
    PANCREAS_NOT_FOUND = "pancreas_not_found"
    MEASUREMENT_FAILED = "measurement_failed"
    NO_BODY = "no_body"
    NO_SPINE = "no_spine"
    NO_BLOOD_POOL = "no_blood_pool"
    NO_HOMOGENEOUS_TISSUE = "no_homogeneous_tissue"
    BAD_MODEL_PACKAGE = "bad_model_package"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    GPU_UNAVAILABLE = "gpu_unavailable"
    EVIDENCE_WRITE_FAILED = "evidence_write_failed"
    TRAINING_FAILED = "training_failed"
    ONNX_EXPORT_FAILED = "onnx_export_failed"
    # sweep and store
    WORKER_DIED = "worker_died"
    ORCHESTRATOR_UNAVAILABLE = "orchestrator_unavailable"
    # PACS (DICOMweb source, DICOM SEG/SR export)
    SOURCE_UNAVAILABLE = "source_unavailable"
    SOURCE_UNAUTHORIZED = "source_unauthorized"
    SERIES_VANISHED = "series_vanished"
    TRUNCATED_RESPONSE = "truncated_response"
    DICOM_EXPORT_FAILED = "dicom_export_failed"
    PSEUDONYM_KEY = "pseudonym_key"
    ARCHIVE_MISMATCH = "archive_mismatch"
    STORE_ERROR = "store_error"
    STORE_LOCKED = "store_locked"
    STORE_FULL = "store_full"
    CORRUPT_STORE_PART = "corrupt_store_part"
    FILE_VANISHED = "file_vanished"
    SWEEP_STOPPED = "sweep_stopped"
    BAD_FINDINGS_ROW = "bad_findings_row"
    BAD_QUERY = "bad_query"
    # phantom generator arguments
    BAD_SEED = "bad_seed"
    BAD_MATRIX = "bad_matrix"
    BAD_LESION_TYPE = "bad_lesion_type"
    BAD_LESION_LOCATION = "bad_lesion_location"


class PdacscreenError(Exception):
    """Base class. ``code`` is the machine-readable cause recorded in output tables."""

    code: str = ErrorCode.ERROR

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code


class InputError(PdacscreenError, ValueError):
    """A caller passed a bad argument (names the field, the value and what is allowed)."""

    code = ErrorCode.BAD_INPUT


class DicomReadError(PdacscreenError):
    """A file could not be read as DICOM (``not_dicom``, ``truncated``, ``unreadable`` ...)."""

    code = ErrorCode.UNREADABLE


class UnsupportedTransferSyntaxError(DicomReadError):
    """Pixel data in a transfer syntax no installed decoder handles."""

    code = ErrorCode.UNSUPPORTED_TRANSFER_SYNTAX


class NotAVolumeError(PdacscreenError):
    """A series that cannot form a 3-D volume (single image, all slices at one position ...)."""

    code = ErrorCode.NOT_A_VOLUME


class GeometryError(PdacscreenError):
    """Slice geometry that cannot be trusted (gap, mixed shapes, mixed orientation ...)."""

    code = ErrorCode.BAD_GEOMETRY


# --- appended by the ingest helper (issue 3) ---------------------------------------------------


class MissingSliceError(GeometryError):
    """A regular series with one or more slices missing (a gap that is a multiple of the step)."""

    code = ErrorCode.MISSING_SLICE


class UnevenSpacingError(GeometryError):
    """Slice spacing varies in a way that is not a missing slice (refused when resampling is off)."""

    code = ErrorCode.UNEVEN_SPACING


class DuplicatePositionError(GeometryError):
    """Several different images share one slice position (multiple acquisitions or echoes)."""

    code = ErrorCode.DUPLICATE_POSITION


class MixedGeometryError(GeometryError):
    """Slices of one series disagree on matrix size, pixel spacing or orientation."""

    code = ErrorCode.MIXED_GEOMETRY


class UnsupportedImageError(DicomReadError):
    """An image pydicom can read but pdacscreen does not load (multi-frame, colour, no pixels)."""

    code = ErrorCode.UNSUPPORTED_IMAGE


class PseudonymKeyError(InputError):
    """The pseudonym key is missing, unreadable, or differs from the one an index was built with."""

    code = ErrorCode.PSEUDONYM_KEY


class StoreError(PdacscreenError):
    """The findings store (``STORE/``) could not be read or written as asked."""

    code = ErrorCode.STORE_ERROR


class StoreLockedError(StoreError):
    """Another live process holds the store's lock (a sweep is running); names its pid and start."""

    code = ErrorCode.STORE_LOCKED


class FindingsSchemaError(StoreError, ValueError):
    """A findings or failures row does not fit the store's schema (names column, value, allowed)."""

    code = ErrorCode.BAD_FINDINGS_ROW


class QueryError(StoreError, ValueError):
    """An analyst's SQL over the store failed (DuckDB's message is kept)."""

    code = ErrorCode.BAD_QUERY


__all__ += ["StoreError", "StoreLockedError", "FindingsSchemaError", "QueryError"]


# --- appended by the ingest helper (issue 13: hostile input) ------------------------------------


class TooFewSlicesError(NotAVolumeError):
    """Fewer slices than the loader's stated minimum (``load_series(min_slices=...)``)."""

    code = ErrorCode.TOO_FEW_SLICES


class VolumeTooLargeError(GeometryError):
    """The volume (or one image) would need more memory than the stated bound; refused before
    anything that large is allocated."""

    code = ErrorCode.VOLUME_TOO_LARGE


class PixelFormatError(DicomReadError):
    """Pixel data that contradicts its own header (rescale slope 0, length not Rows x Columns x
    BitsAllocated, slices of one series with different BitsAllocated / PixelRepresentation)."""

    code = ErrorCode.PIXEL_LENGTH_MISMATCH


__all__ += ["TooFewSlicesError", "VolumeTooLargeError", "PixelFormatError"]


# --- appended by the PACS helper (issue 14: DICOMweb source) ------------------------------------


class SourceError(PdacscreenError):
    """A DICOMweb source failed (``source_unavailable``, ``source_unauthorized``,
    ``series_vanished``, ``truncated_response``); the message names the URL without credentials."""

    code = ErrorCode.SOURCE_UNAVAILABLE


__all__ += ["SourceError"]
