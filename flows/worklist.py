"""``pdacscreen worklist STORE [--since DATE] [--out DIR]``: a radiologist's list of flagged studies.

Rows: the latest ``ok`` row per study and model (``latest_findings``) with ``pdac_flag`` set, swept on
or after ``--since`` (a ``sweep_date``), ranked by ``pdac_probability`` (highest first). Each row shows
the pseudonymous accession key, study date, lesion size and location, QC flags and the key image
(``<evidence_path>/key.png``). Writes ``worklist.html``, which opens from disk with no server (key
images embedded as base64 by default, or linked by relative path with ``--link-images``), and
``worklist.csv``.

Below the ranked list, **needs a look**: the latest row of each study (``ok`` or ``not_assessable``)
that is *not* flagged but carries a QC flag saying the screen may not have covered the gland
(:data:`LOOK_FLAGS`: ``partial_localisation``, ``low_localisation_confidence``,
``pancreas_cut_by_fov``, ``pancreas_not_found``), so a partially screened study is never reported
as a silent negative; also written as ``needs_a_look.csv``.

Each row links the study's DICOM results when the sweep wrote them (``STORE/dicom_exports/``):
``seg_path`` / ``sr_path`` (relative to STORE; the page links them relative to itself),
``dicom_export_status`` (the status that most needs attention of the two objects: failed,
skipped, written, then sent) and, for a study from a DICOMweb source, ``pacs_study_url``: the
study's DICOMweb resource (``<service root>/studies/<StudyInstanceUID>``, no credentials).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import logging
import os
from pathlib import Path

import pandas as pd

from pdacscreen.flows.query import connect, to_arrow
from pdacscreen.io.dicom.export import read_exports
from pdacscreen.io.dicomweb import PREFIX
from pdacscreen.io.errors import InputError, PdacscreenError

__all__ = [
    "KEY_IMAGE",
    "LOOK_FLAGS",
    "add_arguments",
    "flagged_studies",
    "needs_a_look",
    "run",
    "write_worklist",
]

log = logging.getLogger(__name__)

KEY_IMAGE = "key.png"
COLUMNS = (
    "rank",
    "pdac_probability",
    "accession_key",
    "study_date",
    "lesion_diameter_mm",
    "lesion_location",
    "lesion_volume_ml",
    "qc_flags",
    "phase_estimate",
    "manufacturer",
    "slice_thickness_mm",
    "sweep_date",
    "model_name",
    "model_version",
    "study_instance_uid",
    "key_image",
    "seg_path",
    "sr_path",
    "dicom_export_status",
    "pacs_study_url",
)
#: QC flags (engine.postprocess.QC_FLAGS) that put an unflagged study under "needs a look": the
#: detector's score may not cover the whole gland
LOOK_FLAGS = (
    "partial_localisation",
    "low_localisation_confidence",
    "pancreas_cut_by_fov",
    "pancreas_not_found",
)
LOOK_COLUMNS = (
    "accession_key",
    "study_date",
    "status",
    "pdac_probability",
    "qc_flags",
    "sweep_date",
    "model_name",
    "model_version",
    "study_instance_uid",
)
_LOOK_SQL = f"""
SELECT {", ".join(LOOK_COLUMNS)}
FROM latest_findings
WHERE status IN ('ok', 'not_assessable') AND NOT coalesce(pdac_flag, false)
  AND list_has_any(qc_flags, ?::VARCHAR[])
  AND (CAST(? AS DATE) IS NULL OR sweep_date >= CAST(? AS DATE))
ORDER BY sweep_date DESC, study_instance_uid
"""
#: which export status a study shows when its two objects differ (most needing attention first)
_STATUS_ORDER = ("failed", "skipped", "written", "sent")

_SQL = """
SELECT row_number() OVER (ORDER BY pdac_probability DESC, study_instance_uid) AS rank,
       pdac_probability, accession_key, study_date, lesion_diameter_mm, lesion_location,
       lesion_volume_ml, qc_flags, phase_estimate, manufacturer, slice_thickness_mm, sweep_date,
       model_name, model_version, study_instance_uid, evidence_path, config_hash
