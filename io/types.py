"""The typed boundary between ingest, kernels and engine: one CT volume in Hounsfield units.

Conventions (used everywhere in pdacscreen):

* ``array`` axis order is ``(z, y, x)`` = (slice, row, column), values in HU (float32 or int16).
* ``spacing`` is ``(dz, dy, dx)`` in mm, matching the array axes. ``dz`` is the distance between
  slice centres along the slice normal (not SliceThickness).
* ``affine`` is a 4x4 matrix mapping an index vector in array order ``(k, j, i, 1)`` to a point in
  patient LPS coordinates ``(x, y, z, 1)`` in mm (DICOM's patient coordinate system).  Column ``c``
  of ``affine[:3, :3]`` is the direction of array axis ``c`` scaled by that axis' spacing; column 3 is
  the centre of voxel ``(0, 0, 0)``.  :func:`nifti_affine` converts to NIfTI's RAS, ``(i, j, k)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CTVolume", "affine_from_geometry", "nifti_affine", "voxel_to_world", "world_to_voxel"]


@dataclass(frozen=True)
class CTVolume:
    """One CT series as a 3-D volume.

    Attributes:
        array: ``(z, y, x)`` voxel values in HU (padding and out-of-field voxels set to -1024).
        spacing: ``(dz, dy, dx)`` in mm.
        affine: 4x4, array index ``(k, j, i, 1)`` -> patient LPS mm (see module docstring).
        study_instance_uid / series_instance_uid: identifiers (possibly derived, see ``flags``).
        patient_key: pseudonymous keyed hash of PatientID (never the ID itself).
        flags: what ingest noticed and handled (e.g. ``"gantry_tilt"``, ``"uneven_spacing"``).
        provenance: free-form facts about the source (manufacturer, kernel, transfer syntaxes,
            number of files, slice thickness ...). JSON-serialisable values only.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_key: str = ""
    flags: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"CTVolume.array must be 3-D (z, y, x), got shape {self.array.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"CTVolume.affine must be 4x4, got shape {aff.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(
                f"CTVolume.spacing must be three positive mm values, got {self.spacing}"
            )
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def affine_from_geometry(
    *,
    origin: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    slice_dir: np.ndarray,
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """Affine for array order (k, j, i) from DICOM geometry.

    ``row_dir`` is ImageOrientationPatient[:3] (direction along a row, i.e. increasing column i),
    ``col_dir`` is ImageOrientationPatient[3:] (increasing row j); ``slice_dir`` is the unit step
    between slices (the normal for an untilted series); ``origin`` is ImagePositionPatient of slice 0.
    """
    dz, dy, dx = spacing
    aff = np.eye(4)
    aff[:3, 0] = np.asarray(slice_dir, float) * dz
    aff[:3, 1] = np.asarray(col_dir, float) * dy
    aff[:3, 2] = np.asarray(row_dir, float) * dx
    aff[:3, 3] = np.asarray(origin, float)
    return aff


def voxel_to_world(affine: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """Index points ``(..., 3)`` in (k, j, i) order -> LPS mm ``(..., 3)``."""
    kji = np.asarray(kji, dtype=np.float64)
    return kji @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """LPS mm points ``(..., 3)`` -> fractional index (k, j, i)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    inv = np.linalg.inv(affine)
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def nifti_affine(affine: np.ndarray) -> np.ndarray:
    """Convert a pdacscreen affine (index k, j, i -> LPS) to NIfTI's (index i, j, k -> RAS).

    Use with ``array.transpose(2, 1, 0)`` (x, y, z order) when writing NIfTI.
    """
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0  # (i, j, k) -> (k, j, i)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    return lps_to_ras @ np.asarray(affine, float) @ perm
