"""Shared naive baselines for the benchmarks: what a plain pydicom + SciPy + MONAI/nnU-Net-style
user would run, with no pdacscreen code on the hot path except the engine's generic tiler.

* :func:`naive_read_series`: ``pydicom.dcmread`` + ``pixel_array`` per file in one process, sorted
  by position along the slice normal, stacked, rescaled to HU (float32, ``(z, y, x)``).
* :func:`naive_zoom`: ``scipy.ndimage.zoom(order=1)`` of the whole volume to a target spacing.
* :func:`torch_eager_predictor`: a stage's network in torch eager mode as a ``predict`` callable
  for :func:`pdacscreen.engine.tiling.sliding_window` (Gaussian blending, no mirroring).
* :func:`naive_whole_abdomen`: the three chained over one series at the stage-2 fine spacing.
* :func:`interleaved` / :func:`best_of`: timing against a reference measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def naive_read_series(files: Sequence[str]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Decode ``files`` (one series) with a plain pydicom loop.

    Returns ``(array, spacing)``: float32 HU ``(z, y, x)`` sorted by the projection of
    ImagePositionPatient on the slice normal (ascending), and ``(dz, dy, dx)`` in mm (``dz``: median
    distance between slice centres).
    """
    import pydicom

    ds = [pydicom.dcmread(f) for f in files]
    iop = np.asarray(ds[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=float))) for d in ds]
    order = np.argsort(pos, kind="stable")
    ds = [ds[i] for i in order]
    arr = np.stack([d.pixel_array for d in ds]).astype(np.float32)
    for k, d in enumerate(ds):
        slope = np.float32(getattr(d, "RescaleSlope", 1) or 1)
        intercept = np.float32(getattr(d, "RescaleIntercept", 0) or 0)
        arr[k] = arr[k] * slope + intercept
    dz = float(np.median(np.diff(np.sort(pos))))
    dy, dx = (float(v) for v in ds[0].PixelSpacing)
    return arr, (dz, dy, dx)


def naive_zoom(array: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """``scipy.ndimage.zoom(order=1)`` of ``array`` ``(z, y, x)`` from ``spacing`` to ``target``
    (mm), over the whole volume."""
    from scipy import ndimage

    factors = tuple(float(s) / float(t) for s, t in zip(spacing, target, strict=True))
    return ndimage.zoom(array, factors, order=1)


def torch_eager_predictor(stage) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The stage's network (from its ``weights``) in torch eager mode, as ``batch -> outputs``.

    ``batch``: float32 ``(N, 1, pz, py, px)``; returns ``{"seg": (N, K, pz, py, px)}`` plus
    ``"cls"`` when the network has a classification head.
    """
    import torch

    from pdacscreen.engine.network import build_network

    net = build_network(stage.network)
    net.load_state_dict(torch.load(stage.weights, map_location="cpu", weights_only=True))
    net.eval()

    def predict(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = net(torch.from_numpy(batch))
        if isinstance(out, tuple):
            return {"seg": out[0].numpy(), "cls": out[1].numpy()}
        return {"seg": out.numpy()}

    return predict


def naive_whole_abdomen(
    files: Sequence[str],
    package,
    *,
    predict: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
    overlap: float = 0.5,
    batch_size: int = 4,
) -> dict:
    """One study the naive way: pydicom loop -> ``ndimage.zoom`` to the stage-2 spacing ->
    window/normalise -> torch eager sliding window of the stage-2 network over the whole scan.

    Returns ``{"decode_s", "zoom_s", "window_s", "total_s", "windows", "grid", "hu", "spacing",
    "cls"}`` (``hu``: the decoded HU array, for checks against other loaders).
    """
    from pdacscreen.engine.tiling import sliding_window

    st = package.stage2
    pre = package.preprocessing
    predict = predict or torch_eager_predictor(st)
    t0 = time.perf_counter()
    hu, spacing = naive_read_series(files)
    t1 = time.perf_counter()
    fine = naive_zoom(hu, spacing, st.spacing_mm)
    x = (np.clip(fine, *pre.window_hu) - np.float32(pre.mean)) / np.float32(pre.std)
    t2 = time.perf_counter()
    out = sliding_window(
        x.astype(np.float32),
        patch=st.patch,
        predict=predict,
        overlap=overlap,
        batch_size=batch_size,
    )
    t3 = time.perf_counter()
    return {
        "decode_s": t1 - t0,
        "zoom_s": t2 - t1,
        "window_s": t3 - t2,
        "total_s": t3 - t0,
        "windows": int(out["windows"]),
        "grid": tuple(int(v) for v in x.shape),
        "hu": hu,
        "spacing": spacing,
        "cls": float(np.max(out["cls"])) if "cls" in out else float("nan"),
    }


def interleaved(*fns: Callable[[], object], rounds: int = 5) -> tuple[list[float], list[object]]:
    """Median wall time of each of ``fns`` over ``rounds`` rounds that call them in turn (a load
    from other processes hits every side alike), and each one's last result."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times], outs


def best_of(fn: Callable[[], object], repeats: int = 2) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls of ``fn`` and the last result (noisy machines)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
