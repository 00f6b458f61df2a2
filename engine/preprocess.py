"""The model input, built in ONE place for training and inference.

Both stages see HU resampled onto their stage's grid, then windowed and normalised by the
package's :class:`~pdacscreen.engine.package.Preprocessing` (:func:`model_input`):

* stage 1 (:func:`coarse_grid`): the whole scan on ``stage1.spacing_mm``, linear interpolation
  with antialiasing, air (-1024 HU) outside the scan;
* stage 2 (:func:`fine_crop`): a world-space box around the pancreas on ``stage2.spacing_mm``. At
  inference the box comes from stage 1's mask (:func:`pdacscreen.engine.postprocess.localise`,
  grown by ``stage2.margin_mm``); in training from the true label (:func:`box_around`), grown by the
  margin the training recipe records in the package.

Arrays are ``(z, y, x)``; affines map index ``(k, j, i, 1)`` to LPS mm; boxes are ``(x, y, z)`` mm.
The kernels run on NumPy or CuPy (``backend``); :func:`model_input` always returns a host float32
array, which is what every engine backend takes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdacscreen.engine.errors import EngineInputError
from pdacscreen.engine.package import Preprocessing
from pdacscreen.io.types import CTVolume, voxel_to_world
from pdacscreen.kernels import crop_resample, resample, to_host, to_model_input

__all__ = ["AIR_HU", "model_input", "coarse_grid", "fine_crop", "box_around"]

#: Fill value outside the scanned field of view, in HU.
AIR_HU = -1024.0


def model_input(hu: Any, pre: Preprocessing, *, backend: str = "numpy") -> np.ndarray:
    """``(clip(hu, *window) - mean) / std`` as a host float32 array of the same shape."""
    x = to_model_input(
        hu, window=pre.window_hu, mean=pre.mean, std=pre.std, dtype="float32", backend=backend
    )
    return np.asarray(to_host(x), dtype=np.float32)


def coarse_grid(
    volume: CTVolume, spacing_mm: tuple[float, float, float], *, backend: str = "numpy"
) -> tuple[Any, np.ndarray]:
    """The whole scan resampled to the stage-1 grid: ``(hu, affine)`` (hu on ``backend``)."""
    hu, affine = resample(
        volume.array,
        volume.affine,
        spacing_mm,
        order=1,
        antialias=True,
        fill=AIR_HU,
        backend=backend,
    )
    return hu, np.asarray(affine)


def fine_crop(
    array: Any,
    affine: np.ndarray,
    box: tuple[np.ndarray, np.ndarray],
    spacing_mm: tuple[float, float, float],
    *,
    labels: bool = False,
    backend: str = "numpy",
) -> tuple[Any, np.ndarray]:
    """The world box ``(box_min, box_max)`` sampled on the stage-2 grid: ``(array, affine)``.

    ``labels=True`` samples a label map (nearest neighbour, 0 outside the scan) on the same grid
    as the HU crop of the same box, so image and labels stay voxel-aligned.
    """
    out, crop_affine = crop_resample(
        array,
        affine,
        box_min=box[0],
        box_max=box[1],
        target_spacing=spacing_mm,
        order=0 if labels else 1,
        fill=0 if labels else AIR_HU,
        backend=backend,
    )
    return out, np.asarray(crop_affine)


def box_around(
    mask: np.ndarray, affine: np.ndarray, margin_mm: float | tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """World box ``(x, y, z)`` mm of ``mask``'s voxels (their outer faces) grown by ``margin_mm``.

    ``margin_mm`` is one value or ``(z, y, x)`` mm, as ``stage2.margin_mm`` is stored.
    """
    idx = np.argwhere(np.asarray(mask) > 0)
    if len(idx) == 0:
        raise EngineInputError("box_around: the mask has no voxels, so it has no box")
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array(
        [
            [(lo, hi)[a][0], (lo, hi)[b][1], (lo, hi)[c][2]]
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ]
    )
    world = voxel_to_world(affine, corners)
    margin = np.broadcast_to(np.asarray(margin_mm, dtype=np.float64), (3,))[
        ::-1
    ]  # (z,y,x)->(x,y,z)
    return world.min(axis=0) - margin, world.max(axis=0) + margin
