"""pdacscreen.kernels: CT preprocessing and measurement kernels, NumPy reference + CuPy GPU.

Every kernel takes ``backend="auto" | "numpy" | "cupy"`` (keyword), accepts NumPy or CuPy arrays
and returns arrays of the chosen backend.  ``"auto"`` runs on the GPU when CuPy and a CUDA device
are usable (or an input is already on the device) and on NumPy otherwise; ``"cupy"`` without a GPU
raises :class:`GpuUnavailableError` (code ``gpu_unavailable``).  Importing this package never
imports CuPy, touches a GPU or compiles anything; kernels are built on first use, cached per device.

Conventions: arrays are ``(z, y, x)``; affines map index ``(k, j, i, 1)`` to LPS mm (see
:mod:`pdacscreen.io.types`); spacing is ``(dz, dy, dx)`` mm.
"""

from pdacscreen.kernels._backend import has_gpu, resolve, spacing_from_affine, to_host
from pdacscreen.kernels.body import BodyBox, body_mask
from pdacscreen.kernels.components import Component, connected_components
from pdacscreen.kernels.errors import (
    GpuUnavailableError,
    KernelInputError,
    MeasurementError,
    NoBodyError,
)
from pdacscreen.kernels.intensity import to_model_input
from pdacscreen.kernels.measure import (
    BloodPool,
    Phase,
    PhaseMeasure,
    blood_pool_hu,
    find_blood_pool,
    measure_phase,
    noise_hu,
    z_coverage_mm,
)
from pdacscreen.kernels.resample import crop_resample, resample

__all__ = [
    "BloodPool",
    "Phase",
    "PhaseMeasure",
    "measure_phase",
    "BodyBox",
    "Component",
    "GpuUnavailableError",
    "KernelInputError",
    "MeasurementError",
    "NoBodyError",
    "blood_pool_hu",
    "body_mask",
    "connected_components",
    "crop_resample",
    "find_blood_pool",
    "has_gpu",
    "noise_hu",
    "resample",
    "resolve",
    "spacing_from_affine",
    "to_host",
    "to_model_input",
    "z_coverage_mm",
]
