"""The two single-image series a phantom study may hold besides the axial series.

* :func:`localizer`: an AP projection radiograph of the non-contrast volume (CT Image Storage,
  ImageType ORIGINAL/PRIMARY/LOCALIZER, coronal orientation, first row at the head).
* :func:`secondary_capture`: an 8-bit screen save of a portal-venous slice with burnt-in
  annotation (Secondary Capture Image Storage, no geometry), like a dose report or key image.

Both take the study's ``common`` header list and return ``(dataset, pixel array)``.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage
from scipy import ndimage

__all__ = ["localizer", "secondary_capture"]


def _ds(v: float) -> str:
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


def localizer(ctx, common, sub, *, series_uid, number, desc, time):
    nc = sub.noncontrast
    dz, dy, dx = sub.spacing
    proj = (np.clip(nc, -1000, 3000) + 1000.0).sum(axis=1) * dy / 1000.0  # (z, x) water-mm
    proj = proj[::-1]  # first row = head
    rows = int(min(512, max(64, round(nc.shape[0] * dz / dx))))
    img = ndimage.zoom(proj, (rows / proj.shape[0], 1.0), order=1)
    img = np.clip(img / max(float(img.max()), 1e-6) * 3000.0, 0, 4095).astype(np.uint16)
    org = sub.affine[:3, 3]
    ds = Dataset()
    for kw, val in common:
        setattr(ds, kw, val)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ctx.uid(series_uid, 0)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, desc
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.InstanceNumber = 1
    top = org[2] + (nc.shape[0] - 1) * dz
    ds.ImagePositionPatient = [_ds(org[0]), _ds(org[1] + dy * nc.shape[1] / 2), _ds(top)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.PixelSpacing = [_ds(nc.shape[0] * dz / rows), _ds(dx)]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    return ds, img


def secondary_capture(ctx, common, sub, *, series_uid, number, desc, time):
    pv = sub.contrast
    k = int(np.argmax((sub.labels >= 1).sum(axis=(1, 2))))
    img = np.clip((pv[k] + 160.0) / 400.0 * 255.0, 0, 255).astype(np.uint8)
    img[4:14, 4 : img.shape[1] // 2] = 255  # burnt-in annotation
    img[18:26, 4 : img.shape[1] // 3] = 200
    ds = Dataset()
    for kw, val in common:
        if kw not in (
            "FrameOfReferenceUID",
            "PositionReferenceIndicator",
            "PatientPosition",
            "KVP",
        ):
            setattr(ds, kw, val)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ctx.uid(series_uid, 0)
    ds.Modality = "CT" if ctx.rng.random() < 0.5 else "OT"
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, desc
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.SeriesDate = ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.ContentTime = time
    ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds, img
