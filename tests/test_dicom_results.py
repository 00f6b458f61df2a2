"""DICOM results of the sweep: a SEG + TID 1500 SR per ok study on the source slices, records in
STORE/dicom_exports/, and STOW-RS write-back to a real Orthanc (a refused upload is retried next
run; a resend never duplicates).  dciodvfy (dicom3tools) validates every object written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc_server import orthanc  # noqa: F401 - the session fixture
from test_dicomweb import _Proxy, _source

from pdacscreen.engine.evidence import (
    SliceGeometry,
    lesion_components,
    masks_in_series_grid,
    masks_on_slices,
)
from pdacscreen.io.dicom.export import (
    export_uids,
    headers_to_datasets,
    read_exports,
    sort_source,
    source_headers,
)
from pdacscreen.io.pseudonym import DEMO_KEY

pytestmark = pytest.mark.timeout(900)


# -- helpers -------------------------------------------------------------------------------------


def _dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; make setup installs it)")
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def _seg_planes(path: Path, src: list) -> dict[int, np.ndarray]:
    """Every segment of a SEG on the source slices, each frame placed through its own
    ImagePositionPatient (and checked to reference the source image at that position)."""
    ds = pydicom.dcmread(path)
    positions = [tuple(float(v) for v in d.ImagePositionPatient) for d in src]
    shape = (len(src), int(ds.Rows), int(ds.Columns))
    out = {int(s.SegmentNumber): np.zeros(shape, np.uint8) for s in ds.SegmentSequence}
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        k = positions.index(pos)
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == src[k].SOPInstanceUID
        out[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)][k] = pixels[f]
    return out


def _expected_on_seg_grid(mask: np.ndarray, affine: np.ndarray, seg_path: Path, src: list):
    """The crop-grid ``mask`` sampled at the SEG's own pixel centres (its frames' positions,
    orientation and pixel spacing), nearest neighbour: the reference the SEG must equal."""
    ds = pydicom.dcmread(seg_path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    dy, dx = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    rows, cols = int(ds.Rows), int(ds.Columns)
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out = np.zeros((len(src), rows, cols), np.uint8)
    inv = np.linalg.inv(affine)
    for k, d in enumerate(src):
        p = np.asarray(d.ImagePositionPatient, float)
        world = p + jj[..., None] * dy * iop[3:] + ii[..., None] * dx * iop[:3]
        idx = np.floor(world @ inv[:3, :3].T + inv[:3, 3] + 0.5).astype(int)
        ok = np.all((idx >= 0) & (idx < mask.shape), axis=-1)
        out[k][ok] = mask[idx[ok][:, 0], idx[ok][:, 1], idx[ok][:, 2]]
    return out


def _geometry(src) -> SliceGeometry:
    iop = [float(v) for v in src[0].ImageOrientationPatient]
    return SliceGeometry(
        positions=np.array([[float(v) for v in d.ImagePositionPatient] for d in src]),
        row_dir=tuple(iop[:3]),
        col_dir=tuple(iop[3:]),
        pixel_spacing=tuple(float(v) for v in src[0].PixelSpacing),
        rows=int(src[0].Rows),
        columns=int(src[0].Columns),
    )


# -- the mapping onto source slices --------------------------------------------------------------


def test_masks_on_slices_sample_each_slice_at_its_own_position():
    """Against a brute force: for every source pixel the crop voxel whose centre is nearest in
    index space (argmin over all voxels), 0 outside; uneven slices, an oblique crop grid."""
    rng = np.random.default_rng(7)
    mask = (rng.random((6, 7, 8)) > 0.5).astype(np.uint8)
    rot = np.linalg.qr(rng.normal(size=(3, 3)) * 0.1 + np.eye(3))[0]
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([1.7, 1.3, 1.1])
    affine[:3, 3] = (2.1, 1.7, -0.3)
    z = np.cumsum(rng.uniform(0.6, 2.9, size=10)) - 3.0  # uneven gaps (mm)
    geo = SliceGeometry(
        positions=np.array([[-1.37, -2.11, zz] for zz in z]),
        row_dir=(1.0, 0.0, 0.0),
        col_dir=(0.0, 1.0, 0.0),
        pixel_spacing=(0.83, 0.77),
        rows=18,
        columns=17,
    )
    got = masks_on_slices([mask], affine, geo)[0]
    assert got.shape == (10, 18, 17) and got.any() and not got.all()
    centres = np.argwhere(np.ones(mask.shape, bool)).astype(float)
    inv = np.linalg.inv(affine)
    want = np.zeros_like(got)
    for k, p in enumerate(geo.positions):
        for j in range(18):
            for i in range(17):
                w = p + j * 0.83 * np.array([0, 1, 0]) + i * 0.77 * np.array([1, 0, 0])
                c = inv[:3, :3] @ w + inv[:3, 3]
                if np.all(c >= -0.5) and np.all(c < np.array(mask.shape) - 0.5):
                    n = centres[np.argmin(((centres - c) ** 2).sum(axis=1))].astype(int)
                    want[k, j, i] = mask[tuple(n)]
    np.testing.assert_array_equal(got, want)


# -- one engine result, exported -----------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from pdacscreen.engine.inference import Detector
    from pdacscreen.engine.package import load_package

    package = load_package(None)
    return package, Detector(package, backend="auto")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A phantom PDAC study (matrix 128, native pixels): the non-contrast series' files."""
    from pdacscreen.io.phantom.dicom import write_study
    from pdacscreen.io.phantom.subject import make_subject

    root = tmp_path_factory.mktemp("results-phantom")
    sub = make_subject(3, matrix=128, lesion_type="pdac", lesion_diameter_mm=25)
    truth = write_study(sub, root=root, seed=3, index=0, matrix=128, compress="none")
    uid = truth["noncontrast_series_uid"]
    files = sorted(
        str(p)
        for p in root.rglob("*")
        if p.is_file() and pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid
    )
    return files, uid