FROM latest_findings
WHERE status = 'ok' AND pdac_flag AND (CAST(? AS DATE) IS NULL OR sweep_date >= CAST(? AS DATE))
ORDER BY rank
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse} td,th{border:1px solid #bbb;padding:0.3em 0.6em;vertical-align:top}
th{background:#eee;text-align:left} .num{text-align:right;font-variant-numeric:tabular-nums}
.flags span{display:inline-block;background:#fde7c8;border-radius:3px;padding:0 0.3em;margin:1px}
img.key{max-width:220px;image-rendering:auto;border:1px solid #ccc} .note{color:#8a4b00}
"""


def flagged_studies(store: Path | str, *, since: dt.date | None = None) -> pd.DataFrame:
    """Flagged studies ranked by probability (see the module docstring), with ``key_image`` paths."""
    root = Path(store)
    con = connect(root)
    try:
        arg = since.isoformat() if since else None
        df = to_arrow(con.sql(_SQL, params=[arg, arg])).to_pandas()
    finally:
        con.close()
    df["key_image"] = [_key_image(root, e) for e in df.pop("evidence_path")]
    df = _with_dicom_results(df, root)
    return df[list(COLUMNS)]


def needs_a_look(store: Path | str, *, since: dt.date | None = None) -> pd.DataFrame:
    """Unflagged studies with a :data:`LOOK_FLAGS` QC flag (see the module docstring)."""
    con = connect(Path(store))
    try:
        arg = since.isoformat() if since else None
        return to_arrow(con.sql(_LOOK_SQL, params=[list(LOOK_FLAGS), arg, arg])).to_pandas()
    finally:
        con.close()


def _with_dicom_results(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """``df`` with the DICOM result columns of each row's (study, model version, config hash)."""
    ex = read_exports(root)
    keys = ["study_instance_uid", "model_version", "config_hash"]
    links: dict[tuple, dict[str, object]] = {}
    for key, events in ex.groupby(keys, sort=False):
        entry: dict[str, object] = {}
        statuses = []
        for obj, mine in events.groupby("object", sort=False):
            written = mine[(mine["status"] == "written") & mine["path"].notna()]
            if len(written):
                entry[f"{obj}_path"] = str(written.iloc[-1]["path"])
                source = written.iloc[-1]["source"]
                if isinstance(source, str) and source.startswith(PREFIX):
                    url = source.removeprefix(PREFIX).rstrip("/")
                    entry["pacs_study_url"] = f"{url}/studies/{key[0]}"
            statuses.append(str(mine.iloc[-1]["status"]))
        entry["dicom_export_status"] = next(s for s in _STATUS_ORDER if s in statuses)
        links[key] = entry
    for col in ("seg_path", "sr_path", "dicom_export_status", "pacs_study_url"):
        df[col] = [
            links.get(tuple(r), {}).get(col) for r in df[keys].itertuples(index=False, name=None)
        ]
    return df.drop(columns=["config_hash"])


def _dicom_cell(row, root: Path, out: Path) -> str:
    links = []
    for col, label in (("seg_path", "SEG"), ("sr_path", "SR")):
        path = getattr(row, col)
        if isinstance(path, str) and path and (root / path).is_file():
            href = Path(os.path.relpath(root / path, out)).as_posix()
            links.append(f"<a class='{label.lower()}' href='{html.escape(href)}'>{label}</a>")
    url = row.pacs_study_url
    if isinstance(url, str) and url:
        links.append(f"<a class='pacs' href='{html.escape(url)}'>PACS study</a>")
    status = row.dicom_export_status
    if isinstance(status, str) and status:
        links.append(f"<span class='export'>{html.escape(status)}</span>")
    return " ".join(links) or "<span class='note'>none</span>"


def _key_image(root: Path, evidence: object) -> str | None:
    if not isinstance(evidence, str) or not evidence:
        return None
    folder = Path(evidence)
    path = (folder if folder.is_absolute() else root / folder) / KEY_IMAGE
    return str(path) if path.is_file() else None


def _img(path: object, out: Path, *, embed: bool) -> str:
    if not isinstance(path, str) or not path:
        return "<span class='note'>no key image</span>"
    if embed:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = Path(os.path.relpath(path, out)).as_posix()
    return (
        f"<img class='key' alt='key image' src='{html.escape(src)}' "
        "onload=\"this.dataset.loaded='1'\" "
        "onerror=\"this.dataset.loaded='error';this.alt='key image could not be loaded'\">"
    )


def _flags(value: object) -> list[str]:
    return [] if value is None else [str(v) for v in value]


def _fmt(value: object, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _look_section(look: pd.DataFrame | None, out: Path) -> list[str]:
    """The "needs a look" table (and ``needs_a_look.csv``); nothing when ``look`` is None."""
    if look is None:
        return []
    csv = look.copy()
    csv["qc_flags"] = [";".join(_flags(f)) for f in csv["qc_flags"]]
    csv.to_csv(out / "needs_a_look.csv", index=False)
    rows = []
    for r in look.itertuples(index=False):
        flags = "".join(f"<span>{html.escape(f)}</span>" for f in _flags(r.qc_flags))
        rows.append(
            f"<tr class='look' data-study='{html.escape(r.study_instance_uid)}'>"
            f"<td>{_fmt(r.accession_key)}</td><td>{_fmt(r.study_date)}</td>"
            f"<td>{_fmt(r.status)}</td><td class='num'>{_fmt(r.pdac_probability, 3)}</td>"
            f"<td class='flags'>{flags}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("accession key", "study date", "status", "probability", "QC flags")
    )
    return [
        f"<h2>Needs a look: {len(look)}</h2>",
        "<p class='note'>Not flagged, but the screen may not have covered the whole pancreas "
        "(QC flags); the probability of a partially screened study is not a negative.</p>",
        f"<table id='needs-a-look'><thead><tr>{head}</tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ]


def write_worklist(
    rows: pd.DataFrame,
    out: Path,
    *,
    store: Path,
    since: dt.date | None,
    embed: bool = True,
    look: pd.DataFrame | None = None,
) -> tuple[Path, Path]:
    """Write ``worklist.html`` and ``worklist.csv`` into ``out`` (and, with ``look``, the
    "needs a look" section and ``needs_a_look.csv``); returns the first two paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv = rows.copy()
    csv["qc_flags"] = [";".join(_flags(f)) for f in csv["qc_flags"]]
    csv.to_csv(out / "worklist.csv", index=False)
    body = []
    for r in rows.itertuples(index=False):
        flags = "".join(f"<span>{html.escape(f)}</span>" for f in _flags(r.qc_flags))
        size = _fmt(r.lesion_diameter_mm)
        body.append(
            f"<tr class='study' data-rank='{r.rank}' data-study='{html.escape(r.study_instance_uid)}'>"
            f"<td class='num'>{r.rank}</td><td class='num'>{_fmt(r.pdac_probability, 3)}</td>"
            f"<td>{_fmt(r.accession_key)}</td><td>{_fmt(r.study_date)}</td>"
            f"<td class='num'>{size + ' mm' if size else ''}</td><td>{_fmt(r.lesion_location)}</td>"
            f"<td class='flags'>{flags}</td><td>{_fmt(r.phase_estimate)}</td>"
            f"<td>{_fmt(r.manufacturer)}<br>{_fmt(r.slice_thickness_mm, 2)} mm</td>"
            f"<td>{_img(r.key_image, out, embed=embed)}</td>"
            f"<td class='dicom'>{_dicom_cell(r, Path(store), out)}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "#",
            "probability",
            "accession key",
            "study date",
            "lesion size",
            "location",
            "QC flags",
            "phase",
            "scanner",
            "key image",
            "DICOM results",
        )
    )
    models = ", ".join(
        sorted({f"{a} {b}" for a, b in zip(rows.model_name, rows.model_version, strict=True)})
    )
    missing = int(rows["key_image"].isna().sum())
    page = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>pdacscreen worklist ({len(rows)})</title><style>{_CSS}</style></head><body>",
        f"<h1>Flagged studies: {len(rows)}</h1>",
        "<p class='note'>Research software, not a clinical device. Keys are pseudonymous.</p>",
        f"<p>Store {html.escape(str(store))}; sweeps since {since or 'the first'}; "
        f"model {html.escape(models or 'n/a')}; ranked by probability.</p>",
        f"<p class='note'>{missing} row(s) without a key image.</p>" if missing else "",
        f"<table id='worklist'><thead><tr>{head}</tr></thead><tbody>",
        *body,
        "</tbody></table>",
        *_look_section(look, out),
        "</body></html>",
    ]
    html_path = out / "worklist.html"
    html_path.write_text("\n".join(page), encoding="utf-8")
    return html_path, out / "worklist.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="findings store folder (STORE)")
    parser.add_argument(
        "--since", default=None, help="only sweeps on or after this date (YYYY-MM-DD)"
    )
    parser.add_argument("--out", type=Path, default=Path("worklist"), help="output folder")
    parser.add_argument(
        "--link-images", action="store_true", help="link key images by relative path (smaller page)"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console, err = Console(), Console(stderr=True)
    try:
        since = None
        if args.since:
            try:
                since = dt.date.fromisoformat(args.since)
            except ValueError as e:
                raise InputError(f"--since must be a date YYYY-MM-DD, got {args.since!r}") from e
        rows = flagged_studies(args.store, since=since)
        look = needs_a_look(args.store, since=since)
    except PdacscreenError as e:
        err.print(f"[red]{e.code}:[/red] {e}", highlight=False)
        return 2
    html_path, csv_path = write_worklist(
        rows, args.out, store=args.store, since=since, embed=not args.link_images, look=look
    )
    console.print(
        f"{len(rows)} flagged studies, {len(look)} needing a look -> {html_path} and {csv_path}"
    )
    return 0
