"""Sliding-window inference with Gaussian blending, independent of any engine.

Arrays are ``(C, z, y, x)`` (or ``(z, y, x)`` for a single channel) in voxels; patches are
``(pz, py, px)``.  The model is a plain callable ``predict(batch) -> outputs`` taking a
``(N, C, pz, py, px)`` float32 batch and returning either the ``(N, K, pz, py, px)`` segmentation
array or a dict holding it under ``"seg"`` plus per-window outputs (e.g. ``"cls"`` of shape
``(N, 1)``), which are reduced over windows by max (a lesion anywhere makes the study positive).

The pieces (:func:`plan_tiles`, :func:`pad_to_plan`, :func:`extract_patch`, :class:`Blender`) are
public so the detector can gather windows of several studies into one batch; memory is bounded by
the padded image, one accumulator and ``batch_size`` patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pdacscreen.engine.errors import EngineInputError

__all__ = [
    "TilePlan",
    "plan_tiles",
    "pad_to_plan",
    "extract_patch",
    "gaussian_importance",
    "Blender",
    "sliding_window",
]

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class TilePlan:
    """Where the windows of one image go.

    Attributes:
        image_shape: ``(z, y, x)`` of the image before padding.
        shape: ``(z, y, x)`` after padding (each axis at least the patch; padding at the end).
        patch: ``(pz, py, px)``.
        starts: the ``(z, y, x)`` start voxel of every window, in C order.
    """

    image_shape: Shape3
    shape: Shape3
    patch: Shape3
    starts: tuple[Shape3, ...]

    @property
    def count(self) -> int:
        return len(self.starts)


def _axis_starts(size: int, patch: int, step: float) -> list[int]:
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / step) + 1
    return [int(round(v)) for v in np.linspace(0, size - patch, n)]


def plan_tiles(
    image_shape: tuple[int, ...], *, patch: tuple[int, ...], overlap: float = 0.5
) -> TilePlan:
    """Plan windows of ``patch`` over ``image_shape`` (both ``(z, y, x)``) with ``overlap``.

    Windows are evenly spaced and the last one ends at the image border, as nnU-Net places them;
    an axis shorter than the patch is padded up to it.
    """
    if len(image_shape) != 3 or len(patch) != 3:
        raise EngineInputError(
            f"image_shape and patch must be (z, y, x), got {image_shape}, {patch}"
        )
    if min(patch) < 1 or min(image_shape) < 1:
        raise EngineInputError(f"sizes must be >= 1, got image_shape={image_shape}, patch={patch}")
    if not 0.0 <= overlap < 1.0:
        raise EngineInputError(f"overlap must be >= 0 and < 1, got {overlap}")
    shape = tuple(max(s, p) for s, p in zip(image_shape, patch, strict=True))
    per_axis = [_axis_starts(s, p, p * (1.0 - overlap)) for s, p in zip(shape, patch, strict=True)]
    starts = tuple((a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2])
    return TilePlan(tuple(image_shape), shape, tuple(patch), starts)  # type: ignore[arg-type]


def pad_to_plan(image: np.ndarray, plan: TilePlan, *, value: float = 0.0) -> np.ndarray:
    """Pad a ``(C, z, y, x)`` image at the end of each axis to ``plan.shape``."""
    pad = [(0, 0)] + [(0, t - s) for s, t in zip(image.shape[1:], plan.shape, strict=True)]
    if all(p == (0, 0) for p in pad):
        return image
    return np.pad(image, pad, mode="constant", constant_values=value)


def extract_patch(padded: np.ndarray, start: Shape3, patch: Shape3) -> np.ndarray:
    """The ``(C, pz, py, px)`` window of a padded ``(C, z, y, x)`` image at ``start``."""
    z, y, x = start
    return padded[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]


@lru_cache(maxsize=16)
def _gaussian(patch: Shape3, sigma_scale: float) -> np.ndarray:
    grids = []
    for p in patch:
        c = (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-3)
        grids.append(np.exp(-0.5 * ((np.arange(p) - c) / sigma) ** 2))
    w = grids[0][:, None, None] * grids[1][None, :, None] * grids[2][None, None, :]
    w = w / w.max()
    w = np.maximum(w, w[w > 0].min() if np.any(w > 0) else 1.0)
    w = np.maximum(w, 1e-4).astype(np.float32)
    w.setflags(write=False)
    return w


def gaussian_importance(patch: tuple[int, int, int], *, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weight ``(pz, py, px)``, peak 1 at the centre, floored at 1e-4 (never zero)."""
    return _gaussian(tuple(int(p) for p in patch), float(sigma_scale))


