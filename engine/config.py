"""The engine's configuration: one frozen object, resolved once, recorded in every row.

``EngineConfig`` says which runtime runs the model (``backend``), at which ``precision`` and on
which ``device``, and how many windows go into one call (``batch``).  ``resolve(gpu=...)`` turns
every ``auto`` into a concrete choice for a node with or without a GPU, without touching a GPU:
the sweep's driver resolves it for the nodes its actors will run on, the resolved config goes into
the config hash, and :attr:`EngineConfig.label` (e.g. ``onnxruntime-cpu-fp32``,
``tensorrt-cuda-fp16``) into each findings row's ``engine_backend``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from pdacscreen.engine.errors import EngineInputError

__all__ = ["Backend", "Device", "EngineConfig", "Precision"]


class Backend(StrEnum):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"


class Precision(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def _choice(enum: type[StrEnum], field: str, value: object) -> StrEnum:
    try:
        return enum(str(value).lower())
    except ValueError:
        allowed = [m.value for m in enum]
        near = [a for a in allowed if a.startswith(str(value)[:2].lower())]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise EngineInputError(f"{field} must be one of {allowed}, got {value!r}{hint}") from None


@dataclass(frozen=True)
class EngineConfig:
    """How the detector runs (see the module docstring).

    Attributes:
        backend: ``auto`` | ``onnxruntime`` | ``torch`` | ``tensorrt``.
        precision: ``auto`` | ``fp32`` | ``fp16`` | ``int8`` (fp16 only on TensorRT; int8 needs
            a package with INT8 stages, which the reference model does not ship yet).
        device: ``auto`` | ``cpu`` | ``cuda``.
        batch: windows per engine call (>= 1).
    """

    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    batch: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", str(_choice(Backend, "backend", self.backend)))
        object.__setattr__(self, "precision", str(_choice(Precision, "precision", self.precision)))
        object.__setattr__(self, "device", str(_choice(Device, "device", self.device)))
        if not isinstance(self.batch, int) or self.batch < 1:
            raise EngineInputError(f"batch must be an integer >= 1, got {self.batch!r}")
        if self.backend == "tensorrt" and self.device == "cpu":
            raise EngineInputError("backend 'tensorrt' needs device 'cuda' (or 'auto'), got 'cpu'")
        if self.precision == "fp16" and self.backend not in ("auto", "tensorrt"):
            raise EngineInputError(
                f"precision 'fp16' runs on backend 'tensorrt' only, got backend {self.backend!r}"
            )
        if self.precision == "int8":
            raise EngineInputError(
                "precision 'int8' needs INT8 stages in the model package; none ships yet "
                "(use 'fp32' or 'auto')"
            )

    def resolve(self, *, gpu: bool) -> EngineConfig:
        """Every ``auto`` made concrete for a node with (``gpu=True``) or without a GPU.

        A GPU node runs TensorRT FP16 when ``tensorrt`` is importable, else torch CUDA FP32; a CPU
        node runs ONNX Runtime FP32.  Explicit choices are kept.  Imports only, no GPU access.
        """
        device = self.device if self.device != "auto" else ("cuda" if gpu else "cpu")
        backend = self.backend
        if backend == "auto":
            if device == "cuda":
                backend = "tensorrt" if _importable("tensorrt") else "torch"
            else:
                backend = "onnxruntime"
        precision = self.precision
        if precision == "auto":
            precision = "fp16" if backend == "tensorrt" else "fp32"
        return EngineConfig(backend=backend, precision=precision, device=device, batch=self.batch)

    @property
    def label(self) -> str:
        """``runtime-device-precision`` of a resolved config, e.g. ``onnxruntime-cpu-fp32``."""
        return f"{self.backend}-{self.device}-{self.precision}"

    def backend_name(self) -> str:
        """The name :func:`pdacscreen.engine.backends.open_backend` takes for this config."""
        if self.backend == "onnxruntime":
            return "onnxruntime-cuda" if self.device == "cuda" else "onnxruntime"
        if self.backend == "torch":
            return {"cuda": "torch-cuda", "cpu": "torch-cpu"}.get(self.device, "torch")
        return str(self.backend)

    def as_dict(self) -> dict:
        return dict(sorted(asdict(self).items()))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
