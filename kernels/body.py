"""Body mask and crop box of a CT volume: removes air, the table and out-of-field padding.

Algorithm (the same array code runs on NumPy/SciPy and on CuPy/cupyx):

1. ``fg = hu > threshold`` at full resolution.
2. In-plane majority vote over blocks of about ``COARSE_MM`` (a coarse grid, for speed).
3. In-plane opening with a square of about ``2 * TABLE_MM``: removes the thin table shell, cables
   and blankets touching the body.
4. The largest 3-D connected component (the trunk), then slice-wise hole filling (lungs and bowel
   gas inside the body belong to it).
5. Back to full resolution: the coarse interior is kept whole, and in a rim one coarse pixel
   either side of the outline the full-resolution threshold decides.

Padding and out-of-field values (-1024, -2000, -3024) fall below any sensible threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdacscreen.kernels._backend import Backend, check_volume, resolve, to_host
from pdacscreen.kernels.errors import KernelInputError, NoBodyError

__all__ = ["COARSE_MM", "TABLE_MM", "BodyBox", "body_mask"]

log = logging.getLogger(__name__)

COARSE_MM = 3.0  # in-plane size of the coarse grid's pixels
TABLE_MM = 3.0  # structures thinner than about twice this are opened away (table, cables)
_SLAB_VOXELS = 1 << 21  # voxels per slab of the full-resolution passes (a few MiB: in cache)


@dataclass(frozen=True)
class BodyBox:
    """The patient's body in a ``(z, y, x)`` volume.

    Attributes:
        mask: ``(z, y, x)`` bool array (backend's type) of body voxels, inner air included.
        box: ``(slice_z, slice_y, slice_x)`` bounding box of ``mask`` (index space, step 1).
        voxels: number of body voxels.
        slices: number of ``z`` slices holding body voxels.
    """

    mask: Any
    box: tuple[slice, slice, slice]
    voxels: int
    slices: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the box ``(z, y, x)`` in voxels."""
        return tuple(s.stop - s.start for s in self.box)  # type: ignore[return-value]

    def box_affine(self, affine: np.ndarray) -> np.ndarray:
        """Affine of ``array[self.box]`` given the whole volume's ``affine`` (index -> LPS mm)."""
        aff = np.array(affine, dtype=np.float64)
        start = np.array([s.start for s in self.box], dtype=np.float64)
        aff[:3, 3] = aff[:3, :3] @ start + aff[:3, 3]
        return aff


def _in_plane_structure() -> np.ndarray:
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = True  # 8-connected within a slice, nothing across slices
    return s


def body_mask(
    hu: Any,
    *,
    threshold: float = -500.0,
    spacing: tuple[float, float, float] | None = None,
    backend: str = "auto",
) -> BodyBox:
    """Body mask and bounding box of a ``(z, y, x)`` volume in HU.

    Args:
        hu: ``(z, y, x)`` HU values (int16 or float), NumPy or CuPy array.
        threshold: HU above which a voxel can be body (``-500`` keeps fat, drops air and foam).
        spacing: ``(dz, dy, dx)`` mm, used to size the coarse grid and the table opening; ``None``
            assumes 1 mm in-plane.
        backend: ``"auto" | "numpy" | "cupy"``; ``BodyBox.mask`` is an array of that backend.

    Raises:
        NoBodyError: (code ``no_body``) nothing above ``threshold`` survives.
    """
    check_volume(hu, "hu")
    if not np.isfinite(threshold):
        raise KernelInputError(f"threshold must be a finite HU value, got {threshold!r}")
    sp = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise KernelInputError(f"spacing must be three positive mm values, got {spacing!r}")
    be = resolve(backend, hu)
    x = be.asarray(hu)
    mask, coarse, (by, bx) = _body_mask_array(be, x, float(threshold), sp)
    z_any = to_host(coarse.any(axis=(1, 2)))
    if not z_any.any():
        raise NoBodyError(
            f"no body found: no connected region above {threshold} HU in a volume of shape "
            f"{tuple(x.shape)}; check that the array holds HU (not stored values)"
        )
    # The box follows from the coarse grid; only the outermost block rows/columns are refined at
    # full resolution.
    ys = _refine(be, mask, _span(to_host(coarse.any(axis=(0, 2)))), by, axis=1)
    xs = _refine(be, mask, _span(to_host(coarse.any(axis=(0, 1)))), bx, axis=2)
    box = (_span(z_any), ys, xs)
    voxels = int(be.xp.count_nonzero(mask))
    log.debug("body box %s, %d voxels, %d slices", box, voxels, int(z_any.sum()))
    return BodyBox(mask=mask, box=box, voxels=voxels, slices=int(z_any.sum()))


def _span(flags: np.ndarray) -> slice:
    idx = np.flatnonzero(flags)
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _refine(be: Backend, mask: Any, coarse_span: slice, block: int, *, axis: int) -> slice:
    """Full-resolution bounds along ``axis`` from a coarse span (blocks of ``block`` voxels)."""
    n = int(mask.shape[axis])
    # The outermost coarse blocks may hold no body voxel (rim one block out): look two deep.
    lo_blk = slice(coarse_span.start * block, min(n, (coarse_span.start + 2) * block))
    hi_blk = slice(max(0, (coarse_span.stop - 2) * block), min(n, coarse_span.stop * block))
    other = (0, 2) if axis == 1 else (0, 1)

    def hits(sl: slice) -> np.ndarray:
        idx = [slice(None)] * 3
        idx[axis] = sl
        return to_host(mask[tuple(idx)].any(axis=other))

    first, last = np.flatnonzero(hits(lo_blk)), np.flatnonzero(hits(hi_blk))
    lo = lo_blk.start + (int(first[0]) if first.size else 0)
    hi = hi_blk.start + (int(last[-1]) + 1 if last.size else hi_blk.stop - hi_blk.start)
    return slice(lo, hi)


def _body_mask_array(
    be: Backend, hu: Any, thr: float, sp: tuple[float, float, float]
) -> tuple[Any, Any, tuple[int, int]]:
    """(full mask, coarse mask, block size): steps 1-5 of the module docstring."""
    xp, ndi = be.xp, be.ndi
    nz, ny, nx = (int(n) for n in hu.shape)
    by = max(1, min(15, ny, int(round(COARSE_MM / sp[1]))))
    bx = max(1, min(15, nx, int(round(COARSE_MM / sp[2]))))
    cy, cx = -(-ny // by), -(-nx // bx)
    # Majority vote per block, slab by slab so that the work stays in cache.
    zs = max(1, _SLAB_VOXELS // (ny * nx))
    votes = xp.empty((nz, cy, cx), dtype=xp.uint8)
    for z0 in range(0, nz, zs):
        f8 = (hu[z0 : z0 + zs] > thr).view(xp.uint8)
        vx = xp.zeros((f8.shape[0], ny, cx), dtype=xp.uint8)
        for b in range(bx):
            p = f8[:, :, b::bx]
            vx[:, :, : p.shape[2]] += p
        v = xp.zeros((f8.shape[0], cy, cx), dtype=xp.uint8)
        for a in range(by):
            p = vx[:, a::by, :]
            v[:, : p.shape[1], :] += p
        votes[z0 : z0 + zs] = v
    per_block = np.outer(
        np.minimum(by, ny - np.arange(cy) * by), np.minimum(bx, nx - np.arange(cx) * bx)
    )
    coarse = votes.astype(xp.int32) * 2 > be.asarray(per_block.astype(np.int32))
    r = max(1, int(round(TABLE_MM / (by * sp[1]))))
    square = be.asarray(_in_plane_structure())  # on the device for cupyx morphology
    if min(cy, cx) > 2 * r + 1:
        # A (2r+1)^2 square as two line passes (cupyx has no fast iterated erosion).
        rows = be.asarray(np.ones((1, 2 * r + 1, 1), dtype=bool))
        cols = be.asarray(np.ones((1, 1, 2 * r + 1), dtype=bool))
        opened = ndi.binary_erosion(coarse, structure=rows, border_value=1)
        opened = ndi.binary_erosion(opened, structure=cols, border_value=1)
        opened = ndi.binary_dilation(opened, structure=rows)
        opened = ndi.binary_dilation(opened, structure=cols)
        opened &= coarse
        if not bool(opened.any()):  # everything is thinner than a table: keep it all
            opened = coarse
    else:  # a tiny slice: nothing as thin as a table can be told apart from the body
        opened = coarse
    labels, n = ndi.label(opened, structure=np.ones((3, 3, 3), dtype=bool))
    if int(n) == 0:
        return xp.zeros(hu.shape, dtype=bool), xp.zeros(coarse.shape, dtype=bool), (by, bx)
    counts = xp.bincount(labels.ravel(), minlength=int(n) + 1)
    counts[0] = 0
    filled = _fill_holes_in_plane(be, labels == int(counts.argmax()))
    inner = ndi.binary_erosion(filled, structure=square, border_value=1)
    if by > 1 or bx > 1:  # the rim may reach one block out: blocks with a minority of body
        filled = ndi.binary_dilation(filled, structure=square)
    mask = xp.empty(hu.shape, dtype=bool)
    for z0 in range(0, nz, zs):
        sl = slice(z0, z0 + zs)
        up_filled = _upsample(xp, filled[sl], by, bx)[:, :ny, :nx]
        up_inner = _upsample(xp, inner[sl], by, bx)[:, :ny, :nx]
        mask[sl] = ((hu[sl] > thr) & up_filled) | up_inner
    return mask, filled, (by, bx)


def _upsample(xp: Any, a: Any, by: int, bx: int) -> Any:
    """Nearest-neighbour upsampling of a coarse ``(z, cy, cx)`` mask by blocks ``(by, bx)``."""
    if by > 1:
        a = xp.repeat(a, by, axis=1)
    if bx > 1:
        a = xp.repeat(a, bx, axis=2)
    return a


def _fill_holes_in_plane(be: Backend, mask: Any) -> Any:
    """Fill holes of ``mask`` slice by slice: background regions not touching the slice's edge."""
    xp, ndi = be.xp, be.ndi
    lab, n = ndi.label(~mask, structure=_in_plane_structure())
    if int(n) == 0:
        return mask
    edge = xp.concatenate(
        [lab[:, 0, :].ravel(), lab[:, -1, :].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]
    )
    outside = xp.zeros(int(n) + 1, dtype=bool)
    outside[edge] = True
    outside[0] = False
    return ~outside[lab]
