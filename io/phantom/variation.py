"""Anatomy and appearance randomisation beyond the generator's own ranges (training only).

The generator's pancreas follows one template centreline (a few mm of jitter, size 1.0-1.3), its
organs carry the same smooth texture and its tissues a narrow HU table.  A localiser trained on
those learns the template, not the organ: on a second, deliberately different renderer
(``tests/second_renderer``) the shipped stage 1 boxed only a third of the gland.  A
:class:`Variation` widens what a training subject can look like, drawn from its own random stream
(:func:`pdacscreen.io.phantom.subject.make_subject` ``vary=True``) so that the subject without
variation is unchanged for its seed:

* pancreas pose and shape: a transform about the neck (scale along x 0.75-1.35 and y 0.8-1.25, in
  z 0.7-1.4; rotation about z +/-18 deg and about y +/-10 deg; shift +/-12 mm in x/y, +/-15 mm in
  z), an extra tail rise of -10..+30 mm, per-point jitter of 6 mm and a gland thickness factor of
  0.7-1.25; the duodenal C-loop, the portal confluence and the bile duct follow the head;
* habitus: subcutaneous fat 3-80 mm (the generator draws 10-45), muscle 5-16 mm;
* appearance: organ texture amplitude times 0-2 (0 = uniform organs), lobulation times 0-1.5,
  each tissue's HU shifted independently by +/-6 HU, all soft tissue by a global +/-10 HU
  (a rescale or calibration error), the noise grain 0.5-2.5 px.

Only geometry and attenuation parameters change; the label map, the truth and the d' tool are
computed from the varied anatomy exactly as for any subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Variation", "draw_variation"]


@dataclass(frozen=True)
class Variation:
    """One subject's randomisation (see module docstring); angles in degrees, lengths in mm."""

    pancreas_scale: tuple[float, float, float]  # (x, y, z) about the neck
    pancreas_rot_z_deg: float
    pancreas_rot_y_deg: float
    pancreas_shift_mm: tuple[float, float, float]
    tail_rise_mm: float
    point_jitter_mm: tuple[float, ...]  # (x, y, z) per centreline point, flattened
    thickness: float
    fat_mm: float
    muscle_mm: float
    texture_factor: float
    lobulation_factor: float
    tissue_offsets_hu: tuple[float, ...]  # one per tissue id
    global_offset_hu: float
    grain_px: float

    def warp(self, points: np.ndarray, neck: np.ndarray) -> np.ndarray:
        """Body-frame points ``(n, 3)`` moved by the pancreas pose transform about ``neck``."""
        p = np.asarray(points, float) - neck
        p = p * np.asarray(self.pancreas_scale)
        az, ay = np.radians(self.pancreas_rot_z_deg), np.radians(self.pancreas_rot_y_deg)
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        return p @ (rz @ ry).T + neck + np.asarray(self.pancreas_shift_mm)


def draw_variation(rng: np.random.Generator, n_tissues: int) -> Variation:
    """Draw one :class:`Variation` from ``rng`` (its own stream: the subject's others are untouched)."""
    u = rng.uniform
    texture = 0.0 if rng.random() < 0.25 else u(0.2, 2.0)
    return Variation(
        pancreas_scale=(u(0.75, 1.35), u(0.8, 1.25), u(0.7, 1.4)),
        pancreas_rot_z_deg=u(-18, 18),
        pancreas_rot_y_deg=u(-10, 10),
        pancreas_shift_mm=(u(-12, 12), u(-12, 12), u(-15, 15)),
        tail_rise_mm=u(-10, 30),
        point_jitter_mm=tuple(float(v) for v in rng.uniform(-6, 6, 3 * 9)),
        thickness=u(0.7, 1.25),
        fat_mm=float(np.exp(u(np.log(3.0), np.log(80.0)))),
        muscle_mm=u(5, 16),
        texture_factor=texture,
        lobulation_factor=u(0.0, 1.5),
        tissue_offsets_hu=tuple(float(v) for v in rng.uniform(-6, 6, n_tissues)),
        global_offset_hu=u(-10, 10),
        grain_px=u(0.5, 2.5),
    )