@pytest.fixture(scope="module")
def detected(engine, phantom):
    """The phantom's volume and the engine's result (computed once for the module)."""
    from pdacscreen.io.volume import load_series

    files, _ = phantom
    volume = load_series(files, key=DEMO_KEY, workers=1)
    return volume, engine[1].detect(volume)


def _export(engine, files, uid, store: Path, detected=None):
    from pdacscreen.flows.study_worker import evidence_folder_name, export_results
    from pdacscreen.flows.sweep import build_config
    from pdacscreen.io.volume import load_series

    package, detector = engine
    if detected is None:
        volume = load_series(files, key=DEMO_KEY, workers=1)
        detected = volume, detector.detect(volume)
    volume, result = detected
    assert result.masks is not None and result.masks.pancreas.any()
    config = build_config(
        archive=str(Path(files[0]).parent),
        store=str(store),
        pseudonym_key=DEMO_KEY,
        package=package,
    )
    headers = source_headers(files, series_instance_uid=uid)
    folder = store / "dicom" / evidence_folder_name(volume.study_instance_uid)
    records = export_results(
        result,
        headers,
        study_instance_uid=volume.study_instance_uid,
        folder=folder,
        store=store,
        package=package,
        config=config,
    )
    src = sort_source(headers_to_datasets(headers))
    return volume, result, records, src, config


