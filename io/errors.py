"""Error hierarchy shared by every pdacscreen stage.

Each error carries a stable ``code`` (snake_case) that ends up in the ``error_code`` column of the
index, failures and findings tables, so analysts can count failures by cause.  Messages say what was
wrong and, where possible, how to fix it.  Wrap lower-level exceptions with ``raise ... from e``.
"""

from __future__ import annotations

__all__ = [
    "PdacscreenError",
    "InputError",
    "DicomReadError",
    "NotAVolumeError",
    "GeometryError",
    "UnsupportedTransferSyntaxError",
    "SelectionError",
]


class PdacscreenError(Exception):
    """Base class. ``code`` is the machine-readable cause recorded in output tables."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InputError(PdacscreenError, ValueError):
    """A caller passed a bad argument (names the field, the value and what is allowed)."""

    code = "bad_input"


class DicomReadError(PdacscreenError):
    """A file could not be read as DICOM (``not_dicom``, ``truncated``, ``unreadable`` ...)."""

    code = "unreadable"


class UnsupportedTransferSyntaxError(DicomReadError):
    """Pixel data in a transfer syntax no installed decoder handles."""

    code = "unsupported_transfer_syntax"


class NotAVolumeError(PdacscreenError):
    """A series that cannot form a 3-D volume (single image, all slices at one position ...)."""

    code = "not_a_volume"


class GeometryError(PdacscreenError):
    """Slice geometry that cannot be trusted (gap, mixed shapes, mixed orientation ...)."""

    code = "bad_geometry"


class SelectionError(PdacscreenError):
    """No series of a study is eligible for the non-contrast engine."""

    code = "no_eligible_series"


# --- appended by the ingest helper (issue 3) ---------------------------------------------------


class MissingSliceError(GeometryError):
    """A regular series with one or more slices missing (a gap that is a multiple of the step)."""

    code = "missing_slice"


class UnevenSpacingError(GeometryError):
    """Slice spacing varies in a way that is not a missing slice (refused when resampling is off)."""

    code = "uneven_spacing"


class DuplicatePositionError(GeometryError):
    """Several different images share one slice position (multiple acquisitions or echoes)."""

    code = "duplicate_position"


class MixedGeometryError(GeometryError):
    """Slices of one series disagree on matrix size, pixel spacing or orientation."""

    code = "mixed_geometry"


class UnsupportedImageError(DicomReadError):
    """An image pydicom can read but pdacscreen does not load (multi-frame, colour, no pixels)."""

    code = "unsupported_image"


class PseudonymKeyError(InputError):
    """The pseudonym key is missing, unreadable, or differs from the one an index was built with."""

    code = "pseudonym_key"


class StoreError(PdacscreenError):
    """The findings store (``STORE/``) could not be read or written as asked."""

    code = "store_error"


class StoreLockedError(StoreError):
    """Another live process holds the store's lock (a sweep is running); names its pid and start."""

    code = "store_locked"


class FindingsSchemaError(StoreError, ValueError):
    """A findings or failures row does not fit the store's schema (names column, value, allowed)."""

    code = "bad_findings_row"


class QueryError(StoreError, ValueError):
    """An analyst's SQL over the store failed (DuckDB's message is kept)."""

    code = "bad_query"


__all__ += ["StoreError", "StoreLockedError", "FindingsSchemaError", "QueryError"]
