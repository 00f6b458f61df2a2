"""``pdacscreen evaluate-network SITE.json ...``: pool per-site aggregate exports.

The exports come from ``pdacscreen evaluate ... --export-aggregate SITE.json`` and hold only bin
counts (:mod:`pdacscreen.flows.federated`).  Prints per-site and pooled tables and the between-site
heterogeneity; writes ``network.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pdacscreen.io.errors import PdacscreenError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sites", type=Path, nargs="+", help="site aggregate exports (JSON)")
    parser.add_argument(
        "--out", type=Path, default=Path("network.json"), help="network result (JSON)"
    )


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pdacscreen.flows import federated

    console = Console()
    try:
        result = federated.network([federated.load_aggregate(p) for p in args.sites])
    except PdacscreenError as e:
        Console(stderr=True).print(f"[red]{e.code}:[/red] {e}", highlight=False)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    sites = Table(title="per site, overall (95% CI: DeLong from counts)", header_style="bold")
    for col in (
        "site",
        "pos",
        "neg",
        "AUROC",
        "95% CI",
        "bounds",
        "sens",
        "spec",
    ):
        sites.add_column(col)
    for s in result["per_site"]:
        if not s["tables"]:
            sites.add_row(s["site"], "suppressed", "", "", "", "", "", "")
            continue
        t = s["tables"][0]
        a = t["auroc"]
        sites.add_row(
            s["site"],
            str(t["n_positive"]),
            str(t["n_negative"]),
            _f(a["value"]),
            f"{_f(a['ci_low'])}-{_f(a['ci_high'])}",
            f"{_f(t['auroc_bounds'][0])}-{_f(t['auroc_bounds'][1])}",
            _f(t["sensitivity"]["value"]),
            _f(t["specificity"]["value"]),
        )
    console.print(sites)
    pooled = Table(
        title="network: bin counts pooled (95% CI: DeLong from counts)", header_style="bold"
    )
    for col in ("subgroup", "sites", "pos/neg", "AUROC", "95% CI", "bounds", "sens"):
        pooled.add_column(col, no_wrap=col != "subgroup")
    for t in result["pooled"]:
        a = t["auroc"]
        pooled.add_row(
            "all" if t["subgroup"] == "all" else f"{t['subgroup']}: {t['group']}",
            str(t["sites"]),
            f"{t['n_positive']}/{t['n_negative']}",
            _f(a["value"]),
            f"{_f(a['ci_low'])}-{_f(a['ci_high'])}",
            f"{_f(t['auroc_bounds'][0])}-{_f(t['auroc_bounds'][1])}",
            _f(t["sensitivity"]["value"]),
        )
    console.print(pooled)
    h, r = result["heterogeneity"], result["random_effects_auroc"]
    console.print(
        f"between-site heterogeneity of AUROC: Q {_f(h['q'])} (df {h['df']}, p {_f(h['p_value'])}), "
        f"I^2 {_f(h['i2'])}, tau^2 {_f(h['tau2'])}; random-effects AUROC {_f(r['value'])} "
        f"({_f(r['ci_low'])}-{_f(r['ci_high'])})",
        highlight=False,
    )
    for note in result["notes"]:
        console.print(f"[dim]{note}[/dim]", highlight=False)
    console.print(f"written {args.out}", highlight=False)
    return 0
