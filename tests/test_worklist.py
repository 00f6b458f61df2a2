"""``pdacscreen worklist``: ranking, CSV, and the page rendered in headless Chromium."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from synthetic_store import make_synthetic_findings

from pdacscreen.flows.cli import main
from pdacscreen.flows.worklist import flagged_studies

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("wl") / "store"
    g = make_synthetic_findings(root, 300, seed=21, evidence=True)
    # One flagged study loses its key image: the page must say so, not break.
    df = g.store.read_findings()
    flagged = df[df.pdac_flag == True].sort_values("pdac_probability")  # noqa: E712
    (g.store.root / flagged.iloc[0]["evidence_path"] / "key.png").unlink()
    return g


def expected(df: pd.DataFrame, since: dt.date | None = None) -> pd.DataFrame:
    keep = (df.status == "ok") & (df.pdac_flag == True)  # noqa: E712
    if since:
        keep &= df.sweep_date >= since
    return df[keep].sort_values(["pdac_probability", "study_instance_uid"], ascending=[False, True])


def test_ranked_flagged_studies_and_since(gen):
    df = gen.store.read_findings()
    rows = flagged_studies(gen.store.root)
    want = expected(df)
    assert len(rows) == len(want) > 5
    assert list(rows.study_instance_uid) == list(want.study_instance_uid)
    assert list(rows["rank"]) == list(range(1, len(rows) + 1))
    assert np.all(np.diff(rows.pdac_probability.to_numpy()) <= 0)
    assert rows.key_image.isna().sum() == 1
    since = dt.date(2025, 3, 2)
    later = flagged_studies(gen.store.root, since=since)
    assert list(later.study_instance_uid) == list(expected(df, since).study_instance_uid)
    assert 0 < len(later) < len(rows)


def test_cli_writes_csv_and_html(gen, tmp_path):
    out = tmp_path / "wl"
    assert main(["worklist", str(gen.store.root), "--out", str(out)]) == 0
    csv = pd.read_csv(out / "worklist.csv")
    want = expected(gen.store.read_findings())
    assert list(csv.accession_key) == list(want.accession_key)
    for col in (
        "accession_key",
        "study_date",
        "lesion_diameter_mm",
        "lesion_location",
        "qc_flags",
        "key_image",
    ):
        assert col in csv.columns
    page = (out / "worklist.html").read_text()
    assert page.count("<tr class='study'") == len(want)
    assert page.count("data:image/png;base64,") == len(want) - 1 and "no key image" in page
    assert main(["worklist", str(gen.store.root), "--since", "March 2"]) == 2


def _chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (run infra/setup-browser as root)"
)
@pytest.mark.parametrize("link", [False, True], ids=["embedded", "linked"])
def test_page_renders_rows_and_images_in_chromium(gen, tmp_path, link):
    from PIL import Image

    out = tmp_path / "wl"
    assert (
        main(
            [
                "worklist",
                str(gen.store.root),
                "--out",
                str(out),
                *(["--link-images"] if link else []),
            ]
        )
        == 0
    )
    url = (out / "worklist.html").resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path).stdout
    want = expected(gen.store.read_findings())
    rows = re.findall(r'<tr class="study" data-rank="(\d+)"', dom)
    assert [int(r) for r in rows] == list(range(1, len(want) + 1))
    keys = re.findall(r"<td>(ak\d+)</td>", dom)
    assert keys == list(want.accession_key)
    loaded = re.findall(r'data-loaded="([a-z0-9]+)"', dom)
    assert loaded == ["1"] * (len(want) - 1), loaded  # every key image decoded by the browser
    shot = tmp_path / "shot.png"
    _chromium(["--window-size=1280,2400", f"--screenshot={shot}", url], tmp_path)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.std() > 20  # not blank
    # The key images' dark background (grey 40) and bright disc (grey 220) are on the screen.
    dark = np.all(np.abs(img - 40) <= 3, axis=-1).sum()
    bright = np.all(np.abs(img - 220) <= 3, axis=-1).sum()
    assert dark > 2000 and bright > 500, (dark, bright)


def test_rows_carry_their_dicom_results_and_pacs_study(gen, tmp_path):
    """Export records (as the sweep appends them) become the rows' SEG/SR paths, status and
    PACS study URL; the page links a file only when it is in the store."""
    from pdacscreen.flows.worklist import write_worklist
    from pdacscreen.io.dicom.export import ExportRecord, append_exports

    root = gen.store.root
    df = gen.store.read_findings()
    top = expected(df).iloc[:2]
    source = "dicomweb+http://pacs.example:8042/dicom-web"
    records = []
    for r in top.itertuples():
        for obj in ("seg", "sr"):
            rec = ExportRecord(
                study_instance_uid=r.study_instance_uid,
                object=obj,
                action="write",
                status="written",
                sop_instance_uid=f"2.25.{len(records) + 1}",
                path=f"dicom/{r.study_instance_uid}/{obj}-2.25.{len(records) + 1}.dcm",
                source=source,
            ).row()
            records.append({**rec, "model_version": r.model_version, "config_hash": r.config_hash})
    first = top.iloc[0]
    sent = [
        {**rec, "action": "send", "status": "sent"}
        for rec in records
        if rec["study_instance_uid"] == first.study_instance_uid
    ]
    failed = [
        {**rec, "action": "send", "status": "failed", "error_code": "source_unauthorized"}
        for rec in records
        if rec["study_instance_uid"] != first.study_instance_uid
    ]
    store = tmp_path / "store"
    shutil.copytree(root, store)
    append_exports(store, records, sweep_id="20250401T000000Z-t")
    append_exports(store, sent + failed, sweep_id="20250401T000001Z-t")
    (store / records[0]["path"]).parent.mkdir(parents=True)
    (store / records[0]["path"]).write_bytes(b"")  # only the first SEG file is in the store
    rows = flagged_studies(store)
    by = rows.set_index("study_instance_uid")
    a, b = by.loc[first.study_instance_uid], by.loc[top.iloc[1].study_instance_uid]
    assert a.seg_path == records[0]["path"] and a.sr_path == records[1]["path"]
    assert (a.dicom_export_status, b.dicom_export_status) == ("sent", "failed")
    assert (
        a.pacs_study_url == f"http://pacs.example:8042/dicom-web/studies/{first.study_instance_uid}"
    )
    assert rows.seg_path.notna().sum() == 2  # the other flagged studies have none
    html_path, csv_path = write_worklist(rows, tmp_path / "wl", store=store, since=None)
    page = html_path.read_text()
    assert page.count("class='seg'") == 1 and page.count("class='sr'") == 0
    assert page.count("class='pacs'") == 2 and "failed" in page
    assert "seg_path" in pd.read_csv(csv_path).columns


def test_partial_localisation_study_needs_a_look(gen, tmp_path):
    """An unflagged study whose latest row says the screen did not cover the gland is listed
    under "needs a look" (page and CSV); a flagged one stays on the ranked list only."""
    from pdacscreen.flows.worklist import LOOK_FLAGS, needs_a_look, write_worklist
    from pdacscreen.io.store import FindingsStore

    store = tmp_path / "store"
    shutil.copytree(gen.store.root, store)
    st = FindingsStore(store)
    df = st.read_findings()
    assert len(needs_a_look(store)) == 0  # the synthetic store has none of LOOK_FLAGS
    ok = df[df.status == "ok"]
    quiet = ok[ok.pdac_flag == False].iloc[0]  # noqa: E712
    loud = ok[ok.pdac_flag == True].iloc[0]  # noqa: E712
    later = df.processed_at.max() + pd.Timedelta(hours=1)
    rows = []
    for r, flags in ((quiet, ["partial_localisation"]), (loud, ["partial_localisation"])):
        drop = ("sweep_id", "sweep_date", "model_version", "config_hash")
        row = {k: v for k, v in r.items() if k not in drop}
        row.update(processed_at=later.to_pydatetime(), qc_flags=flags)
        rows.append(
            {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        )
    st.append_findings(
        rows,
        sweep_id="20250401T000000Z-look",
        sweep_date=dt.date(2025, 4, 1),
        model_version=quiet.model_version,
        config_hash=quiet.config_hash,
    )
    look = needs_a_look(store)
    assert list(look.study_instance_uid) == [quiet.study_instance_uid]
    assert (
        list(look.qc_flags.iloc[0]) == ["partial_localisation"]
        and "partial_localisation" in LOOK_FLAGS
    )
    flagged = flagged_studies(store)
    assert loud.study_instance_uid in set(flagged.study_instance_uid)
    assert quiet.study_instance_uid not in set(flagged.study_instance_uid)
    html_path, _ = write_worklist(flagged, tmp_path / "wl", store=store, since=None, look=look)
    page = html_path.read_text()
    assert "Needs a look: 1" in page and page.count("<tr class='look'") == 1
    assert f"data-study='{quiet.study_instance_uid}'" in page
    csv = pd.read_csv(tmp_path / "wl" / "needs_a_look.csv")
    assert list(csv.qc_flags) == ["partial_localisation"]
    assert main(["worklist", str(store), "--out", str(tmp_path / "cli")]) == 0
    assert "Needs a look: 1" in (tmp_path / "cli" / "worklist.html").read_text()
