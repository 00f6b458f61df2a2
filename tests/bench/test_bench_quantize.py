"""INT8 against FP32 for each stage of the shipped package, on the same windows in one run.

Calibration and timing windows are real model inputs (phantom studies through
engine/preprocess), not noise. The figure decides whether an INT8 variant ships (it must be
faster first; then the accuracy rule applies): see engine/quantize.py.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

from pdacscreen.engine.package import load_package
from pdacscreen.engine.preprocess import coarse_grid, model_input
from pdacscreen.engine.quantize import calibration_windows, quantize_stage
from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.types import CTVolume

pytestmark = pytest.mark.bench


def _inputs(package, n: int) -> list[np.ndarray]:
    out = []
    for seed in range(n):
        s = make_subject(9100 + seed, matrix=128, pdac=bool(seed % 2))
        vol = CTVolume(s.noncontrast.astype(np.float32), s.spacing, s.affine)
        hu, _ = coarse_grid(vol, package.stage2.spacing_mm)
        out.append(model_input(hu, package.preprocessing))
    return out


def _seconds(path, batch: np.ndarray, reps: int = 3) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": batch})  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run(None, {"input": batch})
    return (time.perf_counter() - t0) / reps


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_int8_against_fp32(stage, tmp_path):
    pkg = load_package()
    st = pkg.stages[stage]
    inputs = _inputs(pkg, 4)
    calib = list(calibration_windows(inputs, st.patch, per_input=4, seed=1))
    int8 = quantize_stage(st, calib, tmp_path / f"{stage}.int8.onnx")
    batch = np.concatenate(list(calibration_windows(inputs, st.patch, per_input=1, seed=2)))
    fp32_s, int8_s = _seconds(st.onnx, batch), _seconds(int8, batch)
    ref = ort.InferenceSession(str(st.onnx), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    a, b = ref.run(["seg"], {"input": batch})[0], q.run(["seg"], {"input": batch})[0]
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    print(
        f"BENCH engine_int8_vs_fp32_{stage} ratio={fp32_s / int8_s:.2f} fp32_s={fp32_s:.3f} "
        f"int8_s={int8_s:.3f} windows={len(batch)} voxel_label_agreement={agree:.4f} "
        f"(1 thread; ratio > 1: INT8 faster)"
    )
    assert agree > 0.5  # the quantized graph computes the same network (not a broken export)
