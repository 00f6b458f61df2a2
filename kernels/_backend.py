"""Backend choice: NumPy on the CPU or CuPy on a CUDA GPU, with CuPy imported lazily.

Nothing here imports CuPy or touches a GPU at import time.  ``resolve(backend, *arrays)`` turns
``"auto" | "numpy" | "cupy"`` into a :class:`Backend` (array module ``xp`` and ``ndimage`` module);
``"auto"`` picks CuPy when an input already lives on the GPU or when :func:`has_gpu` is true.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from pdacscreen.kernels.errors import GpuUnavailableError, KernelInputError

__all__ = ["BACKENDS", "Backend", "cupy_module", "device_memoize", "has_gpu", "resolve", "to_host"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "cupy")


@dataclass(frozen=True)
class Backend:
    """A resolved backend: ``name`` ("numpy" or "cupy"), array module ``xp``, ``ndi`` (ndimage)."""

    name: str
    xp: ModuleType
    ndi: ModuleType

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, a: Any) -> Any:
        """``a`` as an array of this backend (host <-> device copy only when needed)."""
        if self.is_gpu:
            return self.xp.asarray(a)
        return to_host(a)


def _try_import_cupy() -> tuple[ModuleType | None, str]:
    try:
        cp = importlib.import_module("cupy")
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return None, f"cupy is not importable ({type(e).__name__}: {e})"
    return cp, ""


@functools.cache
def _gpu_probe() -> tuple[bool, str]:
    """(usable, reason): CuPy importable, a device present, and a tiny allocation works."""
    cp, why = _try_import_cupy()
    if cp is None:
        return False, why
    try:
        n = cp.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "no CUDA device found"
        probe = cp.arange(4, dtype=cp.float32)
        if float(probe.sum()) != 6.0:
            return False, "CUDA device gave a wrong result for a probe sum"
    except Exception as e:  # CUDARuntimeError, driver too old, no libcuda ...
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    return True, f"{n} CUDA device(s)"


def has_gpu() -> bool:
    """True when CuPy is importable and a CUDA device is usable. Cached; never raises."""
    try:
        return _gpu_probe()[0]
    except Exception:  # pragma: no cover - defensive: the probe already catches everything
        return False


def gpu_reason() -> str:
    """Why :func:`has_gpu` is true or false, in words (for logs and skip reasons)."""
    try:
        return _gpu_probe()[1]
    except Exception as e:  # pragma: no cover
        return f"probe failed: {e}"


def cupy_module() -> ModuleType:
    """The ``cupy`` module; raises :class:`GpuUnavailableError` when no GPU is usable."""
    ok, why = _gpu_probe()
    if not ok:
        raise GpuUnavailableError(
            f"backend='cupy' needs CuPy and a CUDA GPU, but {why}; "
            "use backend='auto' or 'numpy' to run on the CPU"
        )
    return importlib.import_module("cupy")


def _is_cupy_array(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def to_host(a: Any) -> Any:
    """A NumPy array (copies device arrays to the host); non-arrays pass through ``np.asarray``."""
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def resolve(backend: str, *arrays: Any) -> Backend:
    """Turn a backend name into a :class:`Backend`.

    ``"auto"``: CuPy when any input is a CuPy array or :func:`has_gpu` is true, else NumPy.
    ``"cupy"`` without a usable GPU raises :class:`GpuUnavailableError` (code ``gpu_unavailable``).
    """
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cupy" if any(_is_cupy_array(a) for a in arrays) or has_gpu() else "numpy"
    if backend == "numpy":
        import scipy.ndimage as ndi

        return Backend("numpy", np, ndi)
    cp = cupy_module()
    ndi = importlib.import_module("cupyx.scipy.ndimage")
    return Backend("cupy", cp, ndi)


def device_memoize(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Like ``cupy.memoize(for_each_device=True)`` but applied on first call (no import-time CuPy).

    Use for functions that build CuPy kernels: the result is cached per device and per arguments
    (e.g. dtype names).
    """
    lock = threading.Lock()
    state: dict[str, Callable[..., Any]] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        memo = state.get("fn")
        if memo is None:
            with lock:
                memo = state.get("fn")
                if memo is None:
                    memo = cupy_module().memoize(for_each_device=True)(fn)
                    state["fn"] = memo
        return memo(*args)

    return wrapper


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size (dz, dy, dx) in mm: the norms of the affine's first three columns."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise KernelInputError(f"affine must be 4x4, got shape {aff.shape}")
    sp = np.linalg.norm(aff[:3, :3], axis=0)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise KernelInputError(f"affine columns must be finite and non-zero, got spacing {sp}")
    return sp


def check_volume(a: Any, name: str = "array") -> None:
    """Raise :class:`KernelInputError` unless ``a`` is a non-empty 3-D array."""
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) != 3 or min(shape) < 1:
        raise KernelInputError(f"{name} must be a non-empty 3-D (z, y, x) array, got shape {shape}")
