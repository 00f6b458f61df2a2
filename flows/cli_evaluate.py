"""``pdacscreen evaluate STORE (--labels FILE | --diagnoses FILE) [--export-aggregate SITE.json]``.

``--labels``: findings against reference labels (:mod:`pdacscreen.flows.evaluate`).
``--diagnoses``: lead time before diagnosis (:mod:`pdacscreen.flows.leadtime`).
``--export-aggregate``: the evaluated cases as bin counts only, for ``pdacscreen evaluate-network``
(:mod:`pdacscreen.flows.federated`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pdacscreen.flows import leadtime
from pdacscreen.flows.evaluate import SUBGROUPS, evaluate, write
from pdacscreen.io.errors import PdacscreenError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="findings store folder (STORE)")
    ref = parser.add_mutually_exclusive_group(required=True)
    ref.add_argument(
        "--labels", type=Path, help="labels .parquet or .csv (study_instance_uid, label)"
    )
    ref.add_argument(
        "--diagnoses",
        type=Path,
        help="lead-time evaluation: .csv/.parquet with patient_key, diagnosis_date (or "
        "study_instance_uid, label, diagnosis_date); studies after the diagnosis are excluded; "
        "reports sensitivity/AUROC by months before diagnosis, median lead time and flags and PPV "
        "per 10,000 studies (PANDA's deployment: about 1,400 flags in about 180,000 CTs)",
    )
    parser.add_argument(
        "--by", default=",".join(SUBGROUPS), help=f"subgroups, from {','.join(SUBGROUPS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
    parser.add_argument("--model-version", default=None, help="model version (default: latest)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="override the operating threshold"
    )
    parser.add_argument(
        "--label-maps",
        type=Path,
        default=None,
        help="folder of <study or series uid>.nii.gz label maps",
    )
    parser.add_argument(
        "--lesion-label", type=int, default=None, help="lesion value in label maps (default: > 0)"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--tolerance-mm", type=float, default=5.0, help="centre-hit tolerance, mm")
    fed = parser.add_argument_group("federated export (aggregates only: no study rows, no keys)")
    fed.add_argument(
        "--export-aggregate",
        type=Path,
        default=None,
        metavar="SITE.json",
        help="write bin counts per label and subgroup for pdacscreen evaluate-network",
    )
    fed.add_argument("--site-name", default="site", help="site label in the export")
    fed.add_argument("--bins", type=int, default=1000, help="score bins on [0, 1] (default 1000)")
    fed.add_argument(
        "--min-cell",
        type=int,
        default=10,
        help="k: no exported cell holds 1..k-1 studies; bins are merged (default 10)",
    )
    fed.add_argument(
        "--aggregate-by",
        default="manufacturer,thickness,sex,age",
        help="export subgroups, from manufacturer,thickness,sex,age (those present)",
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.diagnoses is not None:
        return _run_lead_time(args, console)
    by = tuple(b.strip() for b in args.by.split(",") if b.strip())
    try:
        result = evaluate(
            args.store,
            args.labels,
            by=by,
            model_version=args.model_version,
            threshold=args.threshold,
            label_maps=args.label_maps,
            lesion_label=args.lesion_label,
            n_boot=args.bootstrap,
            seed=args.seed,
            tolerance_mm=args.tolerance_mm,
        )
    except PdacscreenError as e:
        Console(stderr=True).print(f"[red]{e.code}:[/red] {e}", highlight=False)
        return 2
    paths = write(result, args.out)
    m = result.metrics
    if args.export_aggregate is not None:
        df = result.cases
        code = _export(
            args,
            console,
            score=df["pdac_probability"].to_numpy(float),
            positive=df["y"].to_numpy() == 1,
            frame=df,
            threshold=m["threshold"]["value"],
            model={"name": ",".join(m["model"]["name"]), "version": m["model"]["version"]},
            counts={"excluded": m["counts"]["excluded"]},
        )
        if code:
            return code
    cl = m["case_level"]
    table = Table(title=f"evaluation of {m['model']['version']}", header_style="bold")
    for col in ("metric", "value", "95% CI", "counts"):
        table.add_column(col)
    table.add_row("AUROC", *_fmt(cl["auroc"]), f"{cl['n_positive']} pos / {cl['n_negative']} neg")
    table.add_row("average precision", *_fmt(cl["average_precision"]), "")
    for label, point in [
        (f"@ threshold {cl['at_threshold']['threshold']:.3g}", cl["at_threshold"])
    ] + [(f"@ {p['target_specificity']:.0%} specificity", p) for p in cl["at_specificity"]]:
        for name in ("sensitivity", "specificity"):
            r = point[name]
            table.add_row(f"{name} {label}", *_fmt(r), f"{r['numerator']}/{r['denominator']}")
    console.print(table)
    console.print(
        f"excluded: {m['counts']['excluded_by_reason'] or 'none'}; outputs in {paths['report'].parent}"
    )
    return 0


def _fmt(e: dict) -> tuple[str, str]:
    v = "n/a" if e["value"] is None else f"{e['value']:.3f}"
    if e["ci_low"] is None:
        return v, ""
    return v, f"{e['ci_low']:.3f}-{e['ci_high']:.3f}"


def _run_lead_time(args: argparse.Namespace, console) -> int:
    from rich.console import Console

    try:
        result = leadtime.evaluate_lead_time(
            args.store,
            args.diagnoses,
            model_version=args.model_version,
            threshold=args.threshold,
            n_boot=args.bootstrap,
            seed=args.seed,
        )
    except PdacscreenError as e:
        Console(stderr=True).print(f"[red]{e.code}:[/red] {e}", highlight=False)
        return 2
    paths = leadtime.write(result, args.out)
    _print_lead_time(result.metrics, console)
    if args.export_aggregate is not None:
        c, m = result.lead.cases, result.metrics
        code = _export(
            args,
            console,
            score=c["score"].to_numpy(float),
            positive=c["y"].to_numpy(bool),
            frame=c,
            threshold=result.threshold,
            model={"name": ",".join(m["model"]["name"]), "version": m["model"]["version"]},
            counts={
                "excluded": int(len(result.lead.excluded)),
                "not_assessed": int((result.lead.excluded["reason"] == "not_assessed").sum()),
            },
            lead_bands=c["band"].fillna("none").to_numpy(object),
        )
        if code:
            return code
    console.print(f"outputs in {paths['leadtime'].parent}")
    return 0


def _export(args, console, *, score, positive, frame, threshold, model, counts, lead_bands=None):
    """Write ``--export-aggregate`` (0, or 2 after printing why not)."""
    from rich.console import Console

    from pdacscreen.flows import federated

    dims = tuple(d.strip() for d in args.aggregate_by.split(",") if d.strip())
    try:
        agg = federated.build_aggregate(
            score,
            positive,
            subgroups=federated.subgroup_values(frame, dims),
            positive_subgroups=None if lead_bands is None else {"lead_time": lead_bands},
            threshold=threshold,
            site=args.site_name,
            model=model,
            bins=args.bins,
            k=args.min_cell,
            counts=counts,
        )
    except PdacscreenError as e:
        Console(stderr=True).print(f"[red]{e.code}:[/red] {e}", highlight=False)
        return 2
    path = federated.write_aggregate(agg, args.export_aggregate)
    console.print(
        f"aggregate export (counts only, cells >= {args.min_cell}): {path}", highlight=False
    )
    return 0


def _print_lead_time(m: dict, console) -> None:
    """The readable tables of a lead-time evaluation."""
    from rich.table import Table

    t = Table(
        title=f"lead time before diagnosis, {m['model']['version']}, threshold "
        f"{m['threshold']['value']:.3g} (95% CI: patients resampled)",
        header_style="bold",
    )
    for col in ("months", "pos (pts)", "AUROC", "95% CI", "sens", "95% CI", "flagged"):
        t.add_column(col, no_wrap=True)
    for b in m["bands"]:
        s = b["sensitivity"]
        t.add_row(
            b["band_months"],
            f"{b['positive_studies']} ({b['positive_patients']})",
            *_fmt(b["auroc"]),
            *_fmt(s),
            f"{s['numerator']}/{s['denominator']}",
        )
    console.print(t)
    p, y = m["patients"], m["screening_yield"]
    d, lead = p["detected_before_diagnosis"], p["median_lead_time_months_of_true_flags"]
    console.print(
        f"specificity {_fmt(m['specificity'])[0]} ({_fmt(m['specificity'])[1]}); "
        f"patients detected before diagnosis {d['numerator']}/{d['denominator']}; "
        f"median lead time of true flags {_fmt(lead)[0]} months ({_fmt(lead)[1]})",
        highlight=False,
    )
    console.print(
        f"per 10,000 screened studies: {_fmt(y['flags_per_10000'])[0]} flags "
        f"({_fmt(y['flags_per_10000'])[1]}), {_fmt(y['true_flags_per_10000'])[0]} true flags; "
        f"PPV {_fmt(y['ppv'])[0]} ({_fmt(y['ppv'])[1]}); {leadtime.PANDA_NOTE}",
        highlight=False,
    )
    counts = m["counts"]
    console.print(
        f"excluded: {counts['excluded_by_reason'] or 'none'} (not assessed by role: "
        f"{counts['not_assessed_by_role'] or 'none'}). {m['notes'][-1]}",
        highlight=False,
    )