class Blender:
    """Accumulates Gaussian-weighted window outputs into one ``(K, z, y, x)`` map."""

    def __init__(self, plan: TilePlan, channels: int, *, sigma_scale: float = 0.125) -> None:
        self.plan = plan
        self.weight_patch = gaussian_importance(plan.patch, sigma_scale=sigma_scale)
        self.accum = np.zeros((channels, *plan.shape), dtype=np.float32)
        self.weights = np.zeros(plan.shape, dtype=np.float32)

    def add(self, start: Shape3, window: np.ndarray) -> None:
        """Add one ``(K, pz, py, px)`` window output at ``start``."""
        z, y, x = start
        pz, py, px = self.plan.patch
        region = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
        self.accum[(slice(None), *region)] += window * self.weight_patch
        self.weights[region] += self.weight_patch

    def result(self) -> np.ndarray:
        """The blended ``(K, z, y, x)`` map cropped to the unpadded image shape."""
        out = self.accum / self.weights
        z, y, x = self.plan.image_shape
        return out[:, :z, :y, :x]


def sliding_window(
    image: np.ndarray,
    *,
    patch: tuple[int, int, int],
    predict: Callable[[np.ndarray], np.ndarray | dict],
    overlap: float = 0.5,
    batch_size: int = 4,
    pad_value: float = 0.0,
    sigma_scale: float = 0.125,
) -> dict[str, np.ndarray]:
    """Run ``predict`` over ``image`` window by window and blend.

    Args:
        image: ``(C, z, y, x)`` or ``(z, y, x)`` model input.
        patch: window ``(pz, py, px)``.
        predict: callable on ``(N, C, pz, py, px)`` float32 batches (see module docstring).
        overlap: fraction of the patch shared by neighbouring windows, in [0, 1).
        batch_size: windows per ``predict`` call (bounds memory).
        pad_value: value of the padding where the image is smaller than the patch.

    Returns:
        ``{"seg": (K, z, y, x) blended output, <other key>: max over windows, ...,
        "windows": number of windows}``.
    """
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise EngineInputError(f"image must be (C, z, y, x) or (z, y, x), got shape {image.shape}")
    if batch_size < 1:
        raise EngineInputError(f"batch_size must be >= 1, got {batch_size}")
    plan = plan_tiles(image.shape[1:], patch=patch, overlap=overlap)
    padded = pad_to_plan(np.asarray(image, dtype=np.float32), plan, value=pad_value)
    blender: Blender | None = None
    extras: dict[str, np.ndarray] = {}
    for i in range(0, plan.count, batch_size):
        starts = plan.starts[i : i + batch_size]
        batch = np.stack([extract_patch(padded, s, plan.patch) for s in starts])
        out = predict(np.ascontiguousarray(batch))
        out = {"seg": out} if not isinstance(out, dict) else out
        seg = np.asarray(out["seg"], dtype=np.float32)
        if blender is None:
            blender = Blender(plan, seg.shape[1], sigma_scale=sigma_scale)
        for s, window in zip(starts, seg, strict=True):
            blender.add(s, window)
        for key, value in out.items():
            if key == "seg":
                continue
            m = np.asarray(value, dtype=np.float32).max(axis=0)
            extras[key] = m if key not in extras else np.maximum(extras[key], m)
    if blender is None:  # unreachable: a plan always has at least one window
        raise EngineInputError(f"no windows planned for image shape {image.shape}")
    return {"seg": blender.result(), **extras, "windows": np.asarray(plan.count)}
