"""Ingest speed: index crawl against a bare header-only pydicom loop, and series loading against
the naive per-file loop.  Everything is generated under ``tmp_path`` with pydicom and measured in
the same run (best of two for each side); results must agree before a ratio is printed.

* index: 6,000 synthetic CT files (100 series x 60 slices).  Floor: ``for f in files:
  pydicom.dcmread(f, stop_before_pixels=True)``.  Ours: ``update_index`` into a fresh folder
  (walk + header reads + Parquet write), with 1 and 2 worker processes.
* volume: a 512 x 512 x 300 series (uncompressed) and a 512 x 512 x 64 noisy JPEG 2000 lossless
  series.  Naive: ``dcmread`` + ``pixel_array`` per file, sort by z, stack, rescale to float32.
  Ours: ``load_series(workers=2)`` (JPEG 2000: ``threads=2``, its decoder releases the GIL).
* j2k decode: the 64 noisy 512 x 512 frames, JPEG 2000 lossless and HTJ2K lossless.  Floor: the
  single-thread pylibjpeg-openjpeg decode (``openjpeg.decode``, what pydicom's plugin runs) of the
  codestreams already in memory.  Ours: :func:`decode_slices` from the files (read + decode) with
  the CPUs this process may use (:func:`available_cpus`), and the whole ``load_series``.  Medians
  of 5 interleaved rounds; pixels must be equal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from baselines import best_of, interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ingest_synth import phantom_slice, write_series  # noqa: E402
from pydicom.encaps import encapsulate, generate_frames  # noqa: E402
from pydicom.uid import HTJ2KLossless, JPEG2000Lossless  # noqa: E402

from pdacscreen.io.dicom.read import available_cpus, decode_slices, read_header  # noqa: E402
from pdacscreen.io.index import read_index, update_index  # noqa: E402
from pdacscreen.io.volume import load_series  # noqa: E402

KEY = b"bench-key-0123456789abcdef"
pytestmark = pytest.mark.bench


def test_bench_index(tmp_path):
    root = tmp_path / "archive"
    for s in range(100):
        write_series(
            root / f"p{s % 20}" / f"s{s}",
            name=f"s{s}",
            study=f"st{s % 20}",
            n=60,
            rows=16,
            cols=16,
            patient_id=f"P{s % 20}",
        )
    files = sorted(str(p) for p in root.rglob("*.dcm"))
    assert len(files) == 6000

    def floor():
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)

    runs = iter(range(100))

    def ours(workers):
        idx = tmp_path / f"idx{next(runs)}"
        upd = update_index(root, idx, key=KEY, workers=workers)
        return upd, idx

    t_floor, _ = best_of(floor)
    t1, (u1, i1) = best_of(lambda: ours(1))
    t2, (u2, i2) = best_of(lambda: ours(2))
    assert u1.read == u2.read == 6000 and u1.bad == u2.bad == 0
    assert len(read_index(i1)) == len(read_index(i2)) == 6000
    f0, f1, f2 = (len(files) / t for t in (t_floor, t1, t2))
    print(
        f"\nBENCH index_w1 ratio={f1 / f0:.2f} files/s of update_index(workers=1) "
        f"({f1:.0f}/s) vs bare dcmread(stop_before_pixels) loop ({f0:.0f}/s), 1 core each"
    )
    print(
        f"BENCH index_w2 ratio={f2 / f0:.2f} files/s of update_index(workers=2, Dask "
        f"processes) ({f2:.0f}/s) vs the same 1-core floor"
    )
    print(f"BENCH index_scaling ratio={f2 / f1:.2f} update_index workers=2 vs workers=1")
    # incremental: nothing changed -> only the walk
    t_inc, upd = best_of(lambda: update_index(root, i1, key=KEY, workers=2))
    assert upd.read == 0
    print(
        f"BENCH index_incremental ratio={t1 / t_inc:.1f} full index (workers=1) vs "
        "re-index of an unchanged archive"
    )


def _naive(files):
    ds = [pydicom.dcmread(f) for f in files]
    ds.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    arr = np.stack([d.pixel_array for d in ds]).astype(np.float32)
    return arr * np.float32(ds[0].RescaleSlope) + np.float32(ds[0].RescaleIntercept)


def _noisy(k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    return phantom_slice(512, 512, k) + rng.normal(0, 15, (512, 512)).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "n", "ts", "image_fn"),
    [
        ("volume_512x512x300", 300, None, None),
        ("volume_512x512x64_j2k", 64, JPEG2000Lossless, _noisy),
    ],
)
def test_bench_volume(tmp_path, name, n, ts, image_fn):
    kw = {"transfer_syntax": ts} if ts else {}
    files = write_series(
        tmp_path / "s",
        n=n,
        rows=512,
        cols=512,
        pixel_spacing=(0.7, 0.7),
        step=1.0,
        thickness=1.0,
        image_fn=image_fn,
        **kw,
    )
    files = [str(f) for f in files[::-1]]  # files in reverse z order; InstanceNumber shuffled
    (t_naive, t1, t2), (ref, v1, v2) = interleaved(
        lambda: _naive(files),
        lambda: load_series(files, key=KEY, workers=1, threads=1),
        lambda: load_series(files, key=KEY, workers=2, threads=2),
        rounds=3,
    )
    np.testing.assert_array_equal(v2.array, np.maximum(ref, -1024))  # same HU, air-clipped
    np.testing.assert_array_equal(v1.array, v2.array)
    print(
        f"\nBENCH {name} ratio={t_naive / t2:.2f} load_series(workers=2, threads=2) ({t2:.2f}s) "
        f"vs naive dcmread+pixel_array+sort+stack+rescale loop ({t_naive:.2f}s), medians of 3 "
        f"interleaved, load {os.getloadavg()[0]:.1f}"
    )
    how = (
        "uncompressed: read in-process either way, by design"
        if ts is None
        else "JPEG 2000: 2 decoding threads (GIL released) vs 1"
    )
    print(
        f"BENCH {name}_scaling ratio={t1 / t2:.2f} load_series workers=2, threads=2 vs 1, 1 ({how})"
    )


def _frames(files) -> list[bytes]:
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        out.append(next(generate_frames(ds.PixelData, number_of_frames=1)))
    return out


def _as_htj2k(files, out: Path) -> list[str]:
    """The same images as HTJ2K lossless files (OpenJPH encoder; pydicom has none)."""
    import imagecodecs

    out.mkdir()
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = encapsulate([imagecodecs.htj2k_encode(ds.pixel_array, reversible=True)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
        ds.save_as(out / Path(f).name, enforce_file_format=True)
        paths.append(str(out / Path(f).name))
    return paths


def test_bench_j2k_decode_vs_floor(tmp_path):
    import openjpeg

    j2k = [
        str(f)
        for f in write_series(
            tmp_path / "j2k",
            n=64,
            rows=512,
            cols=512,
            pixel_spacing=(0.7, 0.7),
            step=1.0,
            thickness=1.0,
            image_fn=_noisy,
            transfer_syntax=JPEG2000Lossless,
        )
    ]
    threads = available_cpus()
    for name, files in (("j2k", j2k), ("htj2k", _as_htj2k(j2k, tmp_path / "ht"))):
        frames = _frames(files)
        headers = [read_header(f, key=KEY) for f in files]
        (t_floor, t_ours, t_load), (ref, ours, vol) = interleaved(
            lambda frames=frames: [openjpeg.decode(b) for b in frames],
            lambda headers=headers: decode_slices(headers, threads=threads),
            lambda files=files: load_series(files, key=KEY, threads=threads),
        )
        for r, s in zip(ref, ours, strict=True):
            np.testing.assert_array_equal(s.stored, r)
        assert vol.shape == (64, 512, 512)
        fps = len(frames) / t_ours
        print(
            f"\nBENCH {name}_decode_vs_floor ratio={t_floor / t_ours:.2f} decode_slices("
            f"threads={threads}) from the files ({fps:.0f} frames/s) vs single-thread "
            f"openjpeg.decode of the same frames in memory ({len(frames) / t_floor:.0f} frames/s),"
            f" {len(os.sched_getaffinity(0))} cores, medians of 5 interleaved, load "
            f"{os.getloadavg()[0]:.1f}"
        )
        print(
            f"BENCH {name}_load_vs_floor ratio={t_floor / t_load:.2f} whole load_series("
            f"threads={threads}) ({len(frames) / t_load:.0f} slices/s: headers, decode, geometry,"
            f" HU) vs the same decode floor"
        )
