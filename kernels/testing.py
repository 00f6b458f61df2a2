"""Helpers for parity tests: one test body over every backend, tolerances per dtype.

``backend_params()`` gives pytest parameters ``"numpy"`` and ``"cupy"`` (the latter marked ``gpu``
and skipped, with the reason, when no GPU is usable), in the spirit of CuPy's
``numpy_cupy_allclose``: each test computes with the backend and compares on the host against an
independent NumPy/SciPy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdacscreen.kernels._backend import gpu_reason, has_gpu, to_host

__all__ = ["TOLERANCES", "assert_close", "backend_params"]

# (rtol, atol) per result dtype, for values of order one (scale atol by the data's magnitude).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (2e-3, 2e-3),
    "float32": (2e-6, 2e-6),
    "float64": (1e-12, 1e-12),
}


def backend_params() -> list[Any]:
    """``["numpy", cupy]`` as pytest parameters; cupy skipped with a reason without a GPU."""
    import pytest

    return [
        pytest.param("numpy", id="numpy"),
        pytest.param(
            "cupy",
            id="cupy",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not has_gpu(), reason=f"no GPU: {gpu_reason()}"),
            ],
        ),
    ]


def assert_close(
    actual: Any, expected: Any, *, dtype: str | None = None, scale: float = 1.0
) -> None:
    """Host-side ``assert_allclose`` with the tolerance of ``dtype`` (default: actual's dtype)."""
    a = to_host(actual)
    e = np.asarray(expected)
    rtol, atol = TOLERANCES[dtype or str(a.dtype)]
    np.testing.assert_allclose(
        a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol * scale
    )
