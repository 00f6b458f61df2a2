"""Separable resampling of ``(z, y, x)`` volumes: to a target spacing, or a world box (stage-2 crop).

Method: along each array axis the 1-D operation "Gaussian pre-filter (anti-aliasing, only when that
axis is downsampled by more than ``AA_MIN_FACTOR``) then linear interpolation" is one small matrix
``W`` (n_out x n_in).  A 3-D resample is three matrix products, one per axis, done in the order that
shrinks the data soonest.  NumPy applies ``W`` band by band (blocks of output rows times the input
rows they touch) with BLAS; CuPy applies the dense ``W`` with cuBLAS.  Nearest-neighbour (order 0)
gathers instead and keeps the dtype.

Conventions (match ``scipy.ndimage.zoom(..., order=1, grid_mode=True, mode="nearest")`` and a
preceding ``gaussian_filter(sigma, mode="nearest", truncate=4)``):

* ``resample``: ``n_out = max(1, round(n_in * spacing_in / target))`` per axis; the output grid
  covers exactly the input's extent (voxel edges), so the true output spacing is
  ``spacing_in * n_in / n_out`` (close to the target; the returned affine states it exactly).
* Anti-aliasing: per axis with zoom factor ``f = spacing_out / spacing_in > AA_MIN_FACTOR``, a
  Gaussian with ``sigma = (f - 1) / 2`` input voxels (scikit-image's rule).
* Samples inside ``[-0.5, n_in - 0.5]`` use edge-clamped interpolation; samples outside get ``fill``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pdacscreen.kernels._backend import check_volume, resolve, spacing_from_affine
from pdacscreen.kernels.errors import KernelInputError

__all__ = ["AA_MIN_FACTOR", "axis_operator", "crop_resample", "resample"]

log = logging.getLogger(__name__)

AA_MIN_FACTOR = 1.5  # anti-alias an axis when it is downsampled by more than this factor
_TRUNCATE = 4.0  # Gaussian support in sigmas (scipy's default)
_BAND_ROWS = 16  # output rows per BLAS call on the NumPy path


def _gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised Gaussian taps, offsets ``-r..r`` (scipy.ndimage.gaussian_filter1d's kernel)."""
    if sigma <= 0:
        return np.ones(1)
    r = int(_TRUNCATE * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 / (sigma * sigma) * x * x)
    return g / g.sum()


def axis_operator(n_in: int, pos: np.ndarray, *, order: int, sigma: float) -> np.ndarray:
    """Dense 1-D resampling matrix ``W`` (len(pos) x n_in, float64).

    ``out[m] = sum_i W[m, i] * in[i]`` equals Gaussian filtering (``sigma`` input voxels, edges
    clamped) followed by order-0/1 interpolation at position ``pos[m]`` (input index units, edges
    clamped).  Rows for positions outside ``[-0.5, n_in - 0.5]`` are computed clamped as well; the
    caller overwrites them with the fill value.
    """
    pos = np.asarray(pos, dtype=np.float64)
    n_out = pos.shape[0]
    w = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if order == 0:
        i = np.clip(np.floor(pos + 0.5).astype(np.int64), 0, n_in - 1)
        w[rows, i] = 1.0
        return w
    g = _gaussian_taps(sigma)
    r = (g.size - 1) // 2
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    for base, weight in (
        (np.clip(i0, 0, n_in - 1), 1.0 - frac),
        (np.clip(i0 + 1, 0, n_in - 1), frac),
    ):
        for t in range(-r, r + 1):
            np.add.at(w, (rows, np.clip(base + t, 0, n_in - 1)), weight * g[t + r])
    return w


