"""GPU check of the kernels: CuPy vs NumPy timing and agreement on a 512x512x300 volume.

Run ``python -m pdacscreen.kernels.gpucheck`` on a machine with CuPy and a CUDA GPU (``infra/
gpu-check`` calls it after the parity tests).  For each kernel it reports the NumPy time, the first
CuPy call (kernel compilation included), the best of ``--repeats`` CuPy calls (device synchronised),
the speed-up and the largest difference between the two results; then the whole preprocessing of
one series (upload, body crop, model input, 4 mm and cropped 1 mm grids, download).  Exit status:
0 all agree, 1 a result disagrees, 2 no GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pdacscreen.kernels import (
    blood_pool_hu,
    body_mask,
    connected_components,
    crop_resample,
    has_gpu,
    noise_hu,
    resample,
    to_host,
    to_model_input,
    z_coverage_mm,
)
from pdacscreen.kernels._backend import gpu_reason
from pdacscreen.kernels.phantom import synthetic_ct

WINDOW, MEAN, STD = (-160.0, 240.0), 40.0, 80.0


class _Timer:
    def __init__(self, cp: Any, repeats: int) -> None:
        self.cp, self.repeats = cp, repeats

    def gpu(self, fn: Callable[[], Any]) -> tuple[float, float, Any]:
        """(first call s, best of repeats s, result); the device is synchronised around calls."""
        sync = self.cp.cuda.Device().synchronize
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        first = time.perf_counter() - t
        best = np.inf
        for _ in range(self.repeats):
            t = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return first, best, out

    @staticmethod
    def cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        a, b = a[0], b[0]
    if isinstance(a, float | int):
        return abs(float(a) - float(b))
    a, b = to_host(a), to_host(b)
    if a.shape != b.shape:
        return float("inf")
    if a.dtype == bool:
        return float(np.mean(a != b))  # fraction of voxels that differ
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


class _HostAsDevice:
    """Stands in for CuPy in ``--dry-run`` (checks this script's logic on a machine without GPU)."""

    __version__ = "none (dry run: NumPy as the device)"
    asarray = staticmethod(np.asarray)

    class cuda:  # noqa: N801 - mirrors cupy.cuda
        class Device:
            def synchronize(self) -> None:
                return None


def run(shape: tuple[int, int, int], repeats: int, skip_cpu: bool, dry_run: bool = False) -> int:
    if dry_run:
        cp, dev, name = _HostAsDevice, "numpy", "host (dry run)"
    elif not has_gpu():
        sys.stdout.write(f"gpucheck: no usable GPU ({gpu_reason()})\n")
        return 2
    else:
        import cupy as cp

        dev = "cupy"
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    sys.stdout.write(f"device: {name}, cupy {cp.__version__}, volume {shape} (z, y, x)\n")
    spacing = (1.0, 0.7, 0.7)
    p = synthetic_ct(shape=shape, spacing=spacing, noise_hu=12.0, seed=0)
    hu, aff = p.hu, p.affine
    stored = (hu.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16)
    timer = _Timer(cp, repeats)
    d_hu, d_stored = cp.asarray(hu), cp.asarray(stored)
    body = body_mask(hu, spacing=spacing, backend="numpy")
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2.0) + aff[:3, 3]
    box = {"box_min": centre - [60.0, 50.0, 80.0], "box_max": centre + [60.0, 50.0, 80.0]}
    lesions = hu > 400
    cases: list[tuple[str, Callable[[str, Any, Any], Any], float]] = [
        ("upload int16", lambda b, h, s: cp.asarray(hu) if b == dev else hu.copy(), 0.0),
        (
            "to_model_input",
            lambda b, h, s: to_model_input(
                s, intercept=-1024.0, window=WINDOW, mean=MEAN, std=STD, backend=b
            ),
            1e-5,
        ),
        ("body_mask", lambda b, h, s: body_mask(h, spacing=spacing, backend=b).mask, 1e-4),
        ("resample 4 mm", lambda b, h, s: resample(h, aff, 4.0, backend=b), 0.05),
        (
            "resample 1 mm crop",
            lambda b, h, s: resample(h, aff, 1.0, crop=body.box, backend=b),
            0.05,
        ),
        (
            "crop_resample 0.8 mm",
            lambda b, h, s: crop_resample(h, aff, target_spacing=0.8, backend=b, **box),
            0.05,
        ),
        (
            "components (>400 HU)",
            lambda b, h, s: [
                c.voxels
                for c in connected_components(
                    cp.asarray(lesions) if b == dev else lesions, aff, backend=b
                )
            ][:50],
            0.0,
        ),
        ("blood_pool_hu", lambda b, h, s: blood_pool_hu(h, aff, backend=b), 0.5),
        ("noise_hu", lambda b, h, s: noise_hu(h, backend=b), 0.25),
        ("z_coverage_mm", lambda b, h, s: z_coverage_mm(h, aff, backend=b), 0.0),
        (
            "whole preprocessing",
            lambda b, h, s: _chain(b, cp if b == dev else np, stored, aff, spacing),
            1e-4,
        ),
    ]
    rows, failed = [], False
    for label, fn, tol in cases:
        first, best, out_gpu = timer.gpu(lambda fn=fn: fn(dev, d_hu, d_stored))
        if skip_cpu:
            t_cpu, diff = float("nan"), float("nan")
        else:
            t_cpu, out_cpu = timer.cpu(lambda fn=fn: fn("numpy", hu, stored))
            if isinstance(out_cpu, list):
                diff = 0.0 if out_cpu == out_gpu else float("inf")
            elif isinstance(out_cpu, dict):
                diff = max(_max_diff(out_cpu[k], out_gpu[k]) for k in out_cpu)
            else:
                diff = _max_diff(out_cpu, out_gpu)
        ok = skip_cpu or diff <= tol
        failed |= not ok
        rows.append((label, t_cpu, first, best, t_cpu / best, diff, "ok" if ok else "DIFF"))
    _print_table(rows)
    return 1 if failed else 0


def _chain(backend: str, xp: Any, stored: np.ndarray, aff: np.ndarray, spacing: tuple) -> dict:
    """One series from host stored values to host model inputs (4 mm grid and 1 mm body crop)."""
    s = xp.asarray(stored)
    body = body_mask(s, threshold=-500.0 + 1024.0, spacing=spacing, backend=backend)
    x = to_model_input(s, intercept=-1024.0, window=WINDOW, mean=MEAN, std=STD, backend=backend)
    coarse, _ = resample(x, aff, 4.0, backend=backend)
    fine, _ = resample(x, aff, 1.0, crop=body.box, backend=backend)
    return {"coarse": to_host(coarse), "fine": to_host(fine)}


def _print_table(rows: list[tuple]) -> None:
    head = ("kernel", "numpy s", "cupy 1st s", "cupy s", "speed-up", "max diff", "")
    lines = [head] + [
        (r[0], f"{r[1]:.3f}", f"{r[2]:.3f}", f"{r[3]:.4f}", f"{r[4]:.1f}x", f"{r[5]:.2e}", r[6])
        for r in rows
    ]
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    for n, line in enumerate(lines):
        sys.stdout.write(
            "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) + "\n"
        )
        if n == 0:
            sys.stdout.write("  ".join("-" * w for w in widths) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3, help="timed CuPy calls per kernel (best)")
    ap.add_argument("--skip-cpu", action="store_true", help="time the GPU only (no parity)")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: NumPy stands in for CuPy (checks this script only)",
    )
    args = ap.parse_args(argv)
    return run(tuple(args.shape), max(1, args.repeats), args.skip_cpu, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
