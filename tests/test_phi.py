"""PHI: an archive with identifiers planted in every tag where real archives leak them is swept
(a real ``pdacscreen sweep`` at DEBUG, its Prefect home and Ray temp folder inside the test's
folder), its worklist and evaluation are written, and every output is searched for every planted
string and raw ID, byte-wise and case-insensitively as text (Parquet, gzip and PNG text are decoded
first, since compressed bytes cannot be searched). Zero hits, or the test names file and field.

Not searchable, by their nature: the burned-in text of the planted secondary capture (pixels;
pdacscreen never copies a secondary capture anywhere), and DICOM SEG/SR objects, which carry the
patient module of their source study by design (none is written by a sweep; they would be
excluded here by name). The index keeps each file's real ``path`` (it must find the files): with
folders named after patients it is as sensitive as the archive, and is checked without that column.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

PDAC = [sys.executable, "-m", "pdacscreen.flows.cli"]
#: outputs excluded by design (DICOM SEG / SR carry the source study's patient module)
EXCLUDED_SUFFIXES = (".dcm",)


def _planted(archive: Path) -> list[tuple[str, str]]:
    """(field, value) pairs to search for, with the birth date also in ISO form."""
    phi = pd.read_parquet(archive / "phi.parquet")
    out = [(f"{r.field} of study {r.study_index}", r.value) for r in phi.itertuples()]
    for r in phi[phi["field"] == "birth_date"].itertuples():
        v = r.value
        out.append((f"birth_date (ISO) of study {r.study_index}", f"{v[:4]}-{v[4:6]}-{v[6:]}"))
    for r in phi[phi["field"] == "patient_name"].itertuples():  # the name parts alone
        for part in r.value.split("^"):
            out.append((f"patient_name part of study {r.study_index}", part))
    return out


def _texts(path: Path, *, skip_columns: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    """(where, bytes) to search in one output file: decoded where it is compressed."""
    data = path.read_bytes()
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        out = [(f"{path} (metadata)", repr(table.schema.metadata).encode())]
        for name in table.column_names:
            if name in skip_columns:
                continue
            text = "\n".join(map(str, table.column(name).to_pylist()))
            out.append((f"{path} column {name!r}", text.encode("utf-8", "surrogateescape")))
        return out
    if path.suffix == ".gz":
        return [(f"{path} (gunzipped)", gzip.decompress(data)), (str(path), data)]
    if path.suffix == ".png":
        from PIL import Image

        info = Image.open(io.BytesIO(data)).info
        return [(f"{path} (PNG text)", repr(info).encode()), (str(path), data)]
    return [(str(path), data)]


def _hits(files: list[Path], planted: list[tuple[str, str]], **kw) -> list[str]:
    hits = []
    for f in files:
        for where, blob in _texts(f, **kw):
            low = blob.lower()
            for field, value in planted:
                if value.encode() in blob or value.lower().encode() in low:
                    hits.append(f"{where}: {field} {value!r}")
    return hits


def _files(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink() and not p.name.endswith(EXCLUDED_SUFFIXES):
                out.append(p)
    return out


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A planted archive (folders named after patients too), swept with --hash-paths at DEBUG."""
    from pdacscreen.io.phantom.archive import generate_archive
    from pdacscreen.io.phantom.phi import plant_phi

    base = tmp_path_factory.mktemp("phi")
    archive = base / "archive"
    generate_archive(
        archive, studies=3, seed=11, matrix=128, compress="mixed", pdac_fraction=0.7, workers=1
    )
    plant_phi(archive, folder_names=True)
    # a bad file in a patient-named folder: its failures row must not name the patient
    name = pd.read_parquet(archive / "phi.parquet").query("field == 'patient_name'").value.iloc[0]
    (archive / "dicom" / f"{name}_scan_notes").mkdir()
    (archive / "dicom" / f"{name}_scan_notes" / "report.txt").write_text("not DICOM")
    ray_tmp = Path(tempfile.mkdtemp(prefix="phi", dir="/tmp"))  # AF_UNIX paths stay short
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(base / "home"),
        "PDACSCREEN_WORK": str(base / "state"),
        "PREFECT_HOME": str(base / "state" / "prefect"),
        "RAY_TMPDIR": str(ray_tmp),
        "PREFECT_LOGGING_LEVEL": "DEBUG",
    }
    logs = base / "logs"
    logs.mkdir()
    store = base / "store"
    # the reference package with an operating threshold that flags every study, so every study
    # writes evidence (key image, masks) for the search below; thresholds are not hashed
    from pdacscreen.engine.package import REFERENCE_PACKAGE

    model = base / "model"
    shutil.copytree(REFERENCE_PACKAGE, model)
    manifest = json.loads((model / "model.json").read_text())
    manifest["thresholds"]["operating"] = 0.0
    (model / "model.json").write_text(json.dumps(manifest, indent=2))

    def cli(name: str, *args: str) -> None:
        out = subprocess.run(
            [*PDAC, "-vv", *args], env=env, capture_output=True, text=True, timeout=900
        )
        (logs / f"{name}.log").write_text(out.stdout + out.stderr)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    try:
        cli(
            "sweep",
            "sweep",
            str(archive / "dicom"),
            "--store",
            str(store),
            "--demo-key",
            "--hash-paths",
            "--model",
            str(model),
            "--actors",
            "1",
            "--flush-every",
            "2",
        )
        cli("worklist", "worklist", str(store), "--out", str(base / "worklist"))
        cli(
            "evaluate",
            "evaluate",
            str(store),
            "--labels",
            str(archive / "truth.parquet"),
            "--out",
            str(base / "evaluation"),
            "--bootstrap",
            "20",
        )
        ray_copy = base / "ray"
        shutil.copytree(ray_tmp, ray_copy, symlinks=True, ignore=shutil.ignore_patterns("sockets"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    yield {"base": base, "archive": archive, "store": store, "planted": _planted(archive)}


def test_the_archive_really_carries_the_identifiers(swept):
    import pydicom

    archive, planted = swept["archive"], swept["planted"]
    phi = pd.read_parquet(archive / "phi.parquet")
    assert set(phi["field"]) >= {"patient_name", "private_tag", "request_description"}
    files = [p for p in (archive / "dicom").rglob("*") if p.is_file() and p.suffix != ".txt"]
    ds = pydicom.dcmread(files[0])
    row = phi[(phi["study_instance_uid"] == ds.StudyInstanceUID)].set_index("field")["value"]
    assert str(ds.PatientName) == row["patient_name"]
    assert (
        ds.RequestAttributesSequence[0].RequestedProcedureDescription == row["request_description"]
    )
    assert row["private_tag"].encode() in files[0].read_bytes()
    assert row["series_description"] in str(ds.SeriesDescription)
    assert any(row["patient_name"] in p.as_posix() for p in files)  # folders named after them
    scs = [p for p in files if p.name.startswith("SC")]
    assert len(scs) == 3 and pydicom.dcmread(scs[0]).BurnedInAnnotation == "YES"
    # the search works: it finds the identifiers in the archive itself
    assert _hits(files[:2], planted)
    # and the sweep screened the studies
    from pdacscreen.io.store import FindingsStore

    df = FindingsStore(swept["store"]).read_findings()
    assert len(df) == 3 and (df["status"] == "ok").sum() >= 2, df[["status", "error_code"]]


def test_no_identifier_in_findings_failures_evidence_or_sweep_records(swept):
    store = swept["store"]
    outputs = _files(
        store / "findings",
        store / "failures",
        store / "evidence",
        store / "sweeps",
        store / "dicom_exports",
    )
    assert any(p.suffix == ".parquet" for p in outputs)
    evidence = [p for p in outputs if "evidence" in p.parts]
    assert any(p.suffix == ".png" for p in evidence) and any(p.suffix == ".gz" for p in evidence)
    assert any("dicom_exports" in p.parts for p in outputs)
    assert _hits(outputs, swept["planted"]) == []
    # SEG/SR go back to the source PACS and carry the source study's patient module BY DESIGN
    # (README, "From a PACS"); their contents are not searched, but their names are.
    results = sorted(store.glob("dicom/**/*.dcm"))
    assert results, "no SEG/SR was written"
    names = "\n".join(str(p.relative_to(store)) for p in results)
    assert [(f, v) for f, v in swept["planted"] if v.lower() in names.lower()] == []
    # the bad file in the patient-named folder is a failures row named by a keyed hash
    from pdacscreen.io.store import FindingsStore

    fails = FindingsStore(store).read_failures()
    assert (fails["error_code"] == "not_dicom").any()
    assert fails["path"].dropna().str.startswith("path:").all(), fails["path"]


def test_no_identifier_in_the_index_but_its_paths(swept):
    files = _files(swept["store"] / "index")
    assert files
    assert _hits(files, swept["planted"], skip_columns=("path",)) == []


def test_no_identifier_in_worklist_or_evaluation(swept):
    base = swept["base"]
    files = _files(base / "worklist", base / "evaluation")
    assert any(p.name == "worklist.html" for p in files) and any(
        p.name == "worklist.csv" for p in files
    )
    assert any("evaluation" in p.parts for p in files)
    assert _hits(files, swept["planted"]) == []


def test_no_identifier_in_logs_prefect_home_or_ray_logs(swept):
    base = swept["base"]
    logs = _files(base / "logs")
    assert "DEBUG" in (base / "logs" / "sweep.log").read_text()  # logs were captured at DEBUG
    prefect = _files(base / "state" / "prefect")
    assert any(p.name.endswith(".db") for p in prefect), prefect  # the Prefect database
    ray = _files(base / "ray")
    assert any(p.suffix in (".log", ".out", ".err") for p in ray), ray[:20]
    assert _hits(logs + prefect + ray, swept["planted"]) == []


def test_failure_paths_carry_names_unless_hashed(swept):
    """Measured: without --hash-paths a failures row names a patient-named folder verbatim."""
    from pdacscreen.flows.config import SweepConfig
    from pdacscreen.flows.sweep import build_config, file_failures
    from pdacscreen.io.index import read_index
    from pdacscreen.io.pseudonym import DEMO_KEY
    from pdacscreen.io.store import FindingsStore

    base, archive = swept["base"], swept["archive"]
    index = read_index(FindingsStore(swept["store"]).index_dir)
    plain = base / "plain-store"
    assert file_failures.fn(index, str(plain), "measure-1") >= 1
    names = [v for f, v in swept["planted"] if f.startswith("patient_name of")]
    leaked = FindingsStore(plain).read_failures()["path"].dropna()
    assert any(any(n in p for n in names) for p in leaked), leaked  # the leak this mode closes
    config: SweepConfig = build_config(
        archive=str(archive / "dicom"),
        store=str(base / "hashed-store"),
        pseudonym_key=DEMO_KEY,
        hash_paths=True,
    )
    assert file_failures.fn(index, str(config.store), "measure-2", config) >= 1
    hashed = FindingsStore(config.store).read_failures()
    assert hashed["path"].str.startswith("path:").all()
    assert _hits(_files(config.store), swept["planted"]) == []
    # recorded once: a second pass over the same index adds nothing (tokens compared)
    assert file_failures.fn(index, str(config.store), "measure-3", config) == 0
