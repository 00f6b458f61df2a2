"""Stored values -> model input in one fused pass: rescale to HU, clip to a window, normalise, cast.

``y = (clip(stored * slope + intercept, lo, hi) - mean) / std`` cast to ``dtype``.  Because the
normalisation is monotonic (``std > 0``) this equals ``clip(stored * a + b, (lo-mean)/std,
(hi-mean)/std)`` with ``a = slope/std`` and ``b = (intercept-mean)/std``; both backends compute that
in float32 (one rounding step differs from the literal formula, well under 1e-5 relative).

NumPy: cache-sized blocks processed in place in one float32 scratch buffer (no full-size float64
temporaries).  CuPy: one elementwise kernel, no temporaries.  NaN inputs stay NaN on both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdacscreen.kernels._backend import device_memoize, resolve
from pdacscreen.kernels.errors import KernelInputError

__all__ = ["to_model_input"]

_OUT_DTYPES = ("float32", "float16")
_BLOCK_ELEMS = 1 << 18  # 256 Ki elements = 1 MiB of float32: stays in L2


def _coefficients(
    slope: float, intercept: float, window: tuple[float, float], mean: float, std: float
) -> tuple[float, float, float, float]:
    lo, hi = (float(v) for v in window)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise KernelInputError(f"window must be two finite HU values lo < hi, got {window!r}")
    if not (np.isfinite(std) and std > 0):
        raise KernelInputError(f"std must be a finite value > 0, got {std!r}")
    if not (np.isfinite(slope) and slope != 0 and np.isfinite(intercept) and np.isfinite(mean)):
        raise KernelInputError(
            f"slope (non-zero), intercept and mean must be finite, got {slope!r}, "
            f"{intercept!r}, {mean!r}"
        )
    a = float(slope) / float(std)
    b = (float(intercept) - float(mean)) / float(std)
    return a, b, (lo - float(mean)) / float(std), (hi - float(mean)) / float(std)


def to_model_input(
    stored: Any,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] = (-160.0, 240.0),
    mean: float = 0.0,
    std: float = 1.0,
    dtype: str = "float32",
    backend: str = "auto",
) -> Any:
    """Model input from stored pixel values, any shape (volumes are ``(z, y, x)``).

    Args:
        stored: stored values (int16/uint16/int32/float32/float64 ...), NumPy or CuPy array.
        slope, intercept: RescaleSlope / RescaleIntercept (stored -> HU); 1 and 0 for HU input.
        window: ``(lo, hi)`` HU clip window of the model.
        mean, std: normalisation in HU applied after clipping (``std > 0``).
        dtype: ``"float32"`` or ``"float16"``.
        backend: ``"auto" | "numpy" | "cupy"``; the result is an array of that backend.

    Returns:
        ``((clip(stored*slope+intercept, lo, hi) - mean) / std).astype(dtype)``, same shape.
    """
    if str(np.dtype(dtype)) not in _OUT_DTYPES:
        raise KernelInputError(f"dtype must be one of {_OUT_DTYPES}, got {dtype!r}")
    a, b, lo, hi = _coefficients(slope, intercept, window, mean, std)
    be = resolve(backend, stored)
    x = be.asarray(stored)
    if x.dtype.kind not in "biuf":
        raise KernelInputError(f"stored must be a numeric array, got dtype {x.dtype}")
    if be.is_gpu:
        return _cupy_model_input(be.xp, x, a, b, lo, hi, np.dtype(dtype))
    return _numpy_model_input(x, a, b, lo, hi, np.dtype(dtype))


def _numpy_model_input(
    x: np.ndarray, a: float, b: float, lo: float, hi: float, out_dtype: np.dtype
) -> np.ndarray:
    out = np.empty(x.shape, dtype=out_dtype)
    src = np.ascontiguousarray(x).reshape(-1)
    dst = out.reshape(-1)
    n = src.size
    block = min(_BLOCK_ELEMS, max(n, 1))
    scratch = np.empty(block, dtype=np.float32)
    a32, b32, lo32, hi32 = (np.float32(v) for v in (a, b, lo, hi))
    for start in range(0, n, block):
        stop = min(start + block, n)
        direct = out_dtype == np.float32
        buf = dst[start:stop] if direct else scratch[: stop - start]
        np.multiply(src[start:stop], a32, out=buf, casting="unsafe")
        np.add(buf, b32, out=buf)
        np.clip(buf, lo32, hi32, out=buf)
        if not direct:
            dst[start:stop] = buf
    return out


@device_memoize
def _model_input_kernel(out_dtype_name: str) -> Any:
    import cupy as cp

    return cp.ElementwiseKernel(
        "T s, float32 a, float32 b, float32 lo, float32 hi",
        "O y",
        # Comparisons instead of fminf/fmaxf so that NaN propagates as in NumPy's clip.
        "float v = (float)s * a + b; v = v < lo ? lo : (v > hi ? hi : v); y = (O)v;",
        f"pdacscreen_model_input_{out_dtype_name}",
    )


def _cupy_model_input(
    cp: Any, x: Any, a: float, b: float, lo: float, hi: float, out_dtype: np.dtype
) -> Any:
    out = cp.empty(x.shape, dtype=out_dtype)
    kern = _model_input_kernel(out_dtype.name)
    kern(x, np.float32(a), np.float32(b), np.float32(lo), np.float32(hi), out)
    return out
