"""Evidence a radiologist can open: pancreas/lesion masks (NIfTI, series grid) and a key image.

``write_evidence(result, volume, out_dir)`` writes

* ``pancreas_mask.nii.gz`` and ``lesion_mask.nii.gz``: uint8 masks in the series' own grid
  (shape and affine of the series, via :func:`pdacscreen.io.types.nifti_affine`; data stored
  ``(x, y, z)`` as NIfTI expects), resampled from the stage-2 crop by nearest neighbour;
* ``key.png``: the axial slice through the largest lesion (else the pancreas centre), window
  W400/L40, lesion probability as a red overlay, pancreas outline in green, and a caption;
* ``bodycomp.png`` (:func:`write_bodycomp_image`, when body composition was measured): the L3
  slice with the skeletal muscle (red), visceral fat (yellow) and subcutaneous fat (cyan) masks
  and their areas.

Outputs are deterministic (no timestamps; same inputs give the same bytes).

For DICOM results (SEG, SR: :mod:`pdacscreen.io.dicom.export`) the masks go onto the SOURCE
series' own slices instead: :func:`masks_on_slices` samples the stage-2 crop masks at every pixel
centre of every source slice (its own ImagePositionPatient, so a series that ``load_series``
resampled for uneven spacing maps back exactly), nearest neighbour; :func:`lesion_components`
splits the lesion mask into the engine's candidates (same 26-connected components, same order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pdacscreen.engine.errors import EngineError
from pdacscreen.engine.inference import StudyResult
from pdacscreen.engine.postprocess import Lesion, lesion_candidates
from pdacscreen.io.nifti import write_labels
from pdacscreen.io.types import CTVolume, world_to_voxel

__all__ = [
    "SliceGeometry",
    "lesion_components",
    "masks_in_series_grid",
    "masks_on_slices",
    "sample_nearest",
    "write_evidence",
]

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


@dataclass(frozen=True)
class SliceGeometry:
    """The slices of a source series, in mask order (ascending position along the normal).

    ``positions``: ``(n, 3)`` ImagePositionPatient of each slice (LPS mm, centre of its first
    pixel); ``row_dir`` / ``col_dir``: ImageOrientationPatient[:3] / [3:] (unit vectors along a
    row / down a column); ``pixel_spacing``: PixelSpacing ``(between rows, between columns)`` mm;
    ``rows``, ``columns``: the matrix.  Plain values: built from the headers by the caller.
    """

    positions: np.ndarray
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    def __post_init__(self) -> None:
        pos = np.asarray(self.positions, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) == 0:
            raise EngineError(f"positions must be (n, 3) with n >= 1, got shape {pos.shape}")
        if min(self.pixel_spacing) <= 0 or self.rows < 1 or self.columns < 1:
            raise EngineError(
                f"pixel_spacing {self.pixel_spacing} must be > 0 and rows/columns "
                f"({self.rows}, {self.columns}) >= 1"
            )
        object.__setattr__(self, "positions", pos)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.positions), int(self.rows), int(self.columns))


def sample_nearest(src: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Values of ``src`` (grid ``affine``: index (k, j, i) -> LPS mm) at the LPS points ``world``
    ``(..., 3)``: the voxel whose centre is nearest (index ``floor(c + 0.5)``, ties to the higher
    index); 0 outside the grid."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    idx = world @ inv[:3, :3].T + inv[:3, 3]
    idx = np.floor(idx + 0.5).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(src.shape)), axis=-1)
    out = np.zeros(world.shape[:-1], dtype=src.dtype)
    k = idx[inside]
    out[inside] = src[k[:, 0], k[:, 1], k[:, 2]]
    return out


def masks_on_slices(
    masks: Sequence[np.ndarray], affine: np.ndarray, geometry: SliceGeometry
) -> list[np.ndarray]:
    """``masks`` (uint8, one grid: the stage-2 crop, ``affine``) on the source slices.

    Each output is uint8 ``(n, rows, columns)``, plane ``k`` the mask sampled (nearest neighbour,
    :func:`sample_nearest`) at the pixel centres ``positions[k] + j * dy * col_dir + i * dx *
    row_dir`` of slice ``k``: the slice's true position, whatever grid the engine resampled to.
    Only the slices and the in-plane box the crop reaches are sampled.
    """
    n, rows, cols = geometry.shape
    out = [np.zeros((n, rows, cols), dtype=np.uint8) for _ in masks]
    if not masks:
        return out
    shape = np.asarray(masks[0].shape, float)
    if any(m.shape != masks[0].shape for m in masks):
        raise EngineError(f"masks must share one grid, got shapes {[m.shape for m in masks]}")
    dy, dx = geometry.pixel_spacing
    r, c = np.asarray(geometry.row_dir, float), np.asarray(geometry.col_dir, float)
    normal = np.cross(r, c)
    normal /= np.linalg.norm(normal)
    basis = np.stack([c * dy, r * dx, normal], axis=1)  # (j, i, t) -> LPS offset
    corners = np.array(
        [
            [a, b, d]
            for a in (-0.5, shape[0] - 0.5)
            for b in (-0.5, shape[1] - 0.5)
            for d in (-0.5, shape[2] - 0.5)
        ]
    )
    world_corners = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    jj, ii = np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64)
    for k, p in enumerate(geometry.positions):
        jit = np.linalg.solve(basis, (world_corners - p).T).T  # corners in (j, i, t) of slice k
        if not (jit[:, 2].min() <= 0.0 <= jit[:, 2].max()):
            continue  # the crop does not reach this slice's plane
        j0 = int(np.clip(np.floor(jit[:, 0].min()) - 1, 0, rows))
        j1 = int(np.clip(np.ceil(jit[:, 0].max()) + 2, 0, rows))
        i0 = int(np.clip(np.floor(jit[:, 1].min()) - 1, 0, cols))
        i1 = int(np.clip(np.ceil(jit[:, 1].max()) + 2, 0, cols))
        if j0 >= j1 or i0 >= i1:
            continue
        world = p + jj[j0:j1, None, None] * (c * dy) + ii[None, i0:i1, None] * (r * dx)
        for m, o in zip(masks, out, strict=True):
            o[k, j0:j1, i0:i1] = sample_nearest(np.asarray(m, np.uint8), affine, world)
    return out


def lesion_components(result: StudyResult) -> tuple[list[Lesion], np.ndarray]:
    """The engine's lesion candidates, largest first, and their int32 label image (crop grid).

    The lesion mask is the union of the kept candidates, which are 26-connected components that
    touch no other; labelling it again with the engine's own function gives the same components
    in the same order, with the same measurements (volume, diameter, centre, head/body/tail).
    """
    masks = result.masks
    if masks is None or not masks.lesion.any():
        shape = masks.lesion.shape if masks is not None else (0, 0, 0)
        return [], np.zeros(shape, dtype=np.int32)
    lesions, labels = lesion_candidates(
        masks.lesion.astype(np.float32),
        masks.pancreas.astype(bool),
        masks.affine,
        threshold=0.5,
        min_ml=0.0,
        return_labels=True,
    )
    return lesions, np.asarray(labels, dtype=np.int32)


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


#: overlay colours of the body-composition image: muscle, visceral fat, subcutaneous fat
BODYCOMP_COLOURS = ((230.0, 40.0, 40.0), (240.0, 220.0, 40.0), (40.0, 200.0, 230.0))


def write_bodycomp_image(volume: CTVolume, bc, out_dir: Path) -> Path:
    """``bodycomp.png``: the measured L3 slice (W400/L40) with the muscle, visceral and
    subcutaneous fat masks of ``bc`` (a :class:`pdacscreen.kernels.bodycomp.BodyComposition`) at
    50% opacity and a caption with the areas. Deterministic bytes; returns the file's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k = int(np.clip(bc.slice_index, 0, volume.shape[0] - 1))
    level, width = WINDOW
    hu = np.asarray(volume.array[k], dtype=np.float32)
    rgb = np.repeat(
        (np.clip((hu - (level - width / 2)) / width, 0.0, 1.0) * 255.0)[..., None], 3, 2
    )
    for mask, colour in zip(
        (bc.muscle, bc.visceral_fat, bc.subcutaneous_fat), BODYCOMP_COLOURS, strict=True
    ):
        m = np.asarray(mask, dtype=bool)
        rgb[m] = rgb[m] * 0.5 + np.array(colour) * 0.5
    image = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    if max(image.size) < 512:
        f = int(np.ceil(512 / max(image.size)))
        image = image.resize((image.width * f, image.height * f), Image.NEAREST)
    text = (
        f"L3 slice z={bc.z_mm:.1f} mm   muscle (red) {bc.skeletal_muscle_area_cm2:.1f} cm2, "
        f"{bc.muscle_mean_hu:.0f} HU   visceral fat (yellow) {bc.visceral_fat_area_cm2:.1f} cm2"
        f"   subcutaneous fat (cyan) {bc.subcutaneous_fat_area_cm2:.1f} cm2\n"
        "pdacscreen body composition (HU thresholds -29..150 / -190..-30); research use, "
        "not a clinical device" + (f"; QC: {bc.qc}" if bc.qc else "")
    )
    canvas = Image.new("RGB", (max(image.width, 760), image.height + 38), (0, 0, 0))
    canvas.paste(image, (0, 0))
    ImageDraw.Draw(canvas).multiline_text((6, image.height + 5), text, fill=(255, 255, 255))
    path = out_dir / "bodycomp.png"
    try:
        canvas.save(path, format="PNG", optimize=False)
    except OSError as e:
        raise EngineError(
            f"could not write body composition image in {out_dir}: {e}",
            code="evidence_write_failed",
        ) from e
    return path
