"""Small synthetic CT series written with pydicom, for the ingest tests and benchmarks.

Deterministic: UIDs derive from the given names through a hash, pixel values from the geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def uid(*parts: object) -> str:
    # NB: generate_uid(prefix=None, ...) ignores entropy_srcs (random UUID); a prefix makes it
    # a deterministic hash of the parts.
    return generate_uid(prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=[str(p) for p in parts])


def phantom_slice(rows: int, cols: int, k: int, *, aorta_hu: float = 40.0) -> np.ndarray:
    """HU image of a simple abdomen: body ellipse (soft tissue 40), spine (cortex 800, cancellous
    250) at the back, an aorta disc anterior-left of the spine, outside = -1000; varies with k."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    img = np.full((rows, cols), -1000.0, np.float32)
    body = ((y - cy) / (0.38 * rows)) ** 2 + ((x - cx) / (0.45 * cols)) ** 2 <= 1
    img[body] = 40.0 + (k % 7)
    fat = body & (((y - cy) / (0.34 * rows)) ** 2 + ((x - cx) / (0.41 * cols)) ** 2 > 1)
    img[fat] = -100.0
    sy, sx, sr = cy + 0.2 * rows, cx, 0.07 * rows
    r2 = (y - sy) ** 2 + (x - sx) ** 2
    img[r2 <= sr**2] = 800.0
    img[r2 <= (0.75 * sr) ** 2] = 250.0
    # aorta: anterior (smaller row index) and patient-left (larger column index) of the spine
    ay, ax, ar = sy - 2.1 * sr, sx + 0.5 * sr, 0.045 * rows
    img[(y - ay) ** 2 + (x - ax) ** 2 <= ar**2] = aorta_hu
    # pancreas-ish blob that changes along z so slice order is visible
    img[
        (y - (cy - 0.05 * rows)) ** 2 + (x - cx + 0.1 * cols) ** 2 <= (0.03 * rows + k % 5) ** 2
    ] = 45
    return img


def write_series(
    out: Path,
    *,
    name: str = "s1",
    study: str = "study1",
    patient_id: str | None = "PAT-001",
    n: int = 12,
    rows: int = 64,
    cols: int = 64,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    positions: Sequence[float] | None = None,
    step: float = 2.5,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-25.0, -25.0, 100.0),
    step_vector: Sequence[float] | None = None,
    thickness: float = 2.5,
    transfer_syntax: str = ExplicitVRLittleEndian,
    description: str = "ABD NATIVE 2.5",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    contrast_agent: str | None = None,
    kernel: str = "STANDARD",
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding: int | None = None,
    aorta_hu: float = 40.0,
    image_fn: Callable[[int], np.ndarray] | None = None,
    shuffle_instance_numbers: bool = True,
    blank_uids: bool = False,
    manufacturer: str = "SYNTH",
    series_number: int = 3,
    sop_salt: str = "",
) -> list[Path]:
    """Write one CT series (one file per slice) under ``out``; returns the paths.

    Slice k sits at ``origin + positions[k] * step_vector`` (step_vector defaults to the normal
    of ``iop``; positions default to ``k * step``).  InstanceNumber is deliberately not in z order.
    """
    out.mkdir(parents=True, exist_ok=True)
    iop_a = np.asarray(iop, float)
    normal = np.cross(iop_a[:3], iop_a[3:])
    sv = normal if step_vector is None else np.asarray(step_vector, float)
    pos = list(positions) if positions is not None else [k * step for k in range(n)]
    n = len(pos)
    order = list(range(n))
    if shuffle_instance_numbers:
        order = order[::2] + order[1::2]
    study_uid, series_uid = uid("study", study), uid("series", study, name)
    paths = []
    for k, p in enumerate(pos):
        hu = (
            image_fn(k) if image_fn is not None else phantom_slice(rows, cols, k, aorta_hu=aorta_hu)
        )
        stored = np.round((hu - intercept) / slope)
        if padding is not None:
            outside = hu <= -1000
            stored[outside] = padding
        stored = stored.astype(np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = uid("sop", study, name, k, sop_salt)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = "" if blank_uids else uid("sop", study, name, k, sop_salt)
        ds.StudyInstanceUID = "" if blank_uids else study_uid
        ds.SeriesInstanceUID = "" if blank_uids else series_uid
        ds.FrameOfReferenceUID = uid("for", study)
        ds.Modality = "CT"
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = "SYNTH-1"
        if patient_id is not None:
            ds.PatientID = patient_id
        ds.PatientName = "Synthetic^Patient"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = order.index(k) + 1
        ds.ImageType = image_type.split("\\")
        ds.SeriesDescription = description
        if contrast_agent is not None:
            ds.ContrastBolusAgent = contrast_agent
        ds.BodyPartExamined = "ABDOMEN"
        ds.ConvolutionKernel = kernel
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [float(v) for v in iop_a]
        ds.ImagePositionPatient = [round(float(v), 6) for v in np.asarray(origin) + p * sv]
        ds.PixelSpacing = list(pixel_spacing)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if padding is not None:
            ds.PixelPaddingValue = padding
        ds.PixelData = stored.tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, stored, encoding_plugin="")
        path = out / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_hu(path: Path) -> np.ndarray:
    """Reference decode: pydicom pixel_array * slope + intercept (no padding handling)."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


PHANTOM_STUDIES = 4
PHANTOM_KEY = b"phantom-ingest-test-key-0123"


def phantom_archive(tmp_path_factory) -> tuple[Path, Path]:
    """(archive, index) of a small mixed-vendor, mixed-compression phantom archive, built once
    per test session (shared by the ingest test modules)."""
    from pdacscreen.io.index import update_index
    from pdacscreen.io.phantom.archive import generate_archive

    base = tmp_path_factory.getbasetemp() / "ingest-phantom"
    archive, index = base / "archive", base / "index"
    if not (archive / "truth.parquet").exists():
        generate_archive(
            archive, studies=PHANTOM_STUDIES, seed=11, matrix=128, compress="mixed", workers=1
        )
        update_index(archive / "dicom", index, key=PHANTOM_KEY, workers=1)
    return archive, index