def test_seg_and_sr_of_an_engine_result(engine, phantom, detected, tmp_path):
    import highdicom as hd

    files, uid = phantom
    volume, result, records, src, config = _export(engine, files, uid, tmp_path, detected)
    assert [(r.object, r.status) for r in records] == [("seg", "written"), ("sr", "written")]
    seg_path, sr_path = (tmp_path / r.path for r in records)
    assert _dciodvfy_errors(seg_path) == [] and _dciodvfy_errors(sr_path) == []
    uids = export_uids(volume.study_instance_uid, _alg(config))
    assert records[0].sop_instance_uid == uids["seg"] and records[1].sop_instance_uid == uids["sr"]
    assert seg_path.name == f"seg-{uids['seg']}.dcm"
    # the SEG's masks equal the engine's, voxel for voxel, through each frame's position
    planes = _seg_planes(seg_path, src)
    masks = result.masks
    lesions, labels = lesion_components(result)
    assert len(lesions) == result.lesion_count >= 1 and len(planes) == 1 + len(lesions)
    assert lesions[0].diameter_mm == pytest.approx(result.lesion_diameter_mm)
    assert lesions[0].volume_ml == pytest.approx(result.lesion_volume_ml)
    ref = _expected_on_seg_grid(masks.pancreas, masks.affine, seg_path, src)
    np.testing.assert_array_equal(planes[1], ref)
    for n, les in enumerate(lesions, start=2):
        own = (labels == les.label).astype(np.uint8)
        np.testing.assert_array_equal(
            planes[n], _expected_on_seg_grid(own, masks.affine, seg_path, src)
        )
    # a regular series: the source slices are the volume's, so the SEG equals the evidence masks
    pancreas, lesion = masks_in_series_grid(result, volume)
    np.testing.assert_array_equal(planes[1], pancreas)
    np.testing.assert_array_equal(np.max([planes[n] for n in planes if n > 1], axis=0), lesion)
    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # the SR: the study's probability and flag, one volumetric group per lesion segment
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(lesions)
    vals = {m.name.meaning: m.value for m in groups[0].get_measurements()}
    assert vals["Diameter"] == pytest.approx(lesions[0].diameter_mm)
    assert groups[0].referenced_segment.referenced_sop_instance_uid == uids["seg"]
    numbers = {}
    for it in pydicom.dcmread(sr_path).ContentSequence:
        for sub in it.get("ContentSequence", []):
            for m in sub.get("ContentSequence", []):
                if "MeasuredValueSequence" in m:
                    numbers[m.ConceptNameCodeSequence[0].CodeMeaning] = float(
                        m.MeasuredValueSequence[0].NumericValue
                    )
    assert numbers["Probability"] == pytest.approx(result.pdac_probability)
    # idempotent: a second export overwrites the same two files, nothing else in the folder
    # (a temporary file a killed writer left is removed)
    (seg_path.parent / f".{seg_path.name}.tmp-99999").write_bytes(b"partial")
    _export(engine, files, uid, tmp_path, detected)
    assert sorted(p.name for p in seg_path.parent.iterdir()) == sorted(
        [seg_path.name, sr_path.name]
    )


def _alg(config):
    from pdacscreen.io.dicom.export import Algorithm

    return Algorithm(
        name=config.model_name,
        version=config.model_version,
        model_sha256=config.model_sha256,
        config_hash=config.hash,
    )


def test_resampled_series_maps_back_to_each_stored_slice(engine, phantom, tmp_path):
    """Uneven slice gaps: load_series resamples the volume, the SEG stays on the stored slices."""
    files, uid = phantom
    moved = tmp_path / "uneven"
    moved.mkdir()
    order = sort_source(files)
    out = []
    for k, ds in enumerate(order):
        ds = pydicom.dcmread(ds.filename)
        if k % 3 == 1:  # every third gap 1.5 mm shorter, the next 1.5 mm longer
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] - 1.5]
        path = moved / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(str(path))
    volume, result, records, src, _ = _export(engine, out, uid, tmp_path / "store")
    assert "uneven_spacing" in volume.flags
    assert [r.status for r in records] == ["written", "written"], records
    seg_path = tmp_path / "store" / records[0].path
    planes = _seg_planes(seg_path, src)
    assert len(src) == len(files) and planes[1].shape[0] == len(src)
    masks = result.masks
    np.testing.assert_array_equal(
        planes[1], _expected_on_seg_grid(masks.pancreas, masks.affine, seg_path, src)
    )
    np.testing.assert_array_equal(
        planes[1], masks_on_slices([masks.pancreas], masks.affine, _geometry(src))[0]
    )
    assert _dciodvfy_errors(seg_path) == []


def test_a_failed_export_is_a_record_not_a_lost_row(engine, phantom, detected, tmp_path):
    files, uid = phantom
    blocked = tmp_path / "dicom"
    blocked.write_text("a file where the dicom folder should be")  # the writer cannot mkdir
    _, _, records, _, _ = _export(engine, files, uid, tmp_path, detected)
    assert [(r.status, r.error_code) for r in records] == [("failed", "dicom_export_failed")] * 2
    assert "FileExistsError" in records[0].message or "NotADirectory" in records[0].message


def test_dicom_results_option_picks_the_studies(engine, phantom, tmp_path):
    """The engine actor (called in process, as Ray calls it) under each ``dicom_results``."""
    from pdacscreen.flows.outcomes import StudyTask
    from pdacscreen.flows.study_worker import EngineActor, load_study
    from pdacscreen.flows.sweep import build_config

    files, uid = phantom
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    outcomes = {}
    for mode in ("all", "flagged", "none"):
        config = build_config(
            archive=str(Path(files[0]).parent),
            store=str(tmp_path / mode),
            pseudonym_key=DEMO_KEY,
            package=engine[0],
            dicom_results=mode,
        )
        loaded = load_study(StudyTask(study, uid, tuple(files)), config)
        assert len(loaded.headers) == (len(files) if mode != "none" else 0)
        outcomes[mode] = EngineActor(config).process(study, loaded)
    assert {str(o.status) for o in outcomes.values()} == {"ok"}
    flagged = bool(outcomes["all"].findings["pdac_flag"])
    assert [r.status for r in outcomes["all"].exports] == ["written", "written"]
    assert len(outcomes["flagged"].exports) == (2 if flagged else 0)
    assert outcomes["none"].exports == () and not (tmp_path / "none" / "dicom").exists()
    # the findings are the same whatever is exported
    assert outcomes["all"].findings == outcomes["none"].findings


