"""INT8 variants of a package's stages (ONNX Runtime static quantization, QDQ, per-channel).

:func:`quantize_stage` calibrates on real model inputs (windows of phantom studies built by
:mod:`pdacscreen.engine.preprocess`, never random noise) and writes ``<stage>.int8.onnx``.
Whether an INT8 variant ships is decided by measurement (``tests/bench/test_bench_quantize.py``:
speed against FP32 in the same run, and the accuracy rule of the throughput issue: AUROC change
<= 0.005, flag flips <= 1%). On the 2-core development CPU the reference networks got SLOWER in
INT8 (their InstanceNormalization layers stay in float, so every block dequantizes and quantizes
again around QLinearConv, with NHWC transposes): no INT8 file is shipped and
``EngineConfig(precision="int8")`` is refused for the reference package.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pdacscreen.engine.errors import EngineInputError
from pdacscreen.engine.package import StageSpec

__all__ = ["quantize_stage", "calibration_windows"]


def calibration_windows(
    inputs: Iterable[np.ndarray], patch: tuple[int, int, int], *, per_input: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """``(1, 1, *patch)`` float32 windows drawn from model inputs ``(z, y, x)`` (seeded)."""
    rng = np.random.default_rng(seed)
    for x in inputs:
        pad = [(0, max(0, p - s)) for p, s in zip(patch, x.shape, strict=True)]
        x = np.pad(x, pad, mode="edge") if any(b for _, b in pad) else x
        for _ in range(per_input):
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(x.shape, patch, strict=True)]
            win = x[tuple(slice(a, a + p) for a, p in zip(start, patch, strict=True))]
            yield np.ascontiguousarray(win[None, None], dtype=np.float32)


def quantize_stage(stage: StageSpec, windows: Iterable[np.ndarray], out: Path) -> Path:
    """Write the INT8 (QDQ, per-channel weights, uint8 activations) model of ``stage`` to ``out``.

    ``windows``: calibration batches ``(1, 1, *stage.patch)`` (MinMax calibration).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = list(windows)
    if not data:
        raise EngineInputError("quantize_stage: no calibration windows given")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = out.with_name(out.stem + ".pre.onnx")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": d} for d in data])

        def get_next(self):
            return next(self._it, None)

    # symbolic shape inference cannot resolve the networks' dynamic (n, z, y, x) axes
    quant_pre_process(str(stage.onnx), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    pre.unlink(missing_ok=True)
    return out
