"""Plant patient identifiers in a phantom archive, to prove that no output carries them.

:func:`plant_phi` rewrites every DICOM file of a phantom archive (``OUT/dicom``) so that each study
carries distinctive, synthetic identifier strings in every place real archives leak them:

* the patient and study modules: PatientName, PatientID, OtherPatientIDs, PatientBirthDate,
  AccessionNumber, InstitutionName, ReferringPhysicianName, OperatorsName;
* free text: StudyDescription, SeriesDescription and ImageComments (the planted text is appended to
  the existing descriptions, so that series selection still sees its keywords);
* RequestAttributesSequence items (RequestedProcedureID, ScheduledProcedureStepID,
  RequestedProcedureDescription);
* a private tag (group 0x0011, private creator ``PDACSCREEN PHI``);
* burned-in text in the pixels of an extra secondary capture per study (Secondary Capture Image
  Storage, uncompressed). Burned-in text is pixels: no byte-wise or text search can find it, which
  is why pdacscreen never copies secondary captures to any output.

``plant_phi(..., folder_names=True)`` also renames each study folder after the patient, as real PACS
exports do (``DOE^JOHN_12345/``), so that the paths of files in the index and in ``failures`` rows
hold a name.

The planted values are written to ``OUT/phi.parquet`` (one row per study and field) and replace the
``patient_id`` column of ``OUT/truth.parquet``; the PHI test searches every output for them.
Everything derives from ``(seed, study index)``: planting twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from pdacscreen.io.errors import InputError

__all__ = ["PHI_FIELDS", "PRIVATE_CREATOR", "phi_values", "plant_phi", "burn_text"]

log = logging.getLogger(__name__)

PRIVATE_CREATOR = "PDACSCREEN PHI"
#: field -> where it goes (the DICOM keyword, or a description of the place)
PHI_FIELDS: dict[str, str] = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "other_patient_id": "OtherPatientIDs",
    "birth_date": "PatientBirthDate",
    "accession_number": "AccessionNumber",
    "institution": "InstitutionName",
    "referring_physician": "ReferringPhysicianName",
    "operator": "OperatorsName",
    "study_description": "StudyDescription (appended)",
    "series_description": "SeriesDescription (appended)",
    "image_comments": "ImageComments",
    "request_procedure_id": "RequestAttributesSequence[0].RequestedProcedureID",
    "request_description": "RequestAttributesSequence[0].RequestedProcedureDescription",
    "private_tag": f"(0011,xx10) LO, private creator {PRIVATE_CREATOR!r}",
    "burned_in": "pixels of an extra secondary capture (not searchable as bytes)",
}
_SURNAMES = ("QUIXBY", "ZEPHYRO", "VANTRELL", "MORDWICK", "XALVENE", "BRUNQUIST", "OKKERVAL")
_GIVEN = ("OPHELIA", "THADDEUS", "WILHELMINA", "CASIMIR", "PERPETUA", "EVANDER", "LUCRETIA")


def phi_values(seed: int, index: int) -> dict[str, str]:
    """The synthetic identifiers planted in study ``index`` of an archive made with ``seed``.

    Each is distinctive (no output can contain it by chance) and unique per study.
    """
    h = hashlib.sha256(f"pdacscreen-phi/{seed}/{index}".encode()).hexdigest()
    n = int(h[:8], 16)
    sur, given = _SURNAMES[n % len(_SURNAMES)], _GIVEN[(n // 7) % len(_GIVEN)]
    tag = f"{index:03d}{h[8:12].upper()}"
    year, month, day = 1920 + n % 60, 1 + (n // 60) % 12, 1 + (n // 720) % 28
    return {
        "patient_name": f"{sur}{tag}^{given}",
        "patient_id": f"MRN{tag}77",
        "other_patient_id": f"OTHID{tag}X",
        "birth_date": f"{year:04d}{month:02d}{day:02d}",
        "accession_number": f"ACC{tag}Q",
        "institution": f"SAINT {sur} CLINIC {tag}",
        "referring_physician": f"REFDOC{tag}^HARLAN",
        "operator": f"TECHOP{tag}^MINA",
        "study_description": f"STUDYNOTE {sur} {tag}",
        "series_description": f"SERNOTE{tag}",
        "image_comments": f"CALL {given} {sur} AT 555{tag}",
        "request_procedure_id": f"RPID{tag}",
        "request_description": f"REQDESC {sur} {tag}",
        "private_tag": f"PRIVPHI{tag}",
        "burned_in": f"{sur}{tag}",
    }


def burn_text(img: np.ndarray, text: str, *, value: int = 255) -> np.ndarray:
    """``img`` (2-D uint8) with ``text`` drawn into its top-left corner (PIL's default font)."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((4, 4), text, fill=int(value))
    return np.asarray(pil).copy()


def _plant(ds: Dataset, v: dict[str, str]) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = v["patient_name"]
    ds.PatientID = v["patient_id"]
    ds.OtherPatientIDs = v["other_patient_id"]
    ds.PatientBirthDate = v["birth_date"]
    ds.AccessionNumber = v["accession_number"]
    ds.InstitutionName = v["institution"]
    ds.ReferringPhysicianName = v["referring_physician"]
    ds.OperatorsName = v["operator"]
    for kw, f in (
        ("StudyDescription", "study_description"),
        ("SeriesDescription", "series_description"),
    ):
        text = str(ds.get(kw, ""))
        if v[f] not in text:  # planting twice changes nothing
            setattr(ds, kw, f"{text} {v[f]}".strip())
    ds.ImageComments = v["image_comments"]
    item = Dataset()
    item.RequestedProcedureID = v["request_procedure_id"]
    item.ScheduledProcedureStepID = v["request_procedure_id"] + "S"
    item.RequestedProcedureDescription = v["request_description"]
    ds.RequestAttributesSequence = [item]
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", v["private_tag"])


def _burned_in_capture(template: Dataset, v: dict[str, str], *, seed: int, index: int) -> Dataset:
    """A secondary capture of the study with the patient's name burned into its pixels."""
    img = np.full((128, 256), 16, dtype=np.uint8)
    img = burn_text(img, v["burned_in"])
    img = burn_text(img[::-1].copy(), v["patient_name"])[::-1].copy()
    ds = Dataset()
    for kw in (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "Manufacturer",
        "PatientSex",
    ):
        if kw in template:
            setattr(ds, kw, template.data_element(kw).value)
    entropy = [f"pdacscreen-phi/{seed}/{index}"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.SeriesInstanceUID = str(generate_uid(entropy_srcs=[*entropy, "series"]))
    ds.SOPInstanceUID = str(generate_uid(entropy_srcs=[*entropy, "sop"]))
    ds.Modality, ds.ConversionType, ds.BurnedInAnnotation = "OT", "WSD", "YES"
    ds.SeriesNumber, ds.InstanceNumber = 998, 1
    ds.SeriesDescription = "SCREEN SAVE"
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = img.tobytes()
    _plant(ds, v)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def plant_phi(out: Path, *, folder_names: bool = False) -> list[dict[str, str]]:
    """Plant :func:`phi_values` into every DICOM file of the phantom archive ``out``.

    Returns (and writes to ``out/phi.parquet``) one row per study and field: study_index,
    study_instance_uid, field, value, where. ``folder_names``: also rename each study folder
    ``<PatientName>_<old name>`` (only folders that hold one study). Files that are not DICOM are
    left as they are.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    truth_path = out / "truth.parquet"
    if not truth_path.is_file():
        raise InputError(f"{out} holds no truth.parquet: plant_phi needs a phantom archive")
    truth = pq.read_table(truth_path).to_pylist()
    seed = int(truth[0]["seed"]) if truth else 0
    by_uid = {r["study_instance_uid"]: r for r in truth}
    values = {uid: phi_values(seed, int(r["study_index"])) for uid, r in by_uid.items()}
    files: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in (out / "dicom").rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # not DICOM: leave it
            continue
        uid = str(ds.get("StudyInstanceUID", ""))
        if uid not in values:
            continue
        _plant(ds, values[uid])
        tmp = path.with_name(path.name + ".phi-tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        files[uid].append(path)
    rows: list[dict[str, str]] = []
    for uid, r in by_uid.items():
        v, index = values[uid], int(r["study_index"])
        study_dir = out / r["study_dir"]
        first = pydicom.dcmread(files[uid][0], stop_before_pixels=True)
        sc = _burned_in_capture(first, v, seed=seed, index=index)
        sc.save_as(study_dir / f"SC{index:06d}.dcm", enforce_file_format=True)
        if folder_names and study_dir.is_dir():
            named = study_dir.with_name(f"{v['patient_name']}_{study_dir.name}")
            os.replace(study_dir, named)
            r["study_dir"] = named.relative_to(out).as_posix()
        r["patient_id"] = v["patient_id"]
        rows += [
            {
                "study_index": str(index),
                "study_instance_uid": uid,
                "field": f,
                "value": v[f],
                "where": PHI_FIELDS[f],
            }
            for f in PHI_FIELDS
        ]
    pq.write_table(pa.Table.from_pylist(rows), out / "phi.parquet")
    tmp = truth_path.with_suffix(".parquet.part")
    pq.write_table(pa.Table.from_pylist(truth), tmp)
    os.replace(tmp, truth_path)
    log.info("planted identifiers in %d studies of %s", len(by_uid), out)
    return rows