def test_send_pending_while_the_pacs_is_unavailable_then_back(
    engine,
    phantom,
    detected,
    orthanc,  # noqa: F811
    tmp_path,
):
    """STOW-RS of written results: 503 after the retries is ``failed`` (source_unavailable); the
    next call sends them; a third sends nothing and Orthanc keeps one instance per SOP UID."""
    from pdacscreen.io.dicom.export import append_exports
    from pdacscreen.io.dicomweb import send_pending

    files, uid = phantom
    volume, _, records, _, _ = _export(engine, files, uid, tmp_path, detected)
    proxy = _Proxy(orthanc.url)
    try:
        source = _source(proxy.url, orthanc, attempts=2, backoff_s=0.01)
        rows = [{**r.row(), "source": source.archive} for r in records]
        append_exports(
            tmp_path, rows, sweep_id="20260101T000000Z-a", model_version="v", config_hash="c"
        )
        before = _instances(orthanc)
        proxy.mode = "503"
        assert send_pending(source, store=tmp_path, sweep_id="20260101T000001Z-a") == {"failed": 2}
        ex = read_exports(tmp_path)
        assert list(ex["error_code"].iloc[-2:]) == ["source_unavailable"] * 2
        assert sum(proxy.posts.values()) == 2  # one request per study, tried twice
        proxy.mode = None
        assert send_pending(source, store=tmp_path, sweep_id="20260101T000002Z-a") == {"sent": 2}
        for r in records:
            assert _series_of(orthanc, volume.study_instance_uid, r.object.upper()) == [
                r.series_instance_uid
            ]
        assert _instances(orthanc) == before + 2
        assert send_pending(source, store=tmp_path, sweep_id="20260101T000003Z-a") == {}
        assert _instances(orthanc) == before + 2
    finally:
        proxy.close()


def test_write_back_needs_a_dicomweb_source(tmp_path):
    from pdacscreen.flows.cli import main

    rc = main(
        ["sweep", str(tmp_path), "--store", str(tmp_path / "s"), "--demo-key", "--write-back"]
    )
    assert rc == 2 and not (tmp_path / "s").exists()


# -- the sweep: folder of results, write-back to Orthanc -----------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from pdacscreen.io.phantom.archive import generate_archive

    out = tmp_path_factory.mktemp("results-archive")
    generate_archive(out, studies=3, seed=14, matrix=128, compress="none", workers=1)
    return out, sorted(p for p in (out / "dicom").rglob("*") if p.is_file())


def _instances(server) -> int:
    return int(server.rest("GET", "/statistics").json()["CountInstances"])


def _series_of(server, study: str, modality: str) -> list[str]:
    from pdacscreen.io.dicomweb import DicomwebClient

    with DicomwebClient(_source(server.dicomweb, server)) as c:
        found = c.client.search_for_series(study, search_filters={"Modality": modality})
    return [f["0020000E"]["Value"][0] for f in found]


