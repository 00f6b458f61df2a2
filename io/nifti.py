"""Write a :class:`CTVolume` or a label array as NIfTI-1 with nibabel (and read one back).

pdacscreen arrays are ``(z, y, x)`` with an affine from index ``(k, j, i)`` to LPS mm; NIfTI wants
``(x, y, z)`` data with an affine from ``(i, j, k)`` to RAS mm.  :func:`write_nifti` transposes the
data and converts the affine with :func:`pdacscreen.io.types.nifti_affine`; the affine goes into
the sform (code 1, scanner) and qform (nibabel keeps the closest rigid part of a sheared affine,
e.g. for a gantry-tilted series, so readers should prefer the sform).

Output is deterministic: the same array and affine give the same bytes (``.nii.gz`` is written
with a zero gzip timestamp and no file name), so evidence written twice is byte-identical.
"""

from __future__ import annotations

import gzip
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np

from pdacscreen.io.errors import InputError
from pdacscreen.io.types import CTVolume, nifti_affine

__all__ = ["read_nifti", "write_labels", "write_nifti"]


def _write(data_zyx: np.ndarray, affine: np.ndarray, out: Path, *, dtype: np.dtype) -> Path:
    out = Path(out)
    if not (out.name.endswith(".nii") or out.name.endswith(".nii.gz")):
        raise InputError(f"out={str(out)!r} must end with .nii or .nii.gz")
    if data_zyx.ndim != 3:
        raise InputError(f"array must be 3-D (z, y, x), got shape {data_zyx.shape}")
    aff = nifti_affine(affine)
    img = nib.Nifti1Image(np.ascontiguousarray(data_zyx.transpose(2, 1, 0)).astype(dtype), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = BytesIO()
    img.to_file_map(nib.Nifti1Image.make_file_map({"image": raw, "header": raw}))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        if out.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(raw.getvalue())
        else:
            f.write(raw.getvalue())
    return out


def write_nifti(volume: CTVolume, out: Path, *, dtype: str = "float32") -> Path:
    """Write ``volume`` (HU) to ``out`` (.nii or .nii.gz); ``dtype`` "float32" or "int16"."""
    if dtype not in ("float32", "int16"):
        raise InputError(f"dtype={dtype!r} is not allowed; use 'float32' or 'int16'")
    data = volume.array if dtype == "float32" else np.rint(volume.array)
    return _write(data, volume.affine, out, dtype=np.dtype(dtype))


def write_labels(labels: np.ndarray, affine: np.ndarray, out: Path) -> Path:
    """Write an integer label array ``(z, y, x)`` with a pdacscreen affine (k, j, i -> LPS)."""
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise InputError(f"labels must be an integer or bool array, got {labels.dtype}")
    dtype = np.uint8 if labels.size == 0 or int(labels.max()) < 256 else np.int32
    return _write(labels, affine, out, dtype=np.dtype(dtype))


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as ``(array (z, y, x), pdacscreen affine (k, j, i) -> LPS)``."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).transpose(2, 1, 0)
    aff_ras = img.affine
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff_ras @ perm
