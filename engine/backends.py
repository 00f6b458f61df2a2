"""Inference backends behind one interface: ``predict(batch) -> {"seg": ..., "cls": ...}``.

``batch`` is ``(N, 1, pz, py, px)`` float32 (NumPy; a CuPy array is accepted by the GPU backends
and stays on the device for TensorRT).  Outputs are NumPy arrays keyed by the stage's output names
(``seg``: ``(N, K, pz, py, px)`` logits, ``cls``: ``(N, 1)`` logits), or CuPy arrays when
TensorRT was given a CuPy batch.

Names: ``auto`` (TensorRT when importable with a GPU, else torch on CUDA, else ONNX Runtime on
CPU), ``onnxruntime`` (CPU), ``onnxruntime-cuda``, ``torch`` (CUDA when present, else CPU),
``torch-cpu``, ``torch-cuda``, ``tensorrt``.  An explicit choice that cannot run raises
:class:`BackendUnavailableError`.  Optional dependencies are imported lazily; nothing touches a GPU
at import time.
"""

from __future__ import annotations

import logging
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from pdacscreen.engine.errors import BackendUnavailableError, EngineInputError
from pdacscreen.engine.package import StageSpec, sha256_file

__all__ = [
    "BACKENDS",
    "Backend",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "TensorRTBackend",
    "cuda_available",
    "tensorrt_available",
    "resolve_backend",
    "open_backend",
]

log = logging.getLogger(__name__)

BACKENDS = (
    "auto",
    "onnxruntime",
    "onnxruntime-cuda",
    "torch",
    "torch-cpu",
    "torch-cuda",
    "tensorrt",
)
INPUT_NAME = "input"


def cuda_available() -> bool:
    """True when torch sees a CUDA device (checked lazily, never at import)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return False


def tensorrt_available() -> bool:
    """True when ``tensorrt`` and ``cupy`` import and a CUDA device is present."""
    try:
        import cupy  # noqa: F401
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        return False


def resolve_backend(name: str) -> str:
    """Map a requested backend name to a concrete one, checking it can run here."""
    if name not in BACKENDS:
        hint = [b for b in BACKENDS if b.startswith(name[:3])]
        raise EngineInputError(
            f"backend must be one of {list(BACKENDS)}, got {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    if name == "auto":
        if tensorrt_available():
            return "tensorrt"
        if cuda_available():
            return "torch-cuda"
        return "onnxruntime"
    if name == "torch":
        return "torch-cuda" if cuda_available() else "torch-cpu"
    if name == "torch-cuda" and not cuda_available():
        raise BackendUnavailableError(
            "backend 'torch-cuda' needs a CUDA GPU visible to torch; none found"
        )
    if name == "tensorrt" and not tensorrt_available():
        raise BackendUnavailableError(
            "backend 'tensorrt' needs the tensorrt and cupy packages and a CUDA GPU "
            "(pip install 'pdacscreen[tensorrt,gpu]' on a GPU machine)"
        )
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailableError(
                "backend 'onnxruntime-cuda' needs onnxruntime-gpu with CUDAExecutionProvider; "
                f"available providers: {ort.get_available_providers()}"
            )
    return name


class Backend(ABC):
    """One stage's network on one runtime."""

    name: str

    def __init__(self, stage: StageSpec) -> None:
        self.stage = stage

    @abstractmethod
    def predict(self, batch):
        """Run a ``(N, 1, pz, py, px)`` float32 batch; see the module docstring."""

    def _check(self, batch) -> None:
        if batch.ndim != 5 or batch.shape[1] != self.stage.network.in_channels:
            raise EngineInputError(
                f"batch must be (N, {self.stage.network.in_channels}, z, y, x), got {tuple(batch.shape)}"
            )
        bad = [s for s in batch.shape[2:] if s % self.stage.network.divisor]
        if bad:
            raise EngineInputError(
                f"batch spatial shape {tuple(batch.shape[2:])} must be multiples of "
                f"{self.stage.network.divisor}"
            )


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU (or the CUDA execution provider with ``cuda=True``)."""

    def __init__(self, stage: StageSpec, *, cuda: bool = False, threads: int | None = None) -> None:
        super().__init__(stage)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or 0)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        )
        self.session = ort.InferenceSession(str(stage.onnx), sess_options=opts, providers=providers)
        self.name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"

    def predict(self, batch):
        self._check(batch)
        if hasattr(batch, "__cuda_array_interface__"):
            batch = batch.get()
        outs = self.session.run(
            list(self.stage.outputs), {INPUT_NAME: np.ascontiguousarray(batch, np.float32)}
        )
        return dict(zip(self.stage.outputs, outs, strict=True))


class TorchBackend(Backend):
    """The same network in torch eager mode, from the package's state dict (``weights``)."""

    def __init__(self, stage: StageSpec, *, device: str = "cpu") -> None:
        super().__init__(stage)
        import torch

        from pdacscreen.engine.network import build_network

        if stage.weights is None:
            raise BackendUnavailableError(
                f"backend 'torch' needs stages.{stage.name}.weights (a .pt state dict) in model.json"
            )
        self.torch = torch
        self.device = torch.device(device)
        net = build_network(stage.network)
        net.load_state_dict(torch.load(stage.weights, map_location="cpu", weights_only=True))
        self.net = net.eval().to(self.device)
        self.name = f"torch-{self.device.type}"

    def predict(self, batch):
        self._check(batch)
        torch = self.torch
        with torch.inference_mode():
            x = torch.as_tensor(batch, dtype=torch.float32, device=self.device)
            out = self.net(x)
            out = out if isinstance(out, tuple) else (out,)
            return {
                k: v.float().cpu().numpy() for k, v in zip(self.stage.outputs, out, strict=True)
            }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


