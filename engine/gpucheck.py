"""``python -m pdacscreen.engine.gpucheck``: time the GPU backends on the machine it runs on.

For each backend (ONNX Runtime CUDA, torch CUDA, TensorRT FP16; ONNX Runtime CPU as reference)
that can run here: stage-2 batch latency (windows per second) at batch sizes 1/4/8, output
parity against ONNX Runtime CPU (max abs difference of the segmentation logits and the class
logit), and the per-study time of the full detector on a phantom.  Backends that cannot run are
listed with the reason.  Prints one JSON document (and writes it with ``--out``); exits 0 even
when no GPU is present (then only the CPU reference is timed), so infra/gpu-check can run it
anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from pdacscreen.engine.backends import open_backend
from pdacscreen.engine.errors import BackendUnavailableError
from pdacscreen.engine.package import load_package

__all__ = ["main", "check"]

log = logging.getLogger(__name__)
CANDIDATES = ("onnxruntime", "onnxruntime-cuda", "torch-cuda", "tensorrt")


def _time_batches(backend, batch: np.ndarray, repeats: int) -> float:
    backend.predict(batch)  # warm-up (kernel selection, engine build happens before)
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend.predict(batch)
    return (time.perf_counter() - t0) / repeats


def check(*, model: Path | None, repeats: int, study_matrix: int, cache_dir: Path | None) -> dict:
    """Run the timings (see module docstring); returns a JSON-serialisable report."""
    from pdacscreen.engine.inference import Detector
    from pdacscreen.io.phantom.subject import make_subject
    from pdacscreen.io.types import CTVolume

    package = load_package(model)
    stage = package.stage2
    rng = np.random.default_rng(0)
    batches = {b: rng.normal(size=(b, 1, *stage.patch)).astype(np.float32) for b in (1, 4, 8)}
    report: dict = {
        "model": package.name,
        "version": package.version,
        "sha256": package.sha256,
        "patch": list(stage.patch),
        "backends": {},
    }
    reference = open_backend(stage, backend="onnxruntime").predict(batches[4])
    s = make_subject(77, matrix=study_matrix, lesion_type="pdac")
    volume = CTVolume(s.noncontrast, s.spacing, s.affine, series_instance_uid="gpucheck")
    for name in CANDIDATES:
        entry: dict = {}
        try:
            t0 = time.perf_counter()
            be = open_backend(stage, backend=name, cache_dir=cache_dir, max_batch=8)
            entry["open_seconds"] = round(time.perf_counter() - t0, 3)
            entry["resolved"] = be.name
            for b, batch in batches.items():
                sec = _time_batches(be, batch, repeats)
                entry[f"batch{b}_ms"] = round(1000 * sec, 2)
                entry[f"batch{b}_windows_per_s"] = round(b / sec, 1)
            out = be.predict(batches[4])
            entry["max_abs_diff_seg"] = float(
                np.abs(np.asarray(out["seg"]) - reference["seg"]).max()
            )
            entry["max_abs_diff_cls"] = float(
                np.abs(np.asarray(out["cls"]) - reference["cls"]).max()
            )
            det = Detector(package, backend=name, batch_size=8)
            det.detect(volume)
            t0 = time.perf_counter()
            res = det.detect(volume)
            entry["study_seconds"] = round(time.perf_counter() - t0, 3)
            entry["study_timings"] = {k: round(v, 4) for k, v in res.timings.items()}
            entry["study_probability"] = res.pdac_probability
        except (BackendUnavailableError, ImportError) as e:
            entry = {"available": False, "reason": str(e)}
        report["backends"][name] = entry
        log.info("%s: %s", name, entry)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pdacscreen.engine.gpucheck", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--model", type=Path, default=None, help="model package (default: the reference)"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--matrix", type=int, default=256, help="phantom matrix of the per-study timing"
    )
    ap.add_argument("--cache-dir", type=Path, default=None, help="TensorRT plan cache")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    report = check(
        model=args.model, repeats=args.repeats, study_matrix=args.matrix, cache_dir=args.cache_dir
    )
    text = json.dumps(report, indent=2, default=float)
    print(text)  # noqa: T201 - CLI output
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
