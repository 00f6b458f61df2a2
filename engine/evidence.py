"""Evidence a radiologist can open: pancreas/lesion masks (NIfTI, series grid) and a key image.

``write_evidence(result, volume, out_dir)`` writes

* ``pancreas_mask.nii.gz`` and ``lesion_mask.nii.gz``: uint8 masks in the series' own grid
  (shape and affine of the series, via :func:`pdacscreen.io.types.nifti_affine`; data stored
  ``(x, y, z)`` as NIfTI expects), resampled from the stage-2 crop by nearest neighbour;
* ``key.png``: the axial slice through the largest lesion (else the pancreas centre), window
  W400/L40, lesion probability as a red overlay, pancreas outline in green, and a caption.

Outputs are deterministic (no timestamps; same inputs give the same bytes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pdacscreen.engine.errors import EngineError
from pdacscreen.engine.inference import StudyResult
from pdacscreen.io.nifti import write_labels
from pdacscreen.io.types import CTVolume, world_to_voxel

__all__ = ["write_evidence", "masks_in_series_grid"]

WINDOW = (40.0, 400.0)  # level, width (HU)


def _series_box(
    volume: CTVolume, crop_shape: tuple[int, ...], crop_affine: np.ndarray
) -> tuple[slice, ...]:
    """Index box of the series covering the crop (its 8 corners mapped into series indices)."""
    n = np.array(crop_shape, float)
    corners = np.array(
        [
            [a, b, c]
            for a in (-0.5, n[0] - 0.5)
            for b in (-0.5, n[1] - 0.5)
            for c in (-0.5, n[2] - 0.5)
        ]
    )
    world = corners @ crop_affine[:3, :3].T + crop_affine[:3, 3]
    idx = world_to_voxel(volume.affine, world)
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, np.array(volume.shape))
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, np.array(volume.shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _to_series(
    src: np.ndarray, crop_affine: np.ndarray, volume: CTVolume, box, *, order: int
) -> np.ndarray:
    """Resample ``src`` (crop grid) onto the series sub-box ``box`` (indices -> indices)."""
    m = np.linalg.inv(crop_affine) @ volume.affine  # series index -> crop index
    start = np.array([s.start for s in box], float)
    shape = tuple(s.stop - s.start for s in box)
    if min(shape) <= 0:
        return np.zeros(shape, dtype=src.dtype)
    offset = m[:3, :3] @ start + m[:3, 3]
    return ndimage.affine_transform(
        src, m[:3, :3], offset=offset, output_shape=shape, order=order, mode="constant", cval=0
    )


def masks_in_series_grid(result: StudyResult, volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """(pancreas, lesion) uint8 masks ``(z, y, x)`` with the series' shape."""
    pancreas = np.zeros(volume.shape, np.uint8)
    lesion = np.zeros(volume.shape, np.uint8)
    masks = result.masks
    if masks is None:
        return pancreas, lesion
    box = _series_box(volume, masks.pancreas.shape, masks.affine)
    pancreas[box] = _to_series(masks.pancreas, masks.affine, volume, box, order=0)
    lesion[box] = _to_series(masks.lesion, masks.affine, volume, box, order=0)
    return pancreas, lesion


def _caption(result: StudyResult, package_label: str, k: int) -> str:
    flag = "FLAGGED" if result.pdac_flag else "not flagged"
    p = "n/a" if np.isnan(result.pdac_probability) else f"{result.pdac_probability:.3f}"
    parts = [f"PDAC probability {p} (threshold {result.operating_threshold:.3f}) {flag}"]
    if result.lesion_count:
        parts.append(
            f"largest lesion {result.lesion_diameter_mm:.0f} mm, {result.lesion_volume_ml:.2f} ml, "
            f"{result.lesion_location or 'location n/a'}; {result.lesion_count} candidate(s)"
        )
    else:
        parts.append("no lesion candidate")
    qc = ", ".join(result.qc_flags) or "none"
    parts.append(f"axial slice {k}, W400/L40 | QC: {qc} | {package_label}")
    parts.append("Research software, not for clinical use.")
    return "\n".join(parts)


def write_evidence(
    result: StudyResult, volume: CTVolume, out_dir: Path, *, package_label: str | None = None
) -> Path:
    """Write the masks and the key image for one study into ``out_dir``; returns ``out_dir``.

    ``package_label`` (caption) defaults to the model name and version the result came from.
    """
    package_label = package_label or str(result.diagnostics.get("model", "pdacscreen"))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pancreas, lesion = masks_in_series_grid(result, volume)
    write_labels(pancreas, volume.affine, out_dir / "pancreas_mask.nii.gz")
    write_labels(lesion, volume.affine, out_dir / "lesion_mask.nii.gz")

    masks = result.masks
    if masks is not None:
        k = int(round(world_to_voxel(volume.affine, np.asarray(masks.focus_mm))[0]))
    else:
        k = volume.shape[0] // 2
    k = int(np.clip(k, 0, volume.shape[0] - 1))
    hu = np.asarray(volume.array[k], dtype=np.float32)
    level, width = WINDOW
    gray = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
    rgb = np.repeat((gray * 255.0)[..., None], 3, axis=2)
    if masks is not None:
        box = (slice(k, k + 1), slice(0, volume.shape[1]), slice(0, volume.shape[2]))
        prob = _to_series(masks.lesion_prob.astype(np.float32), masks.affine, volume, box, order=1)[
            0
        ]
        alpha = np.clip(prob, 0.0, 1.0)[..., None] * 0.6
        rgb = rgb * (1 - alpha) + np.array([255.0, 0.0, 0.0]) * alpha
        organ = pancreas[k].astype(bool)
        edge = organ & ~ndimage.binary_erosion(organ)
        rgb[edge] = (0.0, 255.0, 0.0)
    image = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    if max(image.size) < 512:  # small phantoms: enlarge so the caption and detail stay legible
        s = int(np.ceil(512 / max(image.size)))
        image = image.resize((image.width * s, image.height * s), Image.NEAREST)
    text = _caption(result, package_label, k)
    lines = text.count("\n") + 1
    canvas = Image.new("RGB", (max(image.width, 640), image.height + 14 * lines + 10), (0, 0, 0))
    canvas.paste(image, (0, 0))
    ImageDraw.Draw(canvas).multiline_text(
        (6, image.height + 5), text, fill=(255, 255, 255), spacing=2
    )
    try:
        canvas.save(out_dir / "key.png", format="PNG", optimize=False)
    except OSError as e:
        raise EngineError(
            f"could not write key image in {out_dir}: {e}", code="evidence_write_failed"
        ) from e
    return out_dir