@pytest.mark.slow
def test_sweep_writes_results_and_sends_them_once(
    orthanc,  # noqa: F811
    archive,
    tmp_path,
    prefect_server,
    local_ray,
    monkeypatch,
):
    from pdacscreen.flows.sweep import nightly_sweep
    from pdacscreen.flows.worklist import flagged_studies
    from pdacscreen.io.dicomweb import DicomwebClient
    from pdacscreen.io.store import FindingsStore

    out, files = archive
    orthanc.clear()
    with DicomwebClient(_source(orthanc.dicomweb, orthanc)) as client:
        for i in range(0, len(files), 60):
            assert all(v is None for v in client.store(files[i : i + 60]).values())
    n0 = _instances(orthanc)
    monkeypatch.setenv("PDACSCREEN_DICOMWEB_USER", orthanc.user)
    monkeypatch.setenv("PDACSCREEN_DICOMWEB_PASSWORD", orthanc.password)
    proxy = _Proxy(orthanc.url)
    store = tmp_path / "store"
    common = {"store": str(store), "n_actors": 1, "demo_key": True, "write_back": True}
    try:
        # run 1: the account may read but not store (403 on POST): rows ok, sends failed
        proxy.mode = "deny-post"
        first = nightly_sweep(archive=f"dicomweb+{proxy.url}", **common)
        rows = FindingsStore(store).read_findings()
        ok = rows[rows["status"] == "ok"]
        assert first["processed"] == 3 and first["ok"] == len(ok) >= 1
        assert first["dicom_written"] == 2 * len(ok) and first["dicom_failed"] == 2 * len(ok)
        ex = read_exports(store)
        sends = ex[ex["action"] == "send"]
        assert (sends["status"] == "failed").all() and len(sends) == 2 * len(ok)
        assert set(sends["error_code"]) == {"source_unauthorized"}
        assert _instances(orthanc) == n0
        written = ex[(ex["action"] == "write") & (ex["status"] == "written")]
        compared = 0
        assert sorted(set(written["study_instance_uid"])) == sorted(ok["study_instance_uid"])
        for rec in written.itertuples():
            path = store / rec.path
            assert _dciodvfy_errors(path) == [], rec.path
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == rec.study_instance_uid
            assert ds.SOPInstanceUID == rec.sop_instance_uid
            assert ds.Modality == rec.object.upper()
            row = ok[ok["study_instance_uid"] == rec.study_instance_uid].iloc[0]
            if rec.object == "seg":  # on the analysed series' slices; equal to the evidence masks
                assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == row.series_instance_uid
                if isinstance(row.evidence_path, str):
                    import nibabel as nib

                    nii = nib.load(store / row.evidence_path / "pancreas_mask.nii.gz")
                    pancreas = np.asarray(nii.dataobj).transpose(2, 1, 0)
                    src = sort_source(
                        [
                            p
                            for p in files
                            if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                            == row.series_instance_uid
                        ]
                    )
                    np.testing.assert_array_equal(_seg_planes(path, src)[1], pancreas)
                    compared += 1
        # store names and records stay pseudonymous
        ids = {
            str(v)
            for p in files[:: max(1, len(files) // 20)]
            for v in (
                pydicom.dcmread(p, stop_before_pixels=True).PatientName,
                pydicom.dcmread(p, stop_before_pixels=True).PatientID,
            )
        }
        names = [p.as_posix() for p in (store / "dicom").rglob("*")]
        blobs = b"".join(p.read_bytes() for p in (store / "dicom_exports").rglob("*.parquet"))
        for v in ids:
            assert not any(v in n for n in names) and v.encode() not in blobs, v
        assert orthanc.password.encode() not in blobs
        # run 2: the rights are back: nothing new to screen, the failed uploads are sent
        proxy.mode = None
        second = nightly_sweep(archive=f"dicomweb+{proxy.url}", **common)
        assert second["processed"] == 0 and second["dicom_sent"] == 2 * len(ok)
        assert second["dicom_failed"] == 0
        assert _instances(orthanc) == n0 + 2 * len(ok)
        for rec in written.itertuples():  # QIDO finds them, in the right study
            mod = rec.object.upper()
            assert _series_of(orthanc, rec.study_instance_uid, mod) == [rec.series_instance_uid]
        # run 3: nothing to send, nothing duplicated
        proxy.posts.clear()
        third = nightly_sweep(archive=f"dicomweb+{proxy.url}", **common)
        assert third["processed"] == 0 and third["dicom_sent"] == 0
        assert sum(proxy.posts.values()) == 0, dict(proxy.posts)
        assert _instances(orthanc) == n0 + 2 * len(ok)
        # the worklist links each flagged study's SEG/SR and its PACS study
        wl = flagged_studies(store)
        assert len(wl) == int(ok["pdac_flag"].sum()) >= 1
        assert compared >= 1  # the flagged study's SEG was compared with its evidence masks
        for r in wl.itertuples():
            assert (store / r.seg_path).is_file() and (store / r.sr_path).is_file()
            assert r.dicom_export_status == "sent"
            assert r.pacs_study_url == f"{proxy.url}/studies/{r.study_instance_uid}"
    finally:
        proxy.close()
