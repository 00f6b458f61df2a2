"""Series selection: per study, the series the non-contrast engine reads (rules and ranking only).

Rules are declarative and versioned (:file:`selection_rules.json`, overridable by a JSON file that
changes only some keys).  :func:`select_series` groups an index (see :mod:`pdacscreen.io.index`)
by study and series and checks each series against every rule, collecting *all* reasons it fails
(``"code: detail"`` strings).  Eligible series are ranked: explicit non-contrast description
first, then soft-tissue kernel before unknown before sharp, then thinner slices, more slices,
larger z-coverage, and the UID for a stable order.  A study without an eligible series is
returned with ``status == "no_eligible_series"`` and the reasons, never dropped.

Contrast by tags: the SeriesDescription is matched against non-contrast patterns first (many
languages: "nativ", "w/o", "NC", "sin contraste", "ohne KM", ...); if none matches, contrast
patterns ("PV", "arterial", "C+", "KM", ...) reject the series.  A ContrastBolusAgent (other than
"none"-like values) with a neutral description rejects it under ``contrast_agent_policy:
"reject"``; under the default "demote" (DOMAIN.md: the tag is often wrong) the series stays
eligible but ranks after every other candidate, and the image phase check has the last word.
Because tags are often wrong, the loader measures the image itself once
(:func:`pdacscreen.kernels.measure.measure_phase`, with this file's ``phase_check`` thresholds), and
:meth:`PhaseRules.action` says what happens to a series whose image shows contrast although its
tags said non-contrast (``on_phase_mismatch``: "flag" or "reject").
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from pdacscreen.io.errors import InputError

__all__ = [
    "DEFAULT_RULES",
    "PhaseRules",
    "SelectionRules",
    "SeriesCandidate",
    "StudySelection",
    "load_rules",
    "select_series",
]

log = logging.getLogger(__name__)

DEFAULT_RULES = Path(__file__).with_name("selection_rules.json")


@dataclass(frozen=True)
class PhaseRules:
    """Image phase check: blood pool < ``noncontrast_max_hu`` -> non-contrast, >
    ``contrast_min_hu`` -> contrast, in between -> indeterminate."""

    noncontrast_max_hu: float = 70.0
    contrast_min_hu: float = 100.0
    on_phase_mismatch: str = "flag"

    def action(self, estimate: str) -> str:
        """What happens to a series the rules chose as non-contrast, given its image's phase:
        "accept" (non-contrast or indeterminate), else ``on_phase_mismatch`` ("flag" | "reject")."""
        return self.on_phase_mismatch if estimate == "contrast" else "accept"


@dataclass(frozen=True)
class SelectionRules:
    """Read-only view of a rules file (see :file:`selection_rules.json` for the defaults)."""

    version: str
    sop_class_uids: tuple[str, ...]
    modalities: tuple[str, ...]
    image_type_required: tuple[str, ...]
    image_type_forbidden: tuple[str, ...]
    description_forbidden: tuple[str, ...]
    max_obliquity_deg: float
    max_slice_thickness_mm: float
    min_z_coverage_mm: float
    min_slices: int
    noncontrast_description: tuple[str, ...]
    contrast_description: tuple[str, ...]
    contrast_agent_negative: tuple[str, ...]
    contrast_agent_policy: str
    kernel_soft: tuple[str, ...]
    kernel_sharp: tuple[str, ...]
    phase_check: PhaseRules = field(default_factory=PhaseRules)
    description: str = ""
    source: str = ""
    sha256: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def load_rules(path: Path | None = None) -> SelectionRules:
    """Rules from ``path`` laid over the shipped defaults (``None``: the defaults alone).

    Unknown keys, bad regexes and out-of-range values raise :class:`InputError` naming them.
    """
    base = json.loads(DEFAULT_RULES.read_text(encoding="utf-8"))
    blob = DEFAULT_RULES.read_bytes()
    source = str(DEFAULT_RULES)
    if path is not None:
        path = Path(path)
        try:
            blob = path.read_bytes()
            over = json.loads(blob)
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"rules file {str(path)!r} cannot be read as JSON: {e}") from e
        names = {f.name for f in fields(SelectionRules)}
        unknown = sorted(set(over) - names)
        if unknown:
            raise InputError(
                f"rules file {str(path)!r}: unknown key(s) {unknown}; allowed: "
                f"{sorted(names - {'source', 'sha256'})}"
            )
        if "phase_check" in over:
            over["phase_check"] = {**base["phase_check"], **over["phase_check"]}
        if "version" not in over:
            raise InputError(f"rules file {str(path)!r} must set its own 'version'")
        base.update(over)
        source = str(path)
    pc = PhaseRules(**base.pop("phase_check"))
    if pc.on_phase_mismatch not in ("flag", "reject"):
        raise InputError(
            f"phase_check.on_phase_mismatch={pc.on_phase_mismatch!r} is not allowed; "
            "use 'flag' or 'reject'"
        )
    if base.get("contrast_agent_policy") not in ("demote", "reject"):
        raise InputError(
            f"contrast_agent_policy={base.get('contrast_agent_policy')!r} is not "
            "allowed; use 'demote' or 'reject'"
        )
    if not pc.noncontrast_max_hu <= pc.contrast_min_hu:
        raise InputError(
            "phase_check: noncontrast_max_hu must be <= contrast_min_hu, got "
            f"{pc.noncontrast_max_hu} > {pc.contrast_min_hu}"
        )
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in base.items()}
    rules = SelectionRules(
        **kw, phase_check=pc, source=source, sha256=hashlib.sha256(blob).hexdigest()
    )
    for name in (
        "description_forbidden",
        "noncontrast_description",
        "contrast_description",
        "kernel_soft",
        "kernel_sharp",
    ):
        for rx in getattr(rules, name):
            try:
                re.compile(rx)
            except re.error as e:
                raise InputError(f"rules {name}: bad regex {rx!r}: {e}") from e
    return rules


@dataclass(frozen=True)
class SeriesCandidate:
    """An eligible series with the facts it was ranked by."""

    series_instance_uid: str
    n_files: int
    slice_thickness_mm: float | None
    z_coverage_mm: float
    convolution_kernel: str | None
    kernel_class: str  # "soft" | "unknown" | "sharp"
    series_description: str | None
    contrast_evidence: str  # "noncontrast_description" | "none" | "contrast_agent_tag"
    series_number: int | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudySelection:
    """The choice for one study. ``files``: paths of the chosen series (any order)."""

    study_instance_uid: str
    patient_key: str
    study_date: str | None
    series_instance_uid: str | None
    files: tuple[str, ...]
    candidates: tuple[SeriesCandidate, ...]
    rejections: dict[str, tuple[str, ...]]
    status: str  # "selected" | "no_eligible_series"
    rules_version: str = ""


def _search(patterns: tuple[str, ...], text: str | None) -> str | None:
    if not text:
        return None
    for rx in patterns:
        if re.search(rx, text, flags=re.IGNORECASE):
            return rx
    return None


def _first(values: pd.Series):
    v = values.dropna()
    return v.mode().iloc[0] if len(v) else None


def _series_facts(
    g: pd.DataFrame, rules: SelectionRules
) -> tuple[SeriesCandidate | None, list[str]]:
    """Check one series (its index rows) against the rules: (candidate or None, reasons)."""
    reasons: list[str] = []
    ok = g[g["status"] == "ok"]
    bad = g[g["status"] != "ok"]
    # A bad copy of an instance that is also there intact (same SOPInstanceUID: a stray truncated
    # copy) does not count against the series; it stays a failures row of its own (index stage).
    bad = bad[~bad["sop_instance_uid"].isin(ok["sop_instance_uid"].dropna())]
    if len(bad):
        codes = sorted(set(bad["error_code"].fillna("error")))
        reasons.append(f"bad_files: {len(bad)} of {len(g)} files unusable ({', '.join(codes)})")
    sop = _first(ok["sop_class_uid"] if len(ok) else g["sop_class_uid"])
    if ok.empty:
        if sop is not None and sop not in rules.sop_class_uids:
            reasons.append(f"sop_class: {sop} is not one of {list(rules.sop_class_uids)}")
        return None, reasons
    if sop not in rules.sop_class_uids:
        reasons.append(f"sop_class: {sop} is not one of {list(rules.sop_class_uids)}")
    mod = _first(ok["modality"])
    if mod not in rules.modalities:
        reasons.append(f"modality: {mod} is not one of {list(rules.modalities)}")
    itype = _first(ok["image_type"]) or ""
    tokens = {t.strip().upper() for t in itype.split("\\")}
    missing = [t for t in rules.image_type_required if t not in tokens]
    if missing:
        reasons.append(f"image_type: {itype!r} lacks {missing}")
    forb = sorted(tokens & set(rules.image_type_forbidden))
    if forb:
        reasons.append(f"image_type: {itype!r} contains {forb}")
    desc = _first(ok["series_description"])
    rx = _search(rules.description_forbidden, desc)
    if rx:
        reasons.append(f"description: {desc!r} matches excluded pattern {rx!r}")
    # geometry from header positions
    iop = next((v for v in ok["image_orientation_patient"] if v is not None and len(v) == 6), None)
    z_cov = 0.0
    step = None
    if iop is None:
        reasons.append("orientation: ImageOrientationPatient missing")
    else:
        iop = np.asarray(iop, float)
        normal = np.cross(iop[:3], iop[3:])
        normal /= np.linalg.norm(normal) or 1.0
        obl = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
        if obl > rules.max_obliquity_deg:
            reasons.append(
                f"orientation: not axial (normal {obl:.0f} deg from the z axis; "
                f"max {rules.max_obliquity_deg:g})"
            )
        ipp = [v for v in ok["image_position_patient"] if v is not None and len(v) == 3]
        if ipp:
            d = np.unique(np.round(np.asarray(ipp, float) @ normal, 3))
            step = float(np.median(np.diff(d))) if len(d) > 1 else None
            z_cov = float(d[-1] - d[0] + (step or 0.0))
    thick = ok["slice_thickness"].dropna()
    thickness = float(thick.median()) if len(thick) else step
    if thickness is None:
        reasons.append("slice_thickness: unknown (no SliceThickness, single position)")
    elif thickness > rules.max_slice_thickness_mm + 1e-6:
        reasons.append(f"slice_thickness: {thickness:g} mm > {rules.max_slice_thickness_mm:g} mm")
    if len(ok) < rules.min_slices:
        reasons.append(f"too_few_slices: {len(ok)} < {rules.min_slices}")
    if z_cov < rules.min_z_coverage_mm:
        reasons.append(f"z_coverage: {z_cov:.0f} mm < {rules.min_z_coverage_mm:g} mm")
    # contrast by tags and description
    notes: list[str] = []
    agent = _first(ok["contrast_bolus_agent"])
    agent_c = agent is not None and agent.strip().lower() not in rules.contrast_agent_negative
    nc_rx = _search(rules.noncontrast_description, desc)
    evidence = "none"
    if nc_rx:
        evidence = "noncontrast_description"
        if agent_c:
            notes.append(f"ContrastBolusAgent={agent!r} although the description says non-contrast")
    else:
        c_rx = _search(rules.contrast_description, desc)
        if c_rx:
            reasons.append(f"contrast_description: {desc!r} matches contrast pattern {c_rx!r}")
        if agent_c and (c_rx or rules.contrast_agent_policy == "reject"):
            reasons.append(f"contrast_agent: ContrastBolusAgent={agent!r}")
        elif agent_c:  # tags are often wrong: eligible, ranked last, the image phase decides
            evidence = "contrast_agent_tag"
            notes.append(f"ContrastBolusAgent={agent!r} with a neutral description")
    if reasons:
        return None, reasons
    kernel = _first(ok["convolution_kernel"])
    kclass = (
        "soft"
        if _search(rules.kernel_soft, kernel)
        else "sharp"
        if _search(rules.kernel_sharp, kernel)
        else "unknown"
    )
    return SeriesCandidate(
        series_instance_uid=str(g["series_instance_uid"].iloc[0]),
        n_files=len(ok),
        slice_thickness_mm=thickness,
        z_coverage_mm=round(z_cov, 3),
        convolution_kernel=kernel,
        kernel_class=kclass,
        series_description=desc,
        contrast_evidence=evidence,
        series_number=_first(ok["series_number"]) if "series_number" in ok else None,
        notes=tuple(notes),
    ), []


_KERNEL_RANK = {"soft": 0, "unknown": 1, "sharp": 2}
_EVIDENCE_RANK = {"noncontrast_description": 0, "none": 1, "contrast_agent_tag": 2}


def _rank(c: SeriesCandidate) -> tuple:
    """Sort key: evidence, kernel, thickness, then the earlier series (non-contrast is usually
    acquired first), more slices, more coverage, UID."""
    sn = c.series_number if c.series_number is not None else 1 << 30
    return (
        _EVIDENCE_RANK[c.contrast_evidence],
        _KERNEL_RANK[c.kernel_class],
        c.slice_thickness_mm or 99.0,
        sn,
        -c.n_files,
        -c.z_coverage_mm,
        c.series_instance_uid,
    )


def select_series(
    index: pd.DataFrame, *, rules: SelectionRules | None = None
) -> list[StudySelection]:
    """Choose each study's non-contrast series from an index (:func:`read_index` frame).

    Rows without a study UID (files that are not DICOM) are ignored.  Returns one
    :class:`StudySelection` per study, sorted by study UID.
    """
    rules = rules or load_rules()
    need = {"study_instance_uid", "series_instance_uid", "status", "path"}
    if not need <= set(index.columns):
        raise InputError(f"index lacks columns {sorted(need - set(index.columns))}")
    df = index[index["study_instance_uid"].notna() & index["series_instance_uid"].notna()]
    out: list[StudySelection] = []
    for study, sg in df.groupby("study_instance_uid", sort=True):
        cands: list[SeriesCandidate] = []
        rejections: dict[str, tuple[str, ...]] = {}
        for series, g in sg.groupby("series_instance_uid", sort=True):
            cand, reasons = _series_facts(g, rules)
            if cand is None:
                rejections[str(series)] = tuple(reasons)
            else:
                cands.append(cand)
        cands.sort(key=_rank)
        chosen = cands[0].series_instance_uid if cands else None
        files: tuple[str, ...] = ()
        if chosen is not None:
            cg = sg[(sg["series_instance_uid"] == chosen) & (sg["status"] == "ok")]
            files = tuple(sorted(cg["path"]))
        out.append(
            StudySelection(
                study_instance_uid=str(study),
                patient_key=str(_first(sg["patient_key"]) or ""),
                study_date=_first(sg["study_date"]) if "study_date" in sg else None,
                series_instance_uid=chosen,
                files=files,
                candidates=tuple(cands),
                rejections=rejections,
                status="selected" if chosen else "no_eligible_series",
                rules_version=rules.version,
            )
        )
    return out


# --- phase check from the image -------------------------------------------------------------
