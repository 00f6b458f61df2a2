"""Ground truth for body composition: vertebral levels and tissue areas at L3 (phantom only).

The phantom's spine is a list of vertebrae ``(centre z, height)`` in the body frame, cranial first
(:func:`pdacscreen.io.phantom.anatomy.draw_anatomy`); the first one whose centre lies below
:data:`~pdacscreen.io.phantom.render.LUMBAR_Z` is L1, the ones above it are thoracic (they carry
rib heads, :func:`pdacscreen.io.phantom.render._paint_spine`).  Areas are counted on the tissue map
at the voxel centres of the slice nearest the L3 centre: skeletal muscle (``T.MUSCLE``: abdominal
wall, psoas, paraspinal and quadratus lumborum muscles), visceral fat (``T.VFAT`` inside the body)
and subcutaneous fat (``T.SFAT``).
"""

from __future__ import annotations

import numpy as np

from pdacscreen.io.phantom.render import LUMBAR_Z
from pdacscreen.io.phantom.tissue import T

__all__ = ["level_truth", "lumbar_index"]


def lumbar_index(vertebrae: list[tuple[float, float]], level: int) -> int | None:
    """Index into ``vertebrae`` of lumbar vertebra ``level`` (1 = L1), or None if absent."""
    first = next((k for k, (zc, _) in enumerate(vertebrae) if zc < LUMBAR_Z), None)
    if first is None or first + level - 1 >= len(vertebrae):
        return None
    return first + level - 1


def level_truth(
    vertebrae: list[tuple[float, float]],
    tissue: np.ndarray,
    gz: np.ndarray,
    *,
    z_offset: float,
    pixel_area_mm2: float,
) -> dict:
    """Truth columns: ``l1_z_mm``, ``l3_z_mm`` (LPS z of the vertebral body centres), and at the
    slice nearest L3 ``l3_slice_z_mm`` and the three areas in cm2 (NaN when L3 is not scanned).

    ``tissue`` is the ``(z, y, x)`` tissue map on slice centres ``gz`` (body frame, mm);
    ``z_offset`` shifts body-frame z to patient LPS z.
    """
    out: dict = {}
    for level in (1, 3):
        k = lumbar_index(vertebrae, level)
        out[f"l{level}_z_mm"] = float(vertebrae[k][0] + z_offset) if k is not None else np.nan
    nan = {
        "l3_slice_z_mm": np.nan,
        "l3_skeletal_muscle_area_cm2": np.nan,
        "l3_visceral_fat_area_cm2": np.nan,
        "l3_subcutaneous_fat_area_cm2": np.nan,
    }
    k3 = lumbar_index(vertebrae, 3)
    if k3 is None:
        return out | nan
    z3 = vertebrae[k3][0]
    if not gz[0] <= z3 <= gz[-1]:
        return out | nan
    s = int(np.argmin(np.abs(gz - z3)))
    plane = tissue[s]
    cm2 = pixel_area_mm2 / 100.0
    out["l3_slice_z_mm"] = float(gz[s] + z_offset)
    out["l3_skeletal_muscle_area_cm2"] = round(float((plane == T.MUSCLE).sum() * cm2), 2)
    out["l3_visceral_fat_area_cm2"] = round(float((plane == T.VFAT).sum() * cm2), 2)
    out["l3_subcutaneous_fat_area_cm2"] = round(float((plane == T.SFAT).sum() * cm2), 2)
    return out
