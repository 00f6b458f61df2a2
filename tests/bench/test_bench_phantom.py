"""Phantom archive generation speed, measured in the same run.

* archive: 6 studies at matrix 128 (``compress="mixed"``) with ``workers=2`` against ``workers=1``;
  the outputs must be byte-identical before the ratio is printed.  Also prints seconds per study
  and the implied time for 1,000 studies at matrix 128.
* subject: ``make_subject`` at matrix 128 against 256 (how the cost grows with the matrix).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pdacscreen.io.phantom.archive import generate_archive
from pdacscreen.io.phantom.subject import make_subject

pytestmark = pytest.mark.bench


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in (root / "dicom").rglob("*") if p.is_file()
    }


def test_bench_archive_workers(tmp_path):
    n = 6
    t = time.perf_counter()
    generate_archive(
        tmp_path / "serial", studies=n, seed=3, matrix=128, compress="mixed", workers=1
    )
    serial = time.perf_counter() - t
    t = time.perf_counter()
    generate_archive(
        tmp_path / "parallel", studies=n, seed=3, matrix=128, compress="mixed", workers=2
    )
    parallel = time.perf_counter() - t
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")
    print(
        f"\nBENCH phantom_archive_workers ratio={serial / parallel:.2f} "
        f"workers=2 vs workers=1, {n} studies at matrix 128 ({serial:.1f} s vs {parallel:.1f} s;"
        f" {parallel / n:.2f} s/study -> ~{parallel / n * 1000 / 60:.0f} min per 1,000 studies)"
    )


def test_bench_subject_matrix():
    seeds = range(3)
    t = time.perf_counter()
    for s in seeds:
        make_subject(s, matrix=128)
    small = (time.perf_counter() - t) / len(seeds)
    t = time.perf_counter()
    for s in seeds:
        make_subject(s, matrix=256)
    big = (time.perf_counter() - t) / len(seeds)
    print(
        f"\nBENCH phantom_subject_matrix ratio={big / small:.2f} make_subject matrix 256 vs 128 "
        f"({big:.2f} s vs {small:.2f} s per subject)"
    )
