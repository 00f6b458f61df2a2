"""A week of nights: 7 nightly sweeps of a growing, damaged phantom archive (``make soak``, not CI).

Each night the archive grows by ``--new`` studies (the phantom generator extends it in place),
and between nights some files are deleted, some truncated (corrupted) and some duplicated (a
stray copy of a slice, and one old study re-sent whole under another folder). Then the nightly
sweep runs as ``pdacscreen serve`` runs a scheduled flow run: this long-lived process (the
runner) starts each flow run in a fresh spawned process (as Prefect's runner does with
``run_flow_in_subprocess`` for a flow it holds in memory), reporting to the runner's Prefect API,
with its own local Ray runtime, and the night is checked:

* every study of the archive has exactly one findings row for the model (version + config hash);
  no row for a study the archive never held; ``dedupe_check() == 0``;
* failures accounted for: every truncated file has a ``failures`` row, every ``failed`` findings
  row a study-level one;
* memory: the runner's RSS after the night (the process that lives all week), the peak RSS of
  the night's flow process (the sweep's driver) and of the Ray worker processes, sampled during
  the sweep; ``--in-process`` runs every night's flow in the runner itself instead (a driver kept
  all week: measured to grow by 20-40 MB a night in native memory while Python's own heap,
  traced by tracemalloc, grew 4 MB over 6 nights; this is why nights run in fresh processes);
* store size: findings, failures, index and evidence bytes, and bytes per findings row.

It prints one table row per night and, at the end, the figures scaled to 1,500 studies/night.
Exit status 1 when a check fails.

    .venv/bin/python infra/soak.py --work work/soak --nights 7 --initial 6 --new 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _RssSampler:
    """Peak RSS (bytes) of this process's descendants: the largest Ray worker (``ray::`` in its
    command line) in ``peak``, the night's flow process (``flow_pid``) in ``flow_peak``."""

    def __init__(self, every_s: float = 1.0) -> None:
        import psutil

        self.me, self.every, self.peak, self.flow_peak = psutil.Process(), every_s, 0, 0
        self.flow_pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every):
            total_peak = 0
            for p in self.me.children(recursive=True):
                try:
                    if p.pid == self.flow_pid:
                        self.flow_peak = max(self.flow_peak, p.memory_info().rss)
                    elif "ray::" in " ".join(p.cmdline()[:1]):
                        total_peak = max(total_peak, p.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total_peak)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _damage(archive: Path, truth: list[dict], night: int, rng: random.Random, done: set[str]):
    """Between nights: delete, truncate and duplicate files. Returns what was done."""
    import pydicom

    dicom = archive / "dicom"
    new = [r for r in truth if r["study_instance_uid"] not in done]
    old = [r for r in truth if r["study_instance_uid"] in done]
    report = {"deleted": [], "truncated": [], "duplicated": [], "resent": []}

    def files_of(row: dict) -> list[Path]:
        folder = archive / row["study_dir"]
        return sorted(p for p in folder.rglob("*") if p.is_file() and ".soak" not in p.name)

    def nc_files(row: dict) -> list[Path]:
        out = []
        for p in files_of(row):
            try:
                ds = pydicom.dcmread(
                    p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
                )
            except Exception:
                continue
            if str(ds.get("SeriesInstanceUID", "")) == row["noncontrast_series_uid"]:
                out.append(p)
        return out

    if new:  # a new study loses a middle slice of its non-contrast series: a `failed` row
        row = rng.choice(new)
        nc = nc_files(row)
        if len(nc) > 4:
            victim = nc[len(nc) // 2]
            victim.unlink()
            report["deleted"].append(str(victim))
    if old:  # an old study loses a file: it keeps its one row (already processed)
        row = rng.choice(old)
        fs = files_of(row)
        if fs:
            victim = rng.choice(fs)
            victim.unlink()
            report["deleted"].append(str(victim))
    for row in rng.sample(truth, k=min(2, len(truth))):  # truncated copies in the archive
        fs = files_of(row)
        if fs:
            src = rng.choice(fs)
            bad = src.with_name(f"{src.name}.soak-trunc{night}")
            data = src.read_bytes()
            bad.write_bytes(data[: max(200, len(data) // 3)])
            report["truncated"].append(str(bad))
    if new:  # an intact duplicate of a slice (same SOP Instance UID)
        row = rng.choice(new)
        fs = nc_files(row)
        if fs:
            src = rng.choice(fs)
            dup = src.with_name(f"{src.name}.soak-dup{night}")
            shutil.copy2(src, dup)
            report["duplicated"].append(str(dup))
    if old and night % 2 == 0:  # an old study re-sent whole into another folder
        row = rng.choice(old)
        src = archive / row["study_dir"]
        dst = dicom / f"resent-night{night}" / src.name
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
            report["resent"].append(row["study_instance_uid"])
    return report


def _flow_process(params: dict, api_url: str | None) -> None:
    """The night's flow process (spawned): the sweep against the runner's Prefect API."""
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    from pdacscreen.flows.sweep import nightly_sweep

    nightly_sweep(**params)


def _night_in_a_fresh_process(params: dict, store_dir: Path, sampler: _RssSampler) -> dict:
    """Run the night as ``serve``'s runner runs a flow run: in a fresh spawned process that
    reports to the runner's Prefect API; the summary is read back from the run manifest it wrote
    (``STORE/sweeps/<sweep_id>.json``)."""
    import multiprocessing

    from prefect.server.api.server import SubprocessASGIServer

    api_url = os.environ.get("PREFECT_API_URL") or SubprocessASGIServer().api_url
    before = set((store_dir / "sweeps").glob("*.json"))
    proc = multiprocessing.get_context("spawn").Process(
        target=_flow_process, args=(params, api_url)
    )
    proc.start()
    sampler.flow_pid = proc.pid
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the night's flow process exited with {proc.exitcode}")
    (manifest,) = sorted(set((store_dir / "sweeps").glob("*.json")) - before)
    return json.loads(manifest.read_text())["summary"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("work/soak"))
    ap.add_argument("--nights", type=int, default=7)
    ap.add_argument("--initial", type=int, default=6, help="studies before night 1")
    ap.add_argument("--new", type=int, default=4, help="new studies per night")
    ap.add_argument("--matrix", type=int, default=128, choices=(128, 256, 512))
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run every night's flow in this process (a driver kept all week) instead of a fresh "
        "spawned process per night as `pdacscreen serve` does",
    )
    args = ap.parse_args(argv)

    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.environ.setdefault("PDACSCREEN_WORK", str(work / "state"))
    from pdacscreen.flows.cli import _offline_defaults

    _offline_defaults()
    import logging

    import pandas as pd
    import psutil
    import pyarrow.parquet as pq

    from pdacscreen.flows.cli_sweep import start_prefect
    from pdacscreen.flows.sweep import nightly_sweep
    from pdacscreen.io.phantom.archive import generate_archive
    from pdacscreen.io.store import FindingsStore

    logging.basicConfig(level=logging.WARNING)
    error = start_prefect()
    if error:
        print(f"Prefect could not start: {error}", file=sys.stderr)
        return 2
    archive, store_dir = work / "archive", work / "store"
    store = FindingsStore(store_dir)
    rng = random.Random(args.seed)
    rows, problems = [], []
    done: set[str] = set()
    truncated: set[str] = set()
    me = psutil.Process()
    for night in range(1, args.nights + 1):
        t_gen = time.perf_counter()
        n_total = args.initial + (night - 1) * args.new
        generate_archive(archive, studies=n_total, seed=args.seed, matrix=args.matrix, workers=1)
        gen_s = time.perf_counter() - t_gen
        truth = pq.read_table(archive / "truth.parquet").to_pylist()
        damage = _damage(archive, truth, night, rng, done)
        truncated |= {str(Path(p).relative_to(archive / "dicom")) for p in damage["truncated"]}
        t0 = time.perf_counter()
        params = {
            "archive": str(archive / "dicom"),
            "store": str(store_dir),
            "n_actors": args.actors,
            "demo_key": True,
        }
        with _RssSampler() as sampler:
            if args.in_process:
                summary = nightly_sweep(**params)
            else:
                summary = _night_in_a_fresh_process(params, store_dir, sampler)
        sweep_s = time.perf_counter() - t0
        df = store.read_findings()
        fails = store.read_failures()
        mine = df[
            (df["model_version"] == summary["model_version"])
            & (df["config_hash"] == summary["config_hash"])
        ]
        uids = set(r["study_instance_uid"] for r in truth)
        counts = mine["study_instance_uid"].value_counts()
        if store.dedupe_check() or (counts > 1).any():
            problems.append(f"night {night}: a study has more than one row")
        if set(counts.index) != uids:
            missing, extra = uids - set(counts.index), set(counts.index) - uids
            problems.append(
                f"night {night}: {len(missing)} studies without a row, {len(extra)} extra"
            )
        fail_paths = {
            str(Path(p)).split("/dicom/", 1)[-1] for p in fails["path"].dropna().astype(str)
        }
        unaccounted = {p for p in truncated if not any(f.endswith(p) for f in fail_paths)}
        if unaccounted:
            problems.append(f"night {night}: truncated files without a failures row: {unaccounted}")
        failed_uids = set(mine.loc[mine["status"] == "failed", "study_instance_uid"])
        study_fail_uids = set(fails.loc[fails["scope"] == "study", "study_instance_uid"].dropna())
        if failed_uids - study_fail_uids:
            problems.append(f"night {night}: failed studies without a failures row")
        done |= uids
        sizes = {
            k: _du(store_dir / k)
            for k in (
                "findings",
                "failures",
                "index",
                "evidence",
                "dicom",
                "dicom_exports",
                "sweeps",
            )
        }
        rows.append(
            {
                "night": night,
                "studies": len(uids),
                "processed": summary["processed"],
                "ok": summary["ok"],
                "failed": summary["failed"],
                "skipped": summary["skipped"],
                "not_assessable": summary["not_assessable"],
                "file_errors": summary["file_errors"],
                "findings_rows": len(df),
                "failures_rows": len(fails),
                "deleted": len(damage["deleted"]),
                "truncated": len(damage["truncated"]),
                "duplicated": len(damage["duplicated"]) + len(damage["resent"]),
                "gen_s": round(gen_s, 1),
                "sweep_s": round(sweep_s, 1),
                "driver_rss_mb": round(me.memory_info().rss / 2**20, 1),
                "flow_peak_rss_mb": round(sampler.flow_peak / 2**20, 1),
                "worker_peak_rss_mb": round(sampler.peak / 2**20, 1),
                **{f"{k}_kb": round(v / 1024, 1) for k, v in sizes.items()},
                "bytes_per_row": round((sizes["findings"]) / max(1, len(df))),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows).set_index("night")
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.to_string())
    if len(rows) >= 2:
        first, last = rows[1], rows[-1]  # night 2 (warm) to the last night
        keys = ["driver_rss_mb", "worker_peak_rss_mb"] + (
            [] if args.in_process else ["flow_peak_rss_mb"]
        )
        for k in keys:
            growth = (last[k] - first[k]) / max(first[k], 1e-9)
            print(
                f"{k}: night 2 {first[k]} MB -> night {last['night']} {last[k]} MB ({growth:+.1%})"
            )
            if growth > 0.10:
                problems.append(f"{k} grew {growth:+.1%} from night 2 to night {last['night']}")
        per_study_s = sum(r["sweep_s"] for r in rows[1:]) / max(
            1, sum(r["processed"] for r in rows[1:])
        )
        disk = {
            k: (last[f"{k}_kb"] * 1024) / max(1, last["studies"])
            for k in ("findings", "failures", "index", "evidence", "dicom", "dicom_exports")
        }
        print(
            f"scaled to 1,500 studies/night at matrix {args.matrix} on this machine "
            f"({os.cpu_count()} CPUs, {args.actors} actor(s)): "
            f"{per_study_s:.1f} s/study incl. the fixed start -> {1500 * per_study_s / 3600:.1f} h/night; "
            + ", ".join(f"{k} {1500 * v / 2**20:.1f} MB/night" for k, v in disk.items())
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    for p in problems:
        print("SOAK CHECK FAILED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