class TensorRTBackend(Backend):
    """A TensorRT 10 engine built from the stage's ONNX (FP16, one optimisation profile).

    The serialized plan is cached under ``cache_dir`` keyed by the ONNX sha256, the TensorRT
    version, the GPU name and the profile; inference runs on CuPy device buffers (a NumPy batch is
    copied once to the device; a CuPy batch is used in place and CuPy outputs are returned).
    """

    def __init__(
        self,
        stage: StageSpec,
        *,
        onnx_sha256: str,
        cache_dir: Path,
        max_batch: int = 8,
        fp16: bool = True,
    ) -> None:
        super().__init__(stage)
        import cupy
        import tensorrt as trt

        self.cp = cupy
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        gpu = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
        self.max_batch = int(max_batch)
        key = "-".join(
            [
                onnx_sha256[:16],
                stage.name,
                f"trt{_slug(trt.__version__)}",
                _slug(gpu),
                "fp16" if fp16 else "fp32",
                f"b{self.max_batch}",
                "x".join(map(str, stage.patch)),
            ]
        )
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.plan_path = cache_dir / f"{key}.plan"
        if self.plan_path.is_file():
            plan = self.plan_path.read_bytes()
            log.info("TensorRT: using cached plan %s", self.plan_path)
        else:
            plan = self._build(fp16=fp16)
            tmp = self.plan_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(plan)
            tmp.replace(self.plan_path)
            log.info("TensorRT: built and cached plan %s", self.plan_path)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize plan {self.plan_path}")
        self.context = self.engine.create_execution_context()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.name = "tensorrt"

    def _build(self, *, fp16: bool) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(Path(self.stage.onnx).read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendUnavailableError(f"TensorRT could not parse {self.stage.onnx}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        c = self.stage.network.in_channels
        patch = tuple(self.stage.patch)
        opt = max(1, self.max_batch // 2)
        profile.set_shape(INPUT_NAME, (1, c, *patch), (opt, c, *patch), (self.max_batch, c, *patch))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailableError(
                f"TensorRT failed to build an engine for {self.stage.onnx}"
            )
        return bytes(plan)

    def predict(self, batch):
        self._check(batch)
        cp, trt = self.cp, self.trt
        on_device = hasattr(batch, "__cuda_array_interface__")
        if tuple(batch.shape[2:]) != tuple(self.stage.patch) or batch.shape[0] > self.max_batch:
            raise EngineInputError(
                f"TensorRT batch must be (<= {self.max_batch}, 1, {self.stage.patch}), got {batch.shape}"
            )
        with self.stream:
            x = cp.ascontiguousarray(cp.asarray(batch, dtype=cp.float32))
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data.ptr)
            outputs = {}
            for i in range(self.engine.num_io_tensors):
                tname = self.engine.get_tensor_name(i)
                if self.engine.get_tensor_mode(tname) != trt.TensorIOMode.OUTPUT:
                    continue
                shape = tuple(self.context.get_tensor_shape(tname))
                buf = cp.empty(shape, dtype=cp.float32)
                self.context.set_tensor_address(tname, buf.data.ptr)
                outputs[tname] = buf
            if not self.context.execute_async_v3(self.stream.ptr):
                raise BackendUnavailableError("TensorRT execute_async_v3 failed")
            self.stream.synchronize()
        result = {k: outputs[k] for k in self.stage.outputs}
        return result if on_device else {k: cp.asnumpy(v) for k, v in result.items()}


def open_backend(
    stage: StageSpec,
    *,
    backend: str = "auto",
    threads: int | None = None,
    cache_dir: Path | None = None,
    max_batch: int = 8,
) -> Backend:
    """Open ``stage`` on the requested backend (see module docstring for the names)."""

    resolved = resolve_backend(backend)
    if resolved == "onnxruntime":
        return OnnxRuntimeBackend(stage, threads=threads)
    if resolved == "onnxruntime-cuda":
        return OnnxRuntimeBackend(stage, cuda=True, threads=threads)
    if resolved in ("torch-cpu", "torch-cuda"):
        return TorchBackend(stage, device="cuda" if resolved == "torch-cuda" else "cpu")
    cache = cache_dir or Path(os.environ.get("PDACSCREEN_WORK", "work")) / "trt-cache"
    return TensorRTBackend(
        stage, onnx_sha256=sha256_file(stage.onnx), cache_dir=cache, max_batch=max_batch
    )
