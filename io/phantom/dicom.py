"""Write one phantom subject as a hospital-like DICOM study.

A study holds a localizer, the non-contrast axial series, the portal-venous series of the same
anatomy, sometimes a thick axial reformat (DERIVED/SECONDARY) and sometimes a secondary capture
(dose report / screen save).  Headers follow the subject's vendor (manufacturer, model, kernel,
signed or unsigned storage, RescaleSlope/Intercept, padding outside the field of view), series
descriptions come in several styles and languages, the contrast-agent tag is sometimes missing or
wrong, InstanceNumber runs head-to-feet or feet-to-head, and files sit in nested folders with
opaque names in shuffled order (one folder per series, all series in one folder, or a series split
across two folders).  With ``compress="mixed"`` series use RLE Lossless, JPEG-LS Lossless, JPEG 2000
Lossless or stay uncompressed (explicit or implicit VR); ``"none"`` keeps every series uncompressed.

Everything (UIDs, dates, names, order) derives from ``(seed, index, matrix, compress)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pdacscreen.io.phantom.extras import localizer, secondary_capture
from pdacscreen.io.phantom.series import Naming, draw_naming
from pdacscreen.io.phantom.vendors import VENDORS, Vendor

__all__ = ["write_study", "TRANSFER_SYNTAXES", "patient_id_for"]

_SALT = 0x44434D  # "DCM"
# Cycles of transfer syntaxes (seeded order); the non-contrast series of study k takes slot k, the
# portal-venous series slot k + 2, so every syntax appears within three consecutive studies.
TRANSFER_SYNTAXES = {
    "none": (ExplicitVRLittleEndian,) * 5 + (ImplicitVRLittleEndian,),
    "mixed": (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ),
}


def patient_id_for(seed: int, index: int) -> str:
    """Synthetic PatientID of study ``index`` in an archive made with ``seed``."""
    return f"PHANTOM-{seed % 10000:04d}-{index:06d}"


def _ds(v: float) -> str:
    """A DS string (<= 16 characters) for ``v``."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s if s not in ("-0", "") else "0"


class _Ctx:
    """Per-study identifiers and random choices."""

    def __init__(self, seed: int, index: int, matrix: int, compress: str) -> None:
        self.key = [f"pdacscreen-phantom/{seed}/{index}/{matrix}/{compress}"]
        self.rng = np.random.default_rng(np.random.SeedSequence([_SALT, seed, index, matrix]))

    def uid(self, *parts: object) -> str:
        # pydicom ignores entropy_srcs when prefix=None (random UUID): keep its default root.
        return str(generate_uid(entropy_srcs=self.key + [str(p) for p in parts]))

    def opaque(self, *parts: object, n: int = 8) -> str:
        h = hashlib.sha256("/".join(self.key + [str(p) for p in parts]).encode()).hexdigest()
        return h[:n].upper()


def _stored(hu: np.ndarray, v: Vendor, fov: np.ndarray) -> np.ndarray:
    """HU -> stored values for this vendor (padding outside the field of view)."""
    s = np.round((hu - v.intercept) / v.slope)
    if v.signed:
        s = np.clip(s, -32768, 32767).astype(np.int16)
    else:
        s = np.clip(s, 0, 2**v.bits_stored - 1).astype(np.uint16)
    s[..., ~fov] = v.pad_stored
    return s


def _common(ctx: _Ctx, sub, v: Vendor, nm: Naming, *, pid: str, study_uid: str, when) -> list:
    t = sub.truth
    return [
        ("SpecificCharacterSet", nm.charset),
        ("PatientName", f"PHANTOM^{pid[-10:]}"),
        ("PatientID", pid),
        ("PatientBirthDate", when["birth"]),
        ("PatientSex", when["sex"]),
        ("PatientAge", f"{when['age']:03d}Y"),
        *((("PatientSize", _ds(when["height_m"])),) if when.get("height_m") else ()),
        ("StudyInstanceUID", study_uid),
        ("StudyDate", when["date"]),
        ("StudyTime", when["time"]),
        ("AccessionNumber", ctx.opaque("acc", n=10)),
        ("StudyID", str(int(ctx.rng.integers(1e5)))),
        ("ReferringPhysicianName", ""),
        ("StudyDescription", nm.study_desc),
        ("Manufacturer", v.manufacturer),
        ("ManufacturerModelName", t["model"]),
        ("InstitutionName", nm.institution),
        ("StationName", ctx.opaque("station", n=6)),
        ("SoftwareVersions", "pdacscreen-phantom 1"),
        ("FrameOfReferenceUID", ctx.uid("for")),
        ("PositionReferenceIndicator", ""),
        ("Modality", "CT"),
        ("BodyPartExamined", "ABDOMEN"),
        ("PatientPosition", "HFS"),
        ("KVP", _ds(t["kvp"])),
    ]


