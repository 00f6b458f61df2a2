"""Results a PACS stores and a viewer shows: DICOM Segmentation and Comprehensive 3D SR (TID 1500).

* :func:`write_seg` writes a BINARY Segmentation (highdicom) with the pancreas and each reported
  lesion as segments (SNOMED CT codes), algorithm identification (name, version, model sha256),
  frames only where a segment is, each frame referencing its source image.  BINARY, not
  LABELMAP: the lesion lies inside the pancreas, and segments of a BINARY SEG may overlap, so
  every mask is stored exactly as given (a label map would have to cut the lesion out of the
  pancreas); the Label Map Segmentation SOP class is also too new for many viewers and validators.
* :func:`write_sr` writes a Comprehensive 3D SR following TID 1500 (Measurement Report): the PDAC
  probability and flag, the operating threshold and its provenance, per lesion the diameter
  (mm), volume (ml), location (head/body/tail) and 3-D centre (LPS mm, a POINT in the series'
  frame of reference), referencing the SEG segments and the source images.

Geometry: the masks are ``(z, y, x)`` uint8 on the SOURCE series' own slices, ``z`` in the order
of :func:`pdacscreen.io.volume.load_series` (ascending projection of ImagePositionPatient on the
slice normal, never InstanceNumber).  Each SEG frame copies the position and orientation of its
source slice, so a tilted (sheared) or gapped series keeps its true geometry: no resampling is
done here.  A mask on another grid (e.g. a series resampled for uneven spacing) is refused with
an :class:`~pdacscreen.io.errors.InputError` naming the shapes; map it back to the source slices
first.

Both objects say "NOT FOR CLINICAL USE" in SeriesDescription (and the SR in its text).  SOP,
series UIDs are derived from (study UID, model sha256, config hash) with
:func:`~pdacscreen.io.dicom.read.derived_uid`, so rewriting or re-sending never duplicates.
Files are written atomically (a hidden temporary file in the same folder, fsynced, renamed over
the final name ``seg-<SOPInstanceUID>.dcm``): a rerun overwrites the same file.

The sweep records what became of each object in ``STORE/dicom_exports/`` (:data:`EXPORT_COLUMNS`,
one Parquet part per batch, appended atomically like the findings): one row per event (``write``:
``written`` / ``failed`` / ``skipped``; ``send``: ``sent`` / ``failed``), with a stable error code
and a message free of patient identifiers.  :func:`pending_sends` lists the written objects of a
DICOMweb source whose last event is not ``sent``: the next run sends them again (same SOP
Instance UIDs, so the PACS keeps one instance).  :func:`source_headers` reads the source headers
the writers need (no pixel data) as plain bytes, so they cross process boundaries cheaply.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pydicom
from pydicom.dataset import Dataset

from pdacscreen.io.dicom.read import derived_uid
from pdacscreen.io.errors import InputError
from pdacscreen.io.store import _write_atomic, parquet_files

__all__ = [
    "EXPORT_COLUMNS",
    "EXPORT_STATUSES",
    "Algorithm",
    "ExportRecord",
    "LesionFinding",
    "StudyFinding",
    "NOT_FOR_CLINICAL_USE",
    "append_exports",
    "export_uids",
    "headers_to_datasets",
    "pending_sends",
    "read_exports",
    "sort_source",
    "source_headers",
    "write_seg",
    "write_sr",
]

log = logging.getLogger(__name__)

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
_LOCATIONS = {  # SNOMED CT body structures
    "head": ("64163001", "Head of pancreas"),
    "body": ("40133006", "Body of pancreas"),
    "tail": ("73239005", "Tail of pancreas"),
}
_PRIVATE_SCHEME = "99PDACSCREEN"


@dataclass(frozen=True)
class Algorithm:
    """What produced the results. ``model_sha256``: the model package digest (64 hex digits)."""

    name: str
    version: str
    model_sha256: str
    config_hash: str
    manufacturer: str = "pdacscreen"

    def __post_init__(self) -> None:
        s = self.model_sha256
        if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
            raise InputError(f"model_sha256 must be 64 lowercase hex digits, got {s!r}")
        if not self.config_hash:
            raise InputError("config_hash must be non-empty (it goes into the SOP Instance UIDs)")


@dataclass(frozen=True)
class LesionFinding:
    """One reported lesion. ``center_lps_mm``: (x, y, z) patient LPS mm; ``location``: head |
    body | tail | "" (unknown)."""

    diameter_mm: float
    volume_ml: float
    location: str
    center_lps_mm: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.location not in ("", *_LOCATIONS):
            raise InputError(
                f"location={self.location!r} is not allowed; use one of {('', *_LOCATIONS)}"
            )


@dataclass(frozen=True)
class StudyFinding:
    """The study-level result: probability in [0, 1], the flag, the threshold and where it came
    from (e.g. "validation set v3, sensitivity 0.90")."""

    probability: float
    flagged: bool
    threshold: float
    threshold_provenance: str
    lesions: tuple[LesionFinding, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("probability", "threshold"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise InputError(f"{name}={v!r} must be in [0, 1]")


def export_uids(study_uid: str, algorithm: Algorithm) -> dict[str, str]:
    """Deterministic series and SOP Instance UIDs of the SEG and the SR of a study."""
    parts = (study_uid, algorithm.model_sha256, algorithm.config_hash)
    return {
        k: derived_uid("pdacscreen-export", k, *parts)
        for k in ("seg_series", "seg", "sr_series", "sr")
    }


def _load(sources: Sequence[Dataset | str | Path]) -> list[Dataset]:
    out = []
    for s in sources:
        out.append(s if isinstance(s, Dataset) else pydicom.dcmread(str(s)))
    if not out:
        raise InputError("sources is empty; pass the source series' datasets or files")
    return out


def sort_source(sources: Sequence[Dataset | str | Path]) -> list[Dataset]:
    """Source images in mask order: ascending projection of IPP on the slice normal."""
    ds = _load(sources)
    uids = {d.SeriesInstanceUID for d in ds}
    if len(uids) != 1:
        raise InputError(f"sources hold {len(uids)} series ({sorted(uids)[:3]}); pass one series")
    iop = np.asarray(ds[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(
        ds, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float)))
    )


def _check_mask(name: str, m: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    m = np.asarray(m)
    if m.shape != shape:
        raise InputError(
            f"{name} has shape {m.shape}; it must be on the source series grid (z, y, x) = {shape}"
            " (one plane per source image); map resampled masks back to the source slices"
        )
    if m.dtype != np.uint8 or (m.size and m.max() > 1):
        raise InputError(f"{name} must be a uint8 mask of 0 and 1, got {m.dtype} max {m.max()}")
    return m


def _code(value: str, scheme: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _description(kind: str, series_desc: str | None) -> str:
    src = (series_desc or "CT")[:24]
    return f"pdacscreen {kind} {NOT_FOR_CLINICAL_USE} ({src})"[:64]


def write_seg(
    sources: Sequence[Dataset | str | Path],
    *,
    pancreas: np.ndarray,
    lesions: Sequence[np.ndarray],
    algorithm: Algorithm,
    out_dir: Path,
) -> Path:
    """Write the SEG of one study into ``out_dir`` (``seg-<SOPInstanceUID>.dcm``); returns it.

    Segment 1 is the pancreas, segments 2.. the lesions in the order given (the same order as
    :attr:`StudyFinding.lesions` for :func:`write_sr`).  An empty mask is refused.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = sort_source(sources)
    shape = (len(src), int(src[0].Rows), int(src[0].Columns))
    masks = [_check_mask("pancreas", pancreas, shape)]
    masks += [_check_mask(f"lesions[{i}]", m, shape) for i, m in enumerate(lesions)]
    for i, m in enumerate(masks):
        if not m.any():
            raise InputError(f"segment {i + 1} mask is empty; leave an empty finding out")
    study = str(src[0].StudyInstanceUID)
    uids = export_uids(study, algorithm)
    alg = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters={"model_sha256": algorithm.model_sha256, "config_hash": algorithm.config_hash},
    )
    descs = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="Pancreas",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Pancreas,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=alg,
            tracking_uid=derived_uid(uids["seg"], "segment", 1),
            tracking_id="pancreas",
        )
    ]
    for i in range(len(lesions)):
        descs.append(
            hd.seg.SegmentDescription(
                segment_number=i + 2,
                segment_label=f"Lesion {i + 1}",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Mass,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=alg,
                tracking_uid=derived_uid(uids["seg"], "segment", i + 2),
                tracking_id=f"lesion {i + 1}",
                anatomic_regions=[codes.SCT.Pancreas],
            )
        )
    seg = hd.seg.Segmentation(
        source_images=src,
        pixel_array=np.stack(masks, axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs,
        series_instance_uid=uids["seg_series"],
        series_number=9801,
        sop_instance_uid=uids["seg"],
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.model_sha256[:16],
        content_description="pdacscreen pancreas and lesions, research only",
        content_label="PDACSCREEN",
        omit_empty_frames=True,
    )
    seg.SeriesDescription = _description("SEG", src[0].get("SeriesDescription"))
    return _save(seg, Path(out_dir) / f"seg-{uids['seg']}.dcm")


def _save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` to ``path`` atomically: hidden temporary file, fsync, rename over ``path``.

    A temporary file of the same object left by a killed writer is removed first (one sweep
    holds the store's lock, and one actor writes a study's objects).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a killed writer's, same object
        stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s %s", ds.Modality, path.name)
    return path


def write_sr(
    sources: Sequence[Dataset | str | Path],
    *,
    seg: Dataset | str | Path,
    finding: StudyFinding,
    algorithm: Algorithm,
    out_dir: Path,
) -> Path:
    """Write the TID 1500 Comprehensive 3D SR of one study (``sr-<SOPInstanceUID>.dcm``).

    ``seg``: the object :func:`write_seg` wrote (its lesion segments 2.. match
    ``finding.lesions`` in order).  Returns the path written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = sort_source(sources)
    seg_ds = seg if isinstance(seg, Dataset) else pydicom.dcmread(str(seg))
    n_seg = len(seg_ds.SegmentSequence)
    if n_seg != len(finding.lesions) + 1:
        raise InputError(
            f"seg has {n_seg} segments; expected 1 (pancreas) + {len(finding.lesions)} lesions"
        )
    study = str(src[0].StudyInstanceUID)
    uids = export_uids(study, algorithm)
    alg_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"model_sha256={algorithm.model_sha256}",
            f"config_hash={algorithm.config_hash}",
        ],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("pdacscreen-device", algorithm.name, algorithm.version),
            name=algorithm.name,
            manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.version,
        ),
    )
    unitless = _code("1", "UCUM", "no units")
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(uids["sr"], "study"), identifier="PDAC assessment"
        ),
        finding_type=_code("372003004", "SCT", "Carcinoma of pancreas"),
        algorithm_id=alg_id,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Pancreas)],
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(finding.probability),
                unit=unitless,
                algorithm_id=alg_id,
            ),
            hd.sr.Measurement(
                name=_code("THRESHOLD", _PRIVATE_SCHEME, "Operating threshold"),
                value=float(finding.threshold),
                unit=unitless,
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_code("FLAG", _PRIVATE_SCHEME, "Flagged for radiologist review"),
                value=codes.SCT.Yes if finding.flagged else codes.SCT.No,
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src[len(src) // 2])],
    )
    groups: list = [study_group]
    frame_of_ref = str(src[0].FrameOfReferenceUID)
    seg_series = hd.sr.SourceSeriesForSegmentation(str(src[0].SeriesInstanceUID))
    for i, les in enumerate(finding.lesions):
        sites = []
        if les.location:
            value, meaning = _LOCATIONS[les.location]
            sites = [hd.sr.FindingSite(_code(value, "SCT", meaning))]
        centre = hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([les.center_lps_mm], dtype=float),
            frame_of_reference_uid=frame_of_ref,
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(uids["sr"], "lesion", i + 1), identifier=f"lesion {i + 1}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg_ds.SOPClassUID),
                    sop_instance_uid=str(seg_ds.SOPInstanceUID),
                    segment_number=i + 2,
                    source_series=seg_series,
                ),
                finding_type=codes.SCT.Mass,
                algorithm_id=alg_id,
                finding_sites=sites or None,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Diameter,
                        value=float(les.diameter_mm),
                        unit=codes.UCUM.Millimeter,
                    ),
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=float(les.volume_ml),
                        unit=_code("ml", "UCUM", "milliliter"),
                    ),
                ],
            )
        )
        groups.append(  # the 3-D centre: a POINT in the series' frame of reference (LPS mm)
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(uids["sr"], "lesion-centre", i + 1),
                    identifier=f"lesion {i + 1} centre",
                ),
                referenced_region=centre,
                finding_type=codes.SCT.Mass,
                algorithm_id=alg_id,
                finding_sites=sites or None,
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_code("25045-6", "LN", "CT unspecified body region"),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    note = (
        f"{NOT_FOR_CLINICAL_USE}: research software output ({algorithm.name} {algorithm.version}, "
        f"model sha256 {algorithm.model_sha256}, config {algorithm.config_hash}). Threshold "
        f"{finding.threshold:.6g}: {finding.threshold_provenance}"
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=note[:1024], relationship_type="CONTAINS"
        )
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*src, seg_ds],
        content=report[0],
        series_instance_uid=uids["sr_series"],
        series_number=9802,
        sop_instance_uid=uids["sr"],
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
    )
    sr.SeriesDescription = _description("SR", src[0].get("SeriesDescription"))
    return _save(sr, Path(out_dir) / f"sr-{uids['sr']}.dcm")


# -- source headers ------------------------------------------------------------------------------


def source_headers(files: Iterable[str | Path], *, series_instance_uid: str) -> tuple[bytes, ...]:
    """The headers (no pixel data) of the files of one series, each as DICOM file bytes.

    What :func:`write_seg` and :func:`write_sr` need about the source images (UIDs, geometry,
    patient and study modules), read with ``stop_before_pixels``: a few KB per image instead of
    the pixels.  Files of other series are left out.
    """
    out = []
    for f in files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        if str(ds.get("SeriesInstanceUID", "")) != series_instance_uid:
            continue
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        out.append(buf.getvalue())
    return tuple(out)


def headers_to_datasets(headers: Iterable[bytes]) -> list[Dataset]:
    """The datasets of :func:`source_headers`, one series: duplicate SOP Instance UIDs and
    images at a position already taken are left out (as ``load_series`` drops them)."""
    seen: set[str] = set()
    positions: set[tuple[float, ...]] = set()
    out = []
    for b in headers:
        ds = pydicom.dcmread(BytesIO(b))
        sop = str(ds.get("SOPInstanceUID", ""))
        pos = tuple(round(float(v), 2) for v in ds.get("ImagePositionPatient") or ())
        if sop in seen or pos in positions:
            continue
        seen.add(sop)
        positions.add(pos)
        out.append(ds)
    return out


# -- export records (STORE/dicom_exports/) --------------------------------------------------------

EXPORT_STATUSES = ("written", "sent", "failed", "skipped")
EXPORT_ACTIONS = ("write", "send")
EXPORT_OBJECTS = ("seg", "sr")
_STR = pa.string()
#: name -> (Arrow type, meaning) of the ``dicom_exports`` table
EXPORT_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "study_instance_uid": (_STR, "the study (as in findings rows)"),
    "object": (_STR, "seg (DICOM Segmentation) or sr (Comprehensive 3D SR, TID 1500)"),
    "action": (_STR, "write (into the store) or send (STOW-RS to the source PACS)"),
    "status": (_STR, "written, sent, failed or skipped"),
    "sop_instance_uid": (_STR, "the object's SOP Instance UID (derived: study, model, config)"),
    "series_instance_uid": (_STR, "the object's Series Instance UID (derived the same way)"),
    "path": (_STR, "the file, relative to STORE (dicom/<study folder>/<seg|sr>-<UID>.dcm)"),
    "source": (_STR, "the DICOMweb source the study came from (dicomweb+URL); null for folders"),
    "error_code": (_STR, "stable error code when failed or skipped"),
    "message": (_STR, "what went wrong (never patient identifiers)"),
    "model_version": (_STR, "model version of the findings row the object belongs to"),
    "config_hash": (_STR, "config hash of that row"),
    "sweep_id": (_STR, "the sweep that recorded the event"),
    "recorded_at": (pa.timestamp("us", tz="UTC"), "when (UTC)"),
}
EXPORTS_SCHEMA = pa.schema(
    [pa.field(n, t, metadata={"description": d}) for n, (t, d) in EXPORT_COLUMNS.items()]
)


@dataclass(frozen=True)
class ExportRecord:
    """One event of one result object (see :data:`EXPORT_COLUMNS`); plain values only."""

    study_instance_uid: str
    object: str
    action: str
    status: str
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    path: str | None = None
    source: str | None = None
    error_code: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("object", EXPORT_OBJECTS),
            ("action", EXPORT_ACTIONS),
            ("status", EXPORT_STATUSES),
        ):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}={getattr(self, name)!r} is not allowed; use {allowed}")
        if self.status in ("failed", "skipped") and not self.error_code:
            raise InputError(f"an export record with status {self.status!r} needs an error_code")

    def row(self) -> dict[str, Any]:
        return asdict(self)


def exports_dir(store: Path | str) -> Path:
    return Path(store) / "dicom_exports"


def append_exports(
    store: Path | str,
    records: Sequence[ExportRecord | Mapping[str, Any]],
    *,
    sweep_id: str,
    model_version: str | None = None,
    config_hash: str | None = None,
) -> Path | None:
    """Append ``records`` to ``STORE/dicom_exports/`` as one Parquet part, atomically."""
    if not records:
        return None
    now = dt.datetime.now(dt.UTC)
    rows = []
    for r in records:
        row = r.row() if isinstance(r, ExportRecord) else dict(r)
        row.setdefault("model_version", model_version)
        row.setdefault("config_hash", config_hash)
        row.update(sweep_id=sweep_id, recorded_at=row.get("recorded_at") or now)
        unknown = set(row) - set(EXPORT_COLUMNS)
        if unknown:
            raise InputError(f"unknown export column(s) {sorted(unknown)}")
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=EXPORTS_SCHEMA)
    return _write_atomic(
        table, exports_dir(store), prefix=f"part-{sweep_id}", metadata={"sweep_id": sweep_id}
    )


def read_exports(store: Path | str):
    """Every export record as a pandas DataFrame in the order recorded (empty with the columns).

    A part that cannot be read is left out with a warning: the records only steer links and
    resends, and a resend of an object whose ``sent`` record was lost replaces the same instance.
    """
    import pyarrow.parquet as pq

    tables = []
    for f in parquet_files(exports_dir(store), "*.parquet"):
        try:
            tables.append(pq.read_table(f, schema=EXPORTS_SCHEMA))
        except (pa.ArrowException, OSError) as e:
            log.warning("export records %s cannot be read (%s); left out", f.name, e)
    if not tables:
        return EXPORTS_SCHEMA.empty_table().to_pandas()
    df = pa.concat_tables(tables).to_pandas()
    return df.sort_values(["sweep_id", "recorded_at"], kind="stable").reset_index(drop=True)


def pending_sends(store: Path | str, *, source: str) -> list[dict[str, Any]]:
    """Objects written for studies of ``source`` whose last event there is not ``sent``.

    One dict per object (the columns of its last ``written`` record), in the order written;
    an object whose file is gone from the store is still listed (sending it then fails with a
    code, so it is seen).
    """
    df = read_exports(store)
    df = df[(df["source"] == source) & df["sop_instance_uid"].notna()]
    if df.empty:
        return []
    out = []
    for _, events in df.groupby("sop_instance_uid", sort=False):
        written = events[events["status"] == "written"]
        if written.empty or events.iloc[-1]["status"] == "sent":
            continue
        out.append(written.iloc[-1].to_dict())
    out.sort(key=lambda r: (r["sweep_id"], r["recorded_at"], r["object"]))
    return out