def _validate(order: int, target_spacing: Any, fill: float) -> np.ndarray:
    if order not in (0, 1):
        raise KernelInputError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    t = np.broadcast_to(np.asarray(target_spacing, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise KernelInputError(
            f"target_spacing must be one or three positive mm values (dz, dy, dx), "
            f"got {target_spacing!r}"
        )
    if not np.isfinite(fill):
        raise KernelInputError(f"fill must be a finite value, got {fill!r}")
    return t


def _sigma(factor: float, order: int, antialias: bool) -> float:
    if order == 0 or not antialias or factor <= AA_MIN_FACTOR:
        return 0.0
    return (factor - 1.0) / 2.0


def resample(
    array: Any,
    affine: np.ndarray,
    target_spacing: float | tuple[float, float, float],
    *,
    order: int = 1,
    antialias: bool = True,
    fill: float = -1024.0,
    crop: tuple[slice, slice, slice] | None = None,
    backend: str = "auto",
) -> tuple[Any, np.ndarray]:
    """Resample a ``(z, y, x)`` volume to ``target_spacing`` mm, keeping its physical extent.

    Args:
        array: ``(z, y, x)`` values (HU, model input, or labels with ``order=0``).
        affine: 4x4, index ``(k, j, i, 1)`` -> LPS mm; spacing is taken from its column norms.
        target_spacing: ``(dz, dy, dx)`` mm, or one value for all axes.
        order: 1 trilinear (float32 result) or 0 nearest (dtype kept, never anti-aliased).
        antialias: Gaussian pre-filter on axes downsampled by more than ``AA_MIN_FACTOR``.
        fill: value for samples outside the input (only reached by rounding at the edges).
        crop: optional index box ``(slice_z, slice_y, slice_x)`` of the *input* (e.g.
            ``BodyBox.box``): only output voxels whose centres fall inside it are computed.  The
            grid is the whole volume's, so the result equals resampling everything then cropping.
        backend: ``"auto" | "numpy" | "cupy"``.

    Returns:
        ``(out, out_affine)``: ``out`` ``(z', y', x')`` of the backend's array type and its affine
        (NumPy float64, index -> LPS mm; a world point keeps its position).
    """
    check_volume(array)
    t = _validate(order, target_spacing, fill)
    aff = np.asarray(affine, dtype=np.float64)
    sp = spacing_from_affine(aff)
    box = _check_box(crop, array.shape)
    positions, sigmas, steps = [], [], []
    for c in range(3):
        n_in = int(array.shape[c])
        n_out = max(1, int(round(n_in * sp[c] / t[c])))
        step = n_in / n_out
        pos = (np.arange(n_out) + 0.5) * step - 0.5
        lo, hi = box[c].start, box[c].stop
        keep = np.flatnonzero((pos >= lo - 0.5) & (pos <= hi - 0.5))
        if keep.size == 0:  # a box thinner than one output voxel: the nearest output voxel
            keep = np.array([int(np.argmin(np.abs(pos - (lo + hi - 1) / 2.0)))])
        positions.append(pos[keep[0] : keep[-1] + 1])
        sigmas.append(_sigma(step, order, antialias))
        steps.append(step)
    return _resample_at(
        array, aff, positions, sigmas, steps, order=order, fill=fill, backend=backend
    )


def crop_resample(
    array: Any,
    affine: np.ndarray,
    *,
    box_min: Any,
    box_max: Any,
    target_spacing: float | tuple[float, float, float],
    order: int = 1,
    antialias: bool = True,
    fill: float = -1024.0,
    backend: str = "auto",
) -> tuple[Any, np.ndarray]:
    """Sample a world box at ``target_spacing`` without resampling the whole volume.

    Args:
        array: ``(z, y, x)`` volume; ``affine`` its index ``(k, j, i, 1)`` -> LPS mm matrix.
        box_min, box_max: two opposite corners ``(x, y, z)`` of the box in LPS mm (any order).
        target_spacing: ``(dz, dy, dx)`` mm (or one value); the output spacing is exactly this.
        order, antialias, fill, backend: as in :func:`resample`; parts of the box outside the
            volume get ``fill``.

    Returns:
        ``(out, out_affine)``: output axes keep the input's directions; the grid has
        ``max(1, round(extent / target))`` voxels per axis centred on the box (the box's extent is
        measured along the input's axes over its 8 corners).
    """
    check_volume(array)
    t = _validate(order, target_spacing, fill)
    aff = np.asarray(affine, dtype=np.float64)
    sp = spacing_from_affine(aff)
    a, b = (np.asarray(v, dtype=np.float64).reshape(3) for v in (box_min, box_max))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise KernelInputError(f"box_min/box_max must be finite (x, y, z) mm, got {a}, {b}")
    corners = np.array(
        [[(a, b)[s][0], (a, b)[u][1], (a, b)[v][2]] for s in (0, 1) for u in (0, 1) for v in (0, 1)]
    )
    inv = np.linalg.inv(aff)
    kji = corners @ inv[:3, :3].T + inv[:3, 3]
    lo, hi = kji.min(axis=0), kji.max(axis=0)
    positions, sigmas, steps = [], [], []
    for c in range(3):
        step = t[c] / sp[c]
        n_out = max(1, int(round((hi[c] - lo[c]) / step)))
        centre = (lo[c] + hi[c]) / 2.0
        positions.append(centre + (np.arange(n_out) - (n_out - 1) / 2.0) * step)
        sigmas.append(_sigma(step, order, antialias))
        steps.append(step)
    return _resample_at(
        array, aff, positions, sigmas, steps, order=order, fill=fill, backend=backend
    )


def _check_box(crop: Any, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    if crop is None:
        return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]
    if len(crop) != 3 or not all(isinstance(s, slice) for s in crop):
        raise KernelInputError(f"crop must be three slices (z, y, x), got {crop!r}")
    out = []
    for s, n in zip(crop, shape, strict=True):
        start, stop, step = s.indices(int(n))
        if step != 1 or stop <= start:
            raise KernelInputError(f"crop slices must be non-empty with step 1, got {crop!r}")
        out.append(slice(start, stop))
    return tuple(out)  # type: ignore[return-value]


def _resample_at(
    array: Any,
    aff: np.ndarray,
    positions: list[np.ndarray],
    sigmas: list[float],
    steps: list[float],
    *,
    order: int,
    fill: float,
    backend: str,
) -> tuple[Any, np.ndarray]:
    """Sample ``array`` on the grid ``positions[0] x positions[1] x positions[2]`` (index units).

    ``steps[c]`` is the output voxel size along axis ``c`` in input voxels (for the affine).
    """
    be = resolve(backend, array)
    src = be.asarray(array)
    shape = src.shape
    # Restrict the input to the rows the operators read (a view): the crop never touches the rest.
    window, ops, valid = [], [], []
    for c in range(3):
        n_in = int(shape[c])
        w = axis_operator(n_in, positions[c], order=order, sigma=sigmas[c])
        cols = np.flatnonzero(np.any(w != 0, axis=0))
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        window.append(slice(lo, hi))
        ops.append(w[:, lo:hi])
        valid.append((positions[c] >= -0.5 - 1e-9) & (positions[c] <= n_in - 0.5 + 1e-9))
    src = src[tuple(window)]
    if order == 0:
        out = src
        for c in range(3):
            idx = np.argmax(ops[c], axis=1)
            out = be.xp.take(out, be.asarray(idx), axis=c)
        out = be.xp.ascontiguousarray(out)
    elif be.is_gpu:
        out = _apply_dense(be.xp, src, ops)
    else:
        out = _apply_banded(src, ops)
    _fill_outside(be.xp, out, valid, fill)
    out_aff = aff.copy()
    for c in range(3):
        out_aff[:3, c] = aff[:3, c] * steps[c]
    origin = np.array([positions[0][0], positions[1][0], positions[2][0]])
    out_aff[:3, 3] = aff[:3, :3] @ origin + aff[:3, 3]
    return out, out_aff


def _fill_outside(xp: Any, out: Any, valid: list[np.ndarray], fill: float) -> None:
    for c in range(3):
        if not valid[c].all():
            idx = [slice(None)] * 3
            idx[c] = xp.asarray(np.flatnonzero(~valid[c]))
            out[tuple(idx)] = fill


def _axis_order(shape: tuple[int, ...], ops: list[np.ndarray]) -> list[int]:
    """Axes by shrink ratio n_out/n_in (most shrinking first): later passes see less data."""
    return sorted(range(3), key=lambda c: (ops[c].shape[0] / max(shape[c], 1), c))


def _apply_dense(xp: Any, src: Any, ops: list[np.ndarray]) -> Any:
    """Three dense matrix products (one per axis) on the device; float32 result."""
    cur = xp.ascontiguousarray(src, dtype=xp.float32)
    for c in _axis_order(cur.shape, ops):
        w = xp.asarray(ops[c], dtype=xp.float32)
        if _is_identity(ops[c]):
            continue
        nz, ny, nx = cur.shape
        if c == 0:
            cur = (w @ cur.reshape(nz, ny * nx)).reshape(w.shape[0], ny, nx)
        elif c == 1:
            cur = xp.matmul(w, cur)
        else:
            cur = (cur.reshape(nz * ny, nx) @ w.T).reshape(nz, ny, w.shape[0])
        cur = xp.ascontiguousarray(cur)
    return cur


def _is_identity(w: np.ndarray) -> bool:
    return w.shape[0] == w.shape[1] and bool(np.array_equal(w, np.eye(w.shape[0])))


def _bands(w: np.ndarray, rows: int) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Split ``w`` into blocks of ``rows`` output rows with the input columns they touch."""
    out = []
    for m0 in range(0, w.shape[0], rows):
        m1 = min(m0 + rows, w.shape[0])
        cols = np.flatnonzero(np.any(w[m0:m1] != 0, axis=0))
        i0, i1 = int(cols[0]), int(cols[-1]) + 1
        out.append((m0, m1, i0, i1, np.ascontiguousarray(w[m0:m1, i0:i1], dtype=np.float32)))
    return out


def _apply_banded(src: np.ndarray, ops: list[np.ndarray]) -> np.ndarray:
    """NumPy path: per axis, BLAS products of row blocks of ``W`` with the input rows they touch.

    The first pass reads the source (any dtype) block by block, so no full float32 copy of an int16
    input is ever made; every later pass works on the already reduced float32 data.
    """
    cur = src
    for c in _axis_order(src.shape, ops):
        w = ops[c]
        if _is_identity(w):
            continue
        shape = list(cur.shape)
        shape[c] = w.shape[0]
        out = np.empty(shape, dtype=np.float32)
        for m0, m1, i0, i1, wb in _bands(w, _BAND_ROWS):
            if c == 0:
                blk = cur[i0:i1]
                if blk.dtype != np.float32:
                    blk = blk.astype(np.float32)
                k = i1 - i0
                np.matmul(wb, blk.reshape(k, -1), out=out[m0:m1].reshape(m1 - m0, -1))
            elif c == 1:
                blk = cur[:, i0:i1]
                if blk.dtype != np.float32:
                    blk = blk.astype(np.float32)
                np.matmul(wb, blk, out=out[:, m0:m1])
            else:
                blk = cur[:, :, i0:i1]
                if blk.dtype != np.float32:
                    blk = blk.astype(np.float32)
                out[:, :, m0:m1] = blk @ wb.T
        cur = out
    if cur is src:  # every axis was the identity
        cur = np.array(src, dtype=np.float32)
    return cur