def _write(ds: Dataset, path: Path, ts: str, arr: np.ndarray | None) -> int:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PDACSCREEN_1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if arr is not None:
        ds.PixelData = arr.tobytes()
        if ts in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
            ds.compress(ts, arr, generate_instance_uid=False)
        else:
            meta.TransferSyntaxUID = ts
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def _image_series(
    ctx,
    common,
    sub,
    v: Vendor,
    *,
    hu,
    series_uid,
    number,
    desc,
    image_type,
    agent,
    thk,
    dz,
    origin_z,
    when_time,
    ts,
    top_first,
):
    """Yield (dataset, stored array, ts) for each slice of an axial series."""
    nz = hu.shape[0]
    stored = _stored(hu, v, sub.fov_mask)
    org = sub.affine[:3, 3]
    dx = sub.spacing[2]
    order = range(nz - 1, -1, -1) if top_first else range(nz)
    for inst, k in enumerate(order, start=1):
        ds = Dataset()
        for kw, val in common:
            setattr(ds, kw, val)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ctx.uid(series_uid, k)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = number
        ds.SeriesDescription = desc
        ds.ImageType = image_type
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.StudyDate
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = when_time
        ds.InstanceNumber = inst
        ds.ConvolutionKernel = (
            sub.truth["kernel"].split("\\") if "\\" in sub.truth["kernel"] else sub.truth["kernel"]
        )
        ds.SliceThickness = _ds(thk)
        z = origin_z + k * dz
        ds.ImagePositionPatient = [_ds(org[0]), _ds(org[1]), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds(z)
        ds.PixelSpacing = [_ds(dx), _ds(dx)]
        ds.GantryDetectorTilt = "0"
        ds.ReconstructionDiameter = _ds(dx * hu.shape[2])
        if agent is not None:
            ds.ContrastBolusAgent = agent
            if agent not in ("NONE", "None", "no", "NO CONTRAST"):
                ds.ContrastBolusRoute = "IV"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = v.bits_stored
        ds.HighBit = v.bits_stored - 1
        ds.PixelRepresentation = 1 if v.signed else 0
        ds.RescaleIntercept = _ds(v.intercept)
        ds.RescaleSlope = _ds(v.slope)
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = ["40", "400"]
        if v.pad_tag:
            ds.PixelPaddingValue = int(v.pad_stored)
        yield ds, np.ascontiguousarray(stored[k]), ts


def _dates(ctx: _Ctx) -> dict:
    rng = ctx.rng
    year = int(rng.integers(2014, 2025))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    age = int(np.clip(rng.normal(66, 10), 35, 92))
    h, m, s = int(rng.integers(7, 20)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return {
        "date": f"{year:04d}{month:02d}{day:02d}",
        "time": f"{h:02d}{m:02d}{s:02d}",
        "birth": f"{year - age:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "age": age,
        "sex": "M" if rng.random() < 0.52 else "F",
        "hms": (h, m, s),
    }


#: share of patients whose studies carry PatientSize (height, m): DICOM often lacks it
HEIGHT_PRESENT = 0.7


def _height(seed: int, patient: int, sex: str) -> float | None:
    """The patient's height in metres (constant across visits), or None when not recorded.

    Drawn from its own stream (the study's other draws are unchanged): adult heights, men
    N(1.76, 0.07) m, women N(1.63, 0.065) m, clipped to 1.45-2.05 m.
    """
    rng = np.random.default_rng(np.random.SeedSequence([_SALT, int(seed), int(patient), 0x48]))
    if rng.random() >= HEIGHT_PRESENT:
        return None
    mean, sd = (1.76, 0.07) if sex == "M" else (1.63, 0.065)
    return round(float(np.clip(rng.normal(mean, sd), 1.45, 2.05)), 2)


def _visit_dates(seed: int, patient: int, months: float) -> dict:
    """A follow-up visit's dates: the patient's first-visit draws moved on by ``months``."""
    import datetime as dt

    base = _dates(_Ctx(seed, patient, 0, "patient"))
    d0 = dt.date(int(base["date"][:4]), int(base["date"][4:6]), int(base["date"][6:]))
    d = d0 + dt.timedelta(days=int(round(months * 30.4375)))
    return {**base, "date": d.strftime("%Y%m%d"), "age": base["age"] + int(months // 12)}


def _tplus(hms, seconds: int) -> str:
    t = hms[0] * 3600 + hms[1] * 60 + hms[2] + seconds
    return f"{t // 3600 % 24:02d}{t // 60 % 60:02d}{t % 60:02d}"


def _pick_ts(seed: int, slot: int, compress: str) -> str:
    """Transfer syntax of a slot in the seeded cycle for ``compress``."""
    cycle = TRANSFER_SYNTAXES[compress]
    order = np.random.default_rng(np.random.SeedSequence([_SALT, seed])).permutation(len(cycle))
    return cycle[int(order[slot % len(cycle)])]


def write_study(
    sub,
    *,
    root: Path,
    seed: int,
    index: int,
    matrix: int,
    compress: str,
    visit: tuple[int, float] | None = None,
) -> dict:
    """Write subject ``sub`` as study ``index`` under ``root`` (the archive folder).

    ``visit`` ``(patient, months)``: the study is a follow-up of patient ``patient`` ``months``
    after its first visit (same PatientID, birth date, sex and height; the study date moves on).
    Returns the study's truth-row additions: identifiers, descriptions, tags, files and bytes.
    """
    ctx = _Ctx(seed, index, matrix, compress)
    v = next(x for x in VENDORS if x.manufacturer == sub.truth["manufacturer"])
    thk = sub.truth["slice_thickness_mm"]
    nm = draw_naming(ctx.rng, manufacturer=v.manufacturer, thk=thk, kernel=sub.truth["kernel"])
    patient = index if visit is None else int(visit[0])
    when = _dates(ctx) if visit is None else _visit_dates(seed, patient, float(visit[1]))
    when["height_m"] = _height(seed, patient, when["sex"])
    pid = patient_id_for(seed, patient)
    study_uid = ctx.uid("study")
    uids = {n: ctx.uid("series", n) for n in ("loc", "nc", "pv", "ref", "sc")}
    common = _common(ctx, sub, v, nm, pid=pid, study_uid=study_uid, when=when)
    has_ref = ctx.rng.random() < 0.45
    ref_src = "noncontrast" if ctx.rng.random() < 0.4 else "contrast"
    has_sc = ctx.rng.random() < 0.3
    top_first = ctx.rng.random() < 0.8
    ts_nc, ts_pv, ts_ref = (
        _pick_ts(seed, index, compress),
        _pick_ts(seed, index + 2, compress),
        _pick_ts(seed, index + int(ctx.rng.integers(5)), compress),
    )
    base_no = 1 if ctx.rng.random() < 0.5 else 2
    org_z = sub.affine[2, 3]
    items: list[tuple[str, Dataset, np.ndarray, str]] = []
    ds, img = localizer(
        ctx,
        common,
        sub,
        series_uid=uids["loc"],
        number=1,
        desc=nm.localizer_desc,
        time=_tplus(when["hms"], 0),
    )
    items.append(("loc", ds, img, ExplicitVRLittleEndian))
    t_nc = _tplus(when["hms"], 40)
    for ds, arr, ts in _image_series(
        ctx,
        common,
        sub,
        v,
        hu=sub.noncontrast,
        series_uid=uids["nc"],
        number=base_no + 1,
        desc=nm.nc_desc,
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
        agent=nm.nc_agent,
        thk=thk,
        dz=thk,
        origin_z=org_z,
        when_time=t_nc,
        ts=ts_nc,
        top_first=top_first,
    ):
        items.append(("nc", ds, arr, ts))
    t_pv = _tplus(when["hms"], 40 + int(ctx.rng.integers(90, 200)))
    for ds, arr, ts in _image_series(
        ctx,
        common,
        sub,
        v,
        hu=sub.contrast,
        series_uid=uids["pv"],
        number=base_no + 2,
        desc=nm.pv_desc,
        image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
        agent=nm.pv_agent,
        thk=thk,
        dz=thk,
        origin_z=org_z,
        when_time=t_pv,
        ts=ts_pv,
        top_first=top_first,
    ):
        items.append(("pv", ds, arr, ts))
    if has_ref:
        src = sub.noncontrast if ref_src == "noncontrast" else sub.contrast
        g = max(2, int(round(nm.reformat_thk / thk)))
        n = src.shape[0] // g
        ref = np.round(src[: n * g].reshape(n, g, *src.shape[1:]).mean(axis=1))
        itype = {
            "SIEMENS": ["DERIVED", "SECONDARY", "MPR"],
            "GE MEDICAL SYSTEMS": ["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"],
        }.get(v.manufacturer, ["DERIVED", "SECONDARY", "AXIAL"])
        for ds, arr, ts in _image_series(
            ctx,
            common,
            sub,
            v,
            hu=ref,
            series_uid=uids["ref"],
            number=base_no + 200,
            desc=nm.reformat_desc,
            image_type=itype,
            agent=nm.nc_agent if ref_src == "noncontrast" else nm.pv_agent,
            thk=g * thk,
            origin_z=org_z + (g - 1) / 2 * thk,
            when_time=t_pv,
            ts=ts_ref,
            top_first=top_first,
            dz=g * thk,
        ):
            items.append(("ref", ds, arr, ts))
    if has_sc:
        ds, img = secondary_capture(
            ctx,
            common,
            sub,
            series_uid=uids["sc"],
            number=999,
            desc=nm.sc_desc,
            time=_tplus(when["hms"], 600),
        )
        items.append(("sc", ds, img, ExplicitVRLittleEndian))

    # Layout: opaque nested folders, shuffled file order.
    layout = ("pacs", "flat", "split")[int(ctx.rng.choice(3, p=[0.6, 0.2, 0.2]))]
    naming = int(ctx.rng.integers(4))
    top = ctx.opaque("top", n=2)
    study_dir = Path("dicom") / top / ctx.opaque("study")
    perm = ctx.rng.permutation(len(items))
    split_series = "nc" if ctx.rng.random() < 0.5 else "pv"
    total = 0
    for n, idx in enumerate(perm):
        kind, ds, arr, ts = items[int(idx)]
        if naming == 0:
            name = f"IM{n:05d}"
        elif naming == 1:
            name = ctx.opaque("file", ds.SOPInstanceUID)
        elif naming == 2:
            name = ctx.opaque("file", ds.SOPInstanceUID) + ".dcm"
        else:
            name = f"{ds.SOPInstanceUID}.dcm"
        if layout == "flat":
            sub_dir = study_dir
        elif layout == "split" and kind == split_series:
            sub_dir = study_dir / ctx.opaque("series", kind, n % 2)
        else:
            sub_dir = study_dir / ctx.opaque("series", kind)
        total += _write(ds, root / sub_dir / name, ts, arr)
    truth = {
        "patient_id": pid,
        "study_instance_uid": study_uid,
        "noncontrast_series_uid": uids["nc"],
        "contrast_series_uid": uids["pv"],
        "localizer_series_uid": uids["loc"],
        "reformat_series_uid": uids["ref"] if has_ref else "",
        "reformat_of": ref_src if has_ref else "",
        "secondary_capture_series_uid": uids["sc"] if has_sc else "",
        "noncontrast_transfer_syntax": str(ts_nc),
        "contrast_transfer_syntax": str(ts_pv),
        "study_date": when["date"],
        "patient_age": when["age"],
        "patient_sex": when["sex"],
        "patient_height_m": when["height_m"] if when["height_m"] else float("nan"),
        "instance_order": "head_first" if top_first else "feet_first",
        "layout": layout,
        "study_dir": study_dir.as_posix(),
        "n_files": len(items),
        "n_bytes": int(total),
    }
    truth.update(nm.as_truth())
    return truth
