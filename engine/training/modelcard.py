"""The model card (README.md of a model package), generated from model.json and assessments.

``assessment.json`` (written by :mod:`pdacscreen.engine.training.assess`) holds the quality tables on
held-out phantom archives; it is documentation, not part of the hashed files.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_model_card", "quality_table"]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.{digits}f}"
    return str(v)


def _ci(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci")
    base = _fmt(m.get(key))
    return f"{base} ({_fmt(ci[0])}-{_fmt(ci[1])})" if ci else base


def quality_table(assessments: dict) -> str:
    """Markdown table, one column per assessed archive."""
    rows = [
        (
            "studies (PDAC / cyst / none)",
            lambda m: f"{m['studies']} ({m['pdac']} / {m['cyst']} / {m['none']})",
        ),
        ("matrix, seed", lambda m: f"{m.get('matrix', 'n/a')}, {m.get('seed', 'n/a')}"),
        ("AUROC (95% CI)", lambda m: _ci(m, "auroc")),
        ("sensitivity at the operating threshold", lambda m: _fmt(m["sensitivity_operating"])),
        ("specificity at the operating threshold", lambda m: _fmt(m["specificity_operating"])),
        (
            "sensitivity at specificity >= 0.95 (threshold on this archive)",
            lambda m: _fmt(m["sensitivity_at_spec95"]),
        ),
        (
            "sensitivity, lesions < 2 cm (operating threshold)",
            lambda m: _fmt(m["sensitivity_small"]),
        ),
        (
            "sensitivity, lesions >= 2 cm (operating threshold)",
            lambda m: _fmt(m["sensitivity_large"]),
        ),
        (
            "detected PDACs localised (IoU >= 0.1 or centre inside)",
            lambda m: _fmt(m["localised_fraction"]),
        ),
        ("false-positive rate, cysts", lambda m: _fmt(m["fp_rate_cyst"])),
        ("false-positive rate, fatty pancreas (no PDAC)", lambda m: _fmt(m["fp_rate_fatty"])),
        ("false-positive rate, other non-PDAC", lambda m: _fmt(m["fp_rate_other"])),
        (
            "QC flags raised",
            lambda m: ", ".join(f"{k} {v}" for k, v in m.get("qc_counts", {}).items()) or "none",
        ),
        ("seconds per study (CPU)", lambda m: _fmt(m.get("seconds_per_study"), 2)),
    ]
    names = list(assessments)
    out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, fn in rows:
        cells = []
        for n in names:
            try:
                cells.append(fn(assessments[n]))
            except (KeyError, TypeError):
                cells.append("n/a")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _source(td: dict) -> str:
    ph = td.get("phantoms")
    if ph:
        return (
            f"phantoms made in memory: seed {ph.get('seed')}, studies 0-{int(ph.get('studies', 1)) - 1},"
            f" matrix {ph.get('matrix')} (the subjects `pdacscreen phantom --seed {ph.get('seed')}`"
            " writes, without the DICOM round trip)"
        )
    return f"archive: `{td.get('archive', 'n/a')}`"


def _planned(td: dict) -> str:
    p1, p2 = td.get("stage1_steps_planned"), td.get("stage2_steps_planned")
    if p1 is None or (p1, p2) == (td.get("stage1_steps"), td.get("stage2_steps")):
        return ""
    return f"; planned {p1} and {p2}, lowered to fit `--max-minutes`"


def _device(device: str) -> str:
    return "the CPU" if device == "cpu" else f"a GPU (`{device}`)"


def write_model_card(root: Path) -> Path:
    """Write ``README.md`` for the package at ``root`` from model.json (+ assessment.json)."""
    root = Path(root)
    m = json.loads((root / "model.json").read_text())
    td = m.get("training_data", {})
    th = m["thresholds"]
    val = m.get("metrics", {}).get("validation", {})
    assess_path = root / "assessment.json"
    assessment = json.loads(assess_path.read_text()) if assess_path.is_file() else {}
    s1, s2 = m["stages"]["stage1"], m["stages"]["stage2"]
    lines = [
        f"# {m['name']} {m['version']}",
        "",
        "**Reference model, trained on synthetic phantoms, not for clinical use.** It exists so that",
        "pdacscreen runs end to end out of the box and so that the engine's training, export and",
        "backends are exercised; its quality numbers describe phantoms, not patients.",
        "",
        "## What it does",
        f"- Stage 1 (localiser): 3-D U-Net (base {s1['network']['base']} channels) on the whole scan at",
        f"  {s1['spacing_mm']} mm (z, y, x), patch {s1['patch']}: pancreas probability -> pancreas box.",
        f"- Stage 2 (detector): 3-D U-Net (base {s2['network']['base']}) with a classification head on the",
        f"  pancreas box + {s2['margin_mm']} mm margin at {s2['spacing_mm']} mm, patch {s2['patch']},",
        "  sliding window with Gaussian blending: pancreas / PDAC segmentation and a classification",
        "  head (maximum over windows).",
        f"- Study-level PDAC probability: `{m['postprocessing'].get('score', 'cls')}` (`cls`: the head;"
        " `lesion_peak`: the peak lesion probability), chosen on the validation split.",
        f"- Input: non-contrast CT in HU, clipped to {m['preprocessing']['window_hu']} HU, then",
        f"  (x - {m['preprocessing']['mean']}) / {m['preprocessing']['std']}.",
        "",
        "## Operating thresholds",
        f"- operating: {th['operating']:.4f}; 95% specificity: {th['specificity_95']:.4f};"
        f" 99% specificity: {th['specificity_99']:.4f}",
        f"- how: {th['method']}",
        *(
            [
                f"- calibration: {m['calibration']['negatives']} negatives,"
                f" by finding {m['calibration']['by_finding']}; score quantiles"
                f" {m['calibration']['score_quantiles']}; re-run: `{m['calibration']['command']}`"
            ]
            if m.get("calibration")
            else []
        ),
        "",
        "## Training data and command",
        f"- {_source(td)} ({td.get('studies', 'n/a')} studies: {td.get('by_type', {})});"
        f" training {td.get('training_studies', 'n/a')}, validation {td.get('validation_studies', 'n/a')}",
        f"- seed {td.get('seed', 'n/a')}; steps: stage 1 {td.get('stage1_steps')}, stage 2 {td.get('stage2_steps')}"
        f" (batch {td.get('batch')}, stage-2 training patch {td.get('stage2_training_patch')})"
        + _planned(td),
        f"- augmentation: {td.get('augmentation', {})}",
        *(
            [
                "- anatomy variation (`--vary-anatomy`, `io/phantom/variation.py`): pancreas pose and"
                " shape, habitus, organ texture, per-tissue HU and noise grain randomised beyond the"
                " generator's ranges"
            ]
            if td.get("anatomy_variation")
            else []
        ),
        *(
            [
                f"- stage 2 taken unchanged from {td['stage2_from']['package']} (`--stage2-from`;"
                f" weights sha256 {td['stage2_from']['weights_sha256'][:16]}...); only stage 1 was trained"
            ]
            if td.get("stage2_from")
            else []
        ),
        "- exact commands:",
        "",
        "```bash",
        *td.get("commands", [td.get("command", "n/a")]),
        "```",
        "",
        f"Validation split (same generator, seeds of the training archive): AUROC {_fmt(val.get('auroc'))},"
        f" sensitivity {_fmt(val.get('sensitivity_at_95'))} at the 95%-specificity threshold,"
        f" {_fmt(val.get('sensitivity_at_99'))} at the 99% one ({val.get('studies', 'n/a')} studies).",
        f"Training took {m.get('metrics', {}).get('training_seconds', 'n/a')} s in all"
        f" (data {m.get('metrics', {}).get('data_seconds', 'n/a')} s) on"
        f" {_device(td.get('device', 'cpu'))}.",
        *([f"Release: {td['release_note']}."] if td.get("release_note") else []),
        "",
        "## Quality on held-out phantom archives (seeds never used in training)",
        "",
    ]
    if assessment:
        lines += [quality_table(assessment.get("archives", {})), ""]
        for note in assessment.get("notes", []):
            lines.append(f"- {note}")
        cmds = assessment.get("commands", [])
        if cmds:
            lines += ["", "Re-run:", "", "```bash", *cmds, "```"]
    else:
        lines.append("Not assessed yet: run `pdacscreen assess --archive DIR --model PKG`.")
    lines += [
        "",
        "## Backends",
        "ONNX Runtime (CPU; CUDA execution provider when installed), torch (CPU/CUDA, from the `.pt`",
        "state dicts), TensorRT 10 (engine built from the same ONNX with FP16 and an optimisation",
        "profile, plan cached by model hash, TensorRT version and GPU). ONNX Runtime CPU and torch CPU",
        "are verified against each other by the test suite; TensorRT and CUDA paths are tested only",
        "where a GPU and TensorRT are present (not on the machine this model was trained on).",
        "",
        "## Format",
        "See `model.json`: `files` pins the sha256 of every file; loading refuses a mismatch.",
        "",
    ]
    path = root / "README.md"
    path.write_text("\n".join(lines))
    return path
