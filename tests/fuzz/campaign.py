"""``make fuzz``: a long seeded campaign against the ingest; prints counts by error code.

    .venv/bin/python tests/fuzz/campaign.py --files 10000 --series 300 --seed 1

Exit status 1 if anything crashed, hung, died or ran out of memory (each listed with its mutator
and seed file, replayable with the same ``--seed``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from dicom_fuzz import TIME_BUDGET_S, run_campaign  # noqa: E402

REAL_CT = HERE.parents[2] / "shared" / "fixtures" / "real-ct"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--series", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=TIME_BUDGET_S)
    ap.add_argument("--keep", type=Path, default=None, help="copy each finding's input here")
    args = ap.parse_args(argv)
    real = REAL_CT if REAL_CT.is_dir() else None
    if real is None:
        print(f"real CT fixtures not found at {REAL_CT}: phantom seeds only")
    with tempfile.TemporaryDirectory(prefix="pdacscreen-fuzz-") as tmp:
        rep = run_campaign(
            files=args.files,
            series=args.series,
            seed=args.seed,
            workdir=Path(tmp),
            real_ct=real,
            budget_s=args.budget_s,
            progress=lambda m: print(m, flush=True),
            keep=args.keep,
        )
    print(rep.table())
    print("\nby mutator (outcomes other than ok):")
    for (mut, stage, out), n in sorted(rep.by_mutator.items()):
        if out != "ok":
            print(f"  {mut:28} {stage:7} {out:28} {n:6d}")
    for f in rep.findings:
        print("FINDING", *f[:4], "\n", f[4])
    for f in rep.hangs:
        print("KILLED (over the time budget)", *f[:4])
    return 1 if rep.findings or rep.controls_ok != rep.controls else 0


if __name__ == "__main__":
    sys.exit(main())
