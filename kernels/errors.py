"""Errors raised by :mod:`pdacscreen.kernels` (subclasses of the shared hierarchy, each with a code)."""

from __future__ import annotations

from pdacscreen.io.errors import ErrorCode, InputError, PdacscreenError

__all__ = ["GpuUnavailableError", "KernelInputError", "MeasurementError", "NoBodyError"]


class GpuUnavailableError(PdacscreenError, RuntimeError):
    """``backend="cupy"`` was asked for but CuPy is not installed or no CUDA device is usable.

    Install the optional extra (``pip install 'pdacscreen[gpu]'``) on a machine with a GPU, or pass
    ``backend="auto"`` / ``"numpy"`` to run on the CPU.
    """

    code = ErrorCode.GPU_UNAVAILABLE


class KernelInputError(InputError):
    """A kernel received an argument outside what it allows (names field, value, allowed)."""

    code = ErrorCode.BAD_INPUT


class NoBodyError(PdacscreenError):
    """No patient body was found in a volume (all air or padding above the threshold)."""

    code = ErrorCode.NO_BODY


class MeasurementError(PdacscreenError):
    """An image measurement could not be made (e.g. no blood pool found); see ``code``."""

    code = ErrorCode.MEASUREMENT_FAILED
