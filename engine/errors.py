"""Errors of the detection engine, each with a stable ``code`` for output tables."""

from __future__ import annotations

from pdacscreen.io.errors import ErrorCode, InputError, PdacscreenError

__all__ = [
    "EngineError",
    "ModelPackageError",
    "BackendUnavailableError",
    "InferenceError",
    "EngineInputError",
    "TrainingError",
]


class EngineError(PdacscreenError):
    """Base class of engine errors."""

    code = ErrorCode.ENGINE_ERROR


class ModelPackageError(EngineError):
    """A model package is missing a file or field, or a file's sha256 does not match model.json."""

    code = ErrorCode.BAD_MODEL_PACKAGE


class BackendUnavailableError(EngineError):
    """An explicitly requested inference backend cannot run on this machine."""

    code = ErrorCode.BACKEND_UNAVAILABLE


class InferenceError(EngineError):
    """Inference failed for one study (``code`` names the typed cause)."""

    code = ErrorCode.INFERENCE_FAILED


class EngineInputError(InputError, EngineError):
    """A caller passed a bad argument to an engine function (names field, value, allowed)."""

    code = ErrorCode.BAD_INPUT


class TrainingError(EngineError):
    """Training data or training arguments that cannot produce a model."""

    code = ErrorCode.TRAINING_FAILED
