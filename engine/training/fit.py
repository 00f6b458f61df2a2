"""``pdacscreen train``: train the two-stage reference model on phantoms (CPU or CUDA).

Training data: a phantom archive (``--archive``: DICOM, truth table, label maps) or the same
generator's subjects made in memory (``--phantoms N --phantom-seed S``: study k is the subject
``pdacscreen phantom --seed S`` writes as study k, without the DICOM round trip).

Steps: read the archive's truth table and label maps (or make the subjects); preprocess every
study once (a disk cache for archives); split studies into training and validation (stratified by lesion type, by seed); train
stage 1 (pancreas localiser, coarse grid) and stage 2 (pancreas + PDAC segmentation with a
classification head, fine crop) with augmentation; export both to ONNX (plus torch state dicts);
run the real detector on the validation studies to choose the operating thresholds (95% and 99%
specificity); write ``model.json`` and the model card ``README.md``.

On the CPU, deterministic for a seed at a fixed ``--threads`` (batch ``i`` is drawn from its own
seeded generator, so ``--workers`` does not change it).  ``--device cuda`` trains on a GPU with
cuDNN autotuning (reproducible up to floating-point order) and validates with the torch CUDA
backend.  ``python -m pdacscreen.flows.cli_train`` runs the same command without the Prefect/Ray CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdacscreen.engine.errors import TrainingError
from pdacscreen.engine.inference import Detector
from pdacscreen.engine.metrics import confusion_at, roc_auc
from pdacscreen.engine.network import NetworkSpec, build_network
from pdacscreen.engine.package import Preprocessing, default_manifest, load_package
from pdacscreen.engine.preprocess import model_input
from pdacscreen.engine.training.augment import AugmentConfig, sample_patch
from pdacscreen.engine.training.calibrate import thresholds_at
from pdacscreen.engine.training.dataset import (
    CachedStudy,
    archive_records,
    build_cache,
    cached_from_arrays,
    load_cached,
    load_study,
    make_phantom_studies,
    phantom_records,
)
from pdacscreen.engine.training.export import write_package
from pdacscreen.engine.training.modelcard import write_model_card
from pdacscreen.engine.training.trainer import (
    Batch,
    StageTraining,
    TrainingPaused,
    TrainState,
    make_batch_pool,
    resolve_device,
    set_determinism,
    train_stage,
)
from pdacscreen.io.types import CTVolume

__all__ = [
    "TrainOptions",
    "fit",
    "split_records",
    "make_stage1_draw",
    "make_stage2_draw",
]

log = logging.getLogger(__name__)

#: exit status of a training run that paused with a checkpoint (BSD EX_TEMPFAIL: run it again)
EXIT_PAUSED = 75
#: options that may differ between a run and its resumption (they do not change the result)
_RESUMABLE = (
    "resume",
    "checkpoint",
    "checkpoint_minutes",
    "max_minutes",
    "workers",
    "device",
    "threads",
    "cache",
    "command_line",
)


@dataclass(frozen=True)
class TrainOptions:
    """Everything one training run needs (``pdacscreen train`` builds it from its arguments).

    Exactly one of ``archive`` (a phantom archive folder) and ``phantoms`` (N subjects made in
    memory from ``phantom_seed``) is set.  Step counts are multiplied by ``epochs``.

    Checkpoints (``checkpoint``, default ``<out>.checkpoint.pt`` beside the package) are written
    every ``checkpoint_minutes``, on SIGTERM and when ``max_minutes`` is up; the run then exits with
    :data:`EXIT_PAUSED` and ``resume`` continues it exactly (same options, any device). The
    schedule always runs to the planned step counts.

    ``vary_anatomy`` renders the phantom subjects with
    :mod:`pdacscreen.io.phantom.variation` (pancreas pose and shape, habitus, texture, HU
    calibration beyond the generator's ranges; ``--phantoms`` only).  ``stage2_from`` (a model
    package) takes its stage-2 network as it is and trains stage 1 only; the thresholds are still
    chosen on this run's validation split.
    """

    out: Path
    archive: Path | None = None
    phantoms: int | None = None
    phantom_seed: int = 1000
    matrix: int = 256
    pdac_fraction: float = 0.5
    seed: int = 0
    epochs: float = 1.0
    stage1_steps: int = 500
    stage2_steps: int = 3000
    batch: int = 2
    base1: int = 8
    base2: int = 8
    train_patch2: tuple[int, int, int] | None = None
    val_fraction: float = 0.25
    threads: int = 1
    device: str = "cpu"
    workers: int = 1
    max_minutes: float | None = None
    resume: Path | None = None
    checkpoint: Path | None = None
    checkpoint_minutes: float = 5.0
    name: str = "pdacscreen-reference"
    version: str = "0.1.0"
    cache: Path | None = None
    command_line: str | None = None
    vary_anatomy: bool = False
    stage2_from: Path | None = None


def split_records(records: list, *, fraction: float, seed: int) -> tuple[list, list]:
    """Stratified (by lesion type) deterministic split into (train, validation)."""
    if not 0.0 < fraction < 1.0:
        raise TrainingError(f"--val-fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed + 7919)
    train, val = [], []
    for kind in sorted({r.lesion_type for r in records}):
        group = sorted((r for r in records if r.lesion_type == kind), key=lambda r: r.series_uid)
        order = rng.permutation(len(group))
        n_val = int(round(fraction * len(group)))
        for rank, i in enumerate(order):
            (val if rank < n_val else train).append(group[i])
    return sorted(train, key=lambda r: r.series_uid), sorted(val, key=lambda r: r.series_uid)


def _centre_near(
    label: np.ndarray, rng: np.random.Generator, *, value: int | None, jitter: np.ndarray
) -> np.ndarray:
    idx = np.argwhere(label == value) if value is not None else np.argwhere(label > 0)
    if len(idx) == 0:
        return (np.array(label.shape) - 1) / 2.0
    return idx[rng.integers(len(idx))] + rng.uniform(-jitter, jitter)


def make_stage1_draw(
    studies: list[CachedStudy], *, patch, batch: int, pre: Preprocessing, aug: AugmentConfig
):
    """Batches of coarse whole-scan patches: 2/3 centred near the pancreas, 1/3 anywhere."""

    def draw(rng: np.random.Generator) -> Batch:
        xs, ys = [], []
        for _ in range(batch):
            s = studies[rng.integers(len(studies))]
            shape = np.array(s.coarse_hu.shape)
            if rng.random() < 0.67:
                centre = _centre_near(s.coarse_label, rng, value=None, jitter=np.array(patch) / 4.0)
            else:
                centre = rng.uniform(0, shape - 1)
            hu, lab = sample_patch(
                s.coarse_hu, s.coarse_label, centre=centre, patch=tuple(patch), rng=rng, cfg=aug
            )
            xs.append(model_input(hu, pre)[None])
            ys.append(lab)
        return Batch(np.stack(xs), np.stack(ys).astype(np.int64))

    return draw


def make_stage2_draw(
    studies: list[CachedStudy], *, patch, batch: int, pre: Preprocessing, aug: AugmentConfig
):
    """Batches of fine pancreas patches; window label = PDAC voxels inside the patch.

    Half of the PDAC studies' patches are centred on the lesion, the rest near random pancreas
    voxels, so both classes of the head see lesions at the window edge too.
    """
    pos = [s for s in studies if s.pdac]
    neg = [s for s in studies if not s.pdac]
    if not pos or not neg:
        raise TrainingError(
            f"training needs PDAC and non-PDAC studies, got {len(pos)} and {len(neg)}"
        )

    def draw(rng: np.random.Generator) -> Batch:
        xs, ys, cs = [], [], []
        for _ in range(batch):
            s = pos if rng.random() < 0.5 else neg
            s = s[rng.integers(len(s))]
            jitter = np.array(patch) / 3.0
            value = 2 if s.pdac and rng.random() < 0.5 else None
            centre = _centre_near(s.fine_label, rng, value=value, jitter=jitter)
            hu, lab = sample_patch(
                s.fine_hu, s.fine_label, centre=centre, patch=tuple(patch), rng=rng, cfg=aug
            )
            xs.append(model_input(hu, pre)[None])
            ys.append(lab)
            cs.append(1.0 if (lab == 2).sum() >= 4 else 0.0)
        return Batch(np.stack(xs), np.stack(ys).astype(np.int64), np.array(cs, np.float32))

    return draw


def _progress(stage: str):
    def cb(step: int, total: int, loss: float) -> None:
        log.info("%s %d/%d loss %.4f", stage, step, total, loss)

    return cb


def _thresholds(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Thresholds at >= 95% and >= 99% specificity on the validation negatives (0.5 without any):
    :func:`pdacscreen.engine.training.calibrate.thresholds_at`, the one rule for both."""
    neg = np.asarray(scores)[np.asarray(labels) == 0]
    if len(neg) == 0:
        return {"specificity_95": 0.5, "specificity_99": 0.5}
    return thresholds_at(neg)


def _sensitivity(y: np.ndarray, s: np.ndarray, threshold: float) -> float:
    tp, fn, _, _ = confusion_at(y, s, threshold)
    return tp / (tp + fn) if tp + fn else float("nan")


def _validate(package_dir: Path, cases, *, threads: int, backend: str = "onnxruntime") -> dict:
    """Run the packaged detector on validation ``(volume, record)`` cases; scores and metrics."""

    det = Detector(load_package(package_dir), backend=backend, threads=threads)
    by_score: dict[str, list[float]] = {"cls": [], "lesion_peak": []}
    labels = []
    for i, (volume, rec) in enumerate(cases):
        res = det.detect(volume)
        by_score["cls"].append(float(res.diagnostics.get("cls_probability", 0.0)))
        by_score["lesion_peak"].append(float(res.diagnostics.get("lesion_peak", 0.0)))
        labels.append(int(rec.pdac))
        log.info(
            "validation %d cls=%.3f peak=%.3f truth=%s",
            i + 1,
            by_score["cls"][-1],
            by_score["lesion_peak"][-1],
            rec.lesion_type,
        )
    y = np.array(labels)
    aucs = {k: roc_auc(y, np.array(v)) for k, v in by_score.items()}
    # The study score with the better validation AUROC (ties: the classification head).
    score = "lesion_peak" if aucs["lesion_peak"] > aucs["cls"] else "cls"
    s = np.array(by_score[score])
    th = _thresholds(s, y)
    return {
        "score": score,
        "auroc_by_score": aucs,
        "scores": s,
        "labels": y,
        "thresholds": th,
        "auroc": roc_auc(y, s),
        "sensitivity_at_95": _sensitivity(y, s, th["specificity_95"]),
        "sensitivity_at_99": _sensitivity(y, s, th["specificity_99"]),
        "studies": len(labels),
        "positives": int(y.sum()),
    }


def _train_command() -> str:
    argv = sys.argv[1:]
    if "train" in argv:
        argv = argv[argv.index("train") + 1 :]
    return "pdacscreen train " + " ".join(argv)


def _phantom_command(archive: Path, studies: int) -> str:
    """The ``pdacscreen phantom`` command that made ``archive`` (from its phantom.json)."""

    meta_path = Path(archive) / "phantom.json"
    if not meta_path.is_file():
        return ""
    meta = json.loads(meta_path.read_text())
    return (
        f"pdacscreen phantom --out {archive} --studies {studies} --seed {meta.get('seed')} "
        f"--matrix {meta.get('matrix')} --compress {meta.get('compress', 'none')} "
        f"--pdac-fraction {meta.get('pdac_fraction', 0.5)}"
    )


def _load_data(opts, st1: dict, st2: dict, work: Path):
    """``(records, training studies, training records, validation records, val_cases)``.

    ``val_cases()`` yields ``(volume, record)`` of the validation split for :func:`_validate`.
    """
    coarse_mm, fine_mm = tuple(st1["spacing_mm"]), tuple(st2["spacing_mm"])
    if opts.phantoms is not None:
        records = phantom_records(
            seed=opts.phantom_seed, studies=opts.phantoms, pdac_fraction=opts.pdac_fraction
        )
        train_recs, val_recs = split_records(records, fraction=opts.val_fraction, seed=opts.seed)
        arrays, volumes = make_phantom_studies(
            records,
            matrix=opts.matrix,
            coarse_mm=coarse_mm,
            fine_mm=fine_mm,
            keep_volumes={r.index for r in val_recs},
            workers=opts.workers,
            vary=opts.vary_anatomy,
            progress=lambda i, n: (
                log.info("phantom %d/%d", i, n) if i % 20 == 0 or i == n else None
            ),
        )
        studies = [cached_from_arrays(arrays[r.index], r) for r in train_recs]

        def val_cases():
            for r in val_recs:
                hu, spacing, affine = volumes[r.index]
                vol = CTVolume(
                    hu.astype(np.float32), spacing, affine, series_instance_uid=r.series_uid
                )
                yield vol, r

        return records, studies, train_recs, val_recs, val_cases
    if opts.vary_anatomy:
        raise TrainingError("--vary-anatomy needs --phantoms (an archive's images are fixed)")
    records = archive_records(opts.archive)
    train_recs, val_recs = split_records(records, fraction=opts.val_fraction, seed=opts.seed)
    paths = build_cache(
        train_recs,
        cache_dir=opts.cache or work / "engine" / "cache",
        coarse_mm=coarse_mm,
        fine_mm=fine_mm,
        progress=lambda i, n: log.info("cache %d/%d", i, n),
    )
    studies = [load_cached(p, r) for p, r in zip(paths, train_recs, strict=True)]

    def val_cases():
        for r in val_recs:
            yield load_study(r)[0], r

    return records, studies, train_recs, val_recs, val_cases


def _stage2_from(package: Path) -> tuple[torch.nn.Module, dict]:
    """Stage 2 of an existing package (``--stage2-from``): its network and where it came from."""
    pkg = load_package(package)
    stage = pkg.stages["stage2"]
    if stage.weights is None:
        raise TrainingError(f"--stage2-from {package}: the package has no stage-2 torch weights")
    net = build_network(stage.network)
    net.load_state_dict(torch.load(stage.weights, map_location="cpu", weights_only=True))
    digest = hashlib.sha256(Path(stage.weights).read_bytes()).hexdigest()
    return net, {"package": f"{pkg.name} {pkg.version}", "weights_sha256": digest}


def _fingerprint(opts: TrainOptions) -> str:
    """sha256 of the options that decide the result (a checkpoint resumes only the same run)."""
    d = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _RESUMABLE}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


class _Checkpoints:
    """One checkpoint file per run, replaced atomically (a crash mid-write keeps the last one)."""

    def __init__(self, opts: TrainOptions, fingerprint: str) -> None:
        out = Path(opts.out)
        self.path = Path(opts.checkpoint or out.with_name(out.name + ".checkpoint.pt"))
        self.fingerprint = fingerprint
        self.sessions = 0

    def save(self, stage: str, state: TrainState, *, stage1: dict | None = None) -> None:
        payload = {
            "version": 1,
            "fingerprint": self.fingerprint,
            "stage": stage,
            "state": state.as_dict(),
            "stage1": stage1,
            "sessions": self.sessions + 1,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)
        log.info("checkpoint %s: %s step %d", self.path, stage, state.step)

    def load(self, path: Path) -> dict:
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as e:
            raise TrainingError(f"--resume {path}: cannot read the checkpoint ({e})") from e
        if payload.get("version") != 1 or payload.get("fingerprint") != self.fingerprint:
            raise TrainingError(
                f"--resume {path}: the checkpoint was made with other training options "
                "(data, seeds, steps, networks or batch differ); resume with the same command"
            )
        self.sessions = int(payload["sessions"])
        return payload

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class _StopRequest:
    """``should_stop`` for :func:`train_stage`: true after SIGTERM or past the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline, self.why = deadline, ""
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.why = "SIGTERM"

    def __call__(self) -> bool:
        if not self.why and self.deadline is not None and time.perf_counter() >= self.deadline:
            self.why = "time budget"
        return bool(self.why)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def fit(opts: TrainOptions) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    t_start = time.perf_counter()
    device = resolve_device(opts.device)
    set_determinism(opts.seed, opts.threads, device=device)
    manifest = default_manifest(name=opts.name, version=opts.version)
    pre = Preprocessing.from_manifest(manifest["preprocessing"])
    st1, st2 = manifest["stages"]["stage1"], manifest["stages"]["stage2"]
    work = Path(os.environ.get("PDACSCREEN_WORK", "work"))
    records, studies, train_recs, val_recs, val_cases = _load_data(opts, st1, st2, work)
    console.print(
        f"[bold]train[/]: {len(records)} studies, {len(train_recs)} training, "
        f"{len(val_recs)} validation; device {device}"
    )
    t_data = time.perf_counter() - t_start
    console.print(f"training data ready in {t_data:.0f}s")
    aug = AugmentConfig()
    steps1 = max(1, int(opts.stage1_steps * opts.epochs))
    steps2 = max(1, int(opts.stage2_steps * opts.epochs))
    patch2 = tuple(opts.train_patch2) if opts.train_patch2 else tuple(st2["patch"])
    draw1 = make_stage1_draw(studies, patch=st1["patch"], batch=opts.batch, pre=pre, aug=aug)
    draw2 = make_stage2_draw(studies, patch=patch2, batch=opts.batch, pre=pre, aug=aug)
    pool = make_batch_pool(
        opts.workers, {"stage1": draw1, "stage2": draw2}
    )  # forked before CUDA is touched
    ckpt = _Checkpoints(opts, _fingerprint(opts))
    resume = ckpt.load(opts.resume) if opts.resume is not None else None
    deadline = None if opts.max_minutes is None else t_start + 60.0 * opts.max_minutes
    stop = _StopRequest(deadline)
    net1 = build_network(NetworkSpec(out_channels=2, base=opts.base1, depth=3))
    if opts.stage2_from is not None:
        net2, stage2_source = _stage2_from(Path(opts.stage2_from))
    else:
        net2 = build_network(NetworkSpec(out_channels=3, base=opts.base2, depth=3, cls_head=True))
        stage2_source = None
    common = {
        "device": device,
        "pool": pool,
        "should_stop": stop,
        "checkpoint_every_s": 60.0 * opts.checkpoint_minutes,
    }
    try:
        if resume is not None and resume["stage"] == "stage2":
            net1.load_state_dict(resume["stage1"]["net"])
            hist1 = resume["stage1"]["history"]
        else:
            hist1 = train_stage(
                net1,
                draw1,
                settings=StageTraining(steps=steps1, lr=3e-3, class_weights=(1.0, 3.0)),
                seed=opts.seed,
                name="stage1",
                start=None if resume is None else TrainState.from_dict(resume["state"]),
                on_checkpoint=lambda st: ckpt.save("stage1", st),
                **common,
            )
        console.print(
            f"stage 1 done ({hist1[-1]['step']} steps) in {time.perf_counter() - t_start:.0f}s, "
            f"loss {hist1[-1]['loss']:.3f}"
        )
        stage1 = {"net": {k: v.clone() for k, v in net1.state_dict().items()}, "history": hist1}
        if stage2_source is not None:  # --stage2-from: stage 2 as it is
            hist2 = [{"step": 0, "loss": None}]
        else:
            hist2 = train_stage(
                net2,
                draw2,
                settings=StageTraining(
                    steps=steps2, lr=2e-3, class_weights=(1.0, 1.0, 2.0), cls_weight=1.0
                ),
                seed=opts.seed + 1,
                name="stage2",
                start=(
                    TrainState.from_dict(resume["state"])
                    if resume is not None and resume["stage"] == "stage2"
                    else None
                ),
                on_checkpoint=lambda st: ckpt.save("stage2", st, stage1=stage1),
                **common,
            )
    except TrainingPaused as p:
        console.print(
            f"[yellow]paused[/] ({stop.why}) in {p.name} after step {p.state.step}; checkpoint "
            f"{ckpt.path}. Continue with the same command plus --resume {ckpt.path}"
        )
        return EXIT_PAUSED
    finally:
        stop.restore()
        if pool is not None:
            pool.terminate()
    if stage2_source is None:
        console.print(
            f"stage 2 done ({hist2[-1]['step']} steps) in {time.perf_counter() - t_start:.0f}s, "
            f"loss {hist2[-1]['loss']:.3f}"
        )
    else:
        console.print(f"stage 2 taken from {stage2_source['package']}")
    command = opts.command_line or _train_command()
    if opts.phantoms is not None:
        source = {
            "archive": None,
            "phantoms": {
                "seed": opts.phantom_seed,
                "studies": opts.phantoms,
                "matrix": opts.matrix,
                "pdac_fraction": opts.pdac_fraction,
                "made": "in memory by pdacscreen.io.phantom.subject (study k = pdacscreen phantom "
                f"--seed {opts.phantom_seed} study k, no DICOM round trip)",
            },
            "commands": [command],
        }
    else:
        source = {
            "archive": str(opts.archive),
            "commands": [c for c in (_phantom_command(opts.archive, len(records)), command) if c],
        }
    manifest["training_data"] = {
        **source,
        "studies": len(records),
        "training_studies": len(train_recs),
        "validation_studies": len(val_recs),
        "by_type": {
            t: sum(r.lesion_type == t for r in records)
            for t in sorted({r.lesion_type for r in records})
        },
        "seed": opts.seed,
        "command": command,
        "device": device,
        "stage1_steps": hist1[-1]["step"],
        "stage2_steps": hist2[-1]["step"],
        "sessions": 1 + (0 if resume is None else resume["sessions"]),
        "stage2_training_patch": list(patch2),
        "stage2_from": stage2_source,
        "anatomy_variation": bool(opts.vary_anatomy),
        "batch": opts.batch,
        "augmentation": {k: v for k, v in aug.__dict__.items()},
    }
    write_package(opts.out, nets={"stage1": net1, "stage2": net2}, manifest=manifest)
    backend = "torch-cuda" if device.startswith("cuda") else "onnxruntime"
    val = _validate(opts.out, val_cases(), threads=opts.threads, backend=backend)
    th = val["thresholds"]
    manifest["postprocessing"]["score"] = val["score"]
    manifest["thresholds"] = {
        "operating": th["specificity_95"],
        "specificity_95": th["specificity_95"],
        "specificity_99": th["specificity_99"],
        "method": (
            f"chosen on the validation split ({val['studies']} studies, {val['positives']} PDAC) by "
            f"running the packaged detector ({backend}): the lowest probability with specificity "
            ">= 0.95 (resp. >= 0.99) on the validation non-PDAC studies; operating = the "
            f"95%-specificity threshold; study score '{val['score']}' (validation AUROC by score: "
            + ", ".join(f"{k} {v:.3f}" for k, v in val["auroc_by_score"].items())
            + ")"
        ),
    }
    manifest["metrics"] = {
        "validation": {k: v for k, v in val.items() if k not in ("scores", "labels", "thresholds")},
        "training_seconds": round(time.perf_counter() - t_start, 1),
        "data_seconds": round(t_data, 1),
        "loss": {"stage1": hist1[-1]["loss"], "stage2": hist2[-1]["loss"]},
    }
    write_package(opts.out, nets={"stage1": net1, "stage2": net2}, manifest=manifest)
    write_model_card(opts.out)
    ckpt.remove()
    console.print(
        f"[green]wrote[/] {opts.out}: validation AUROC {val['auroc']:.3f}, "
        f"sensitivity {val['sensitivity_at_95']:.2f} at 95% specificity; "
        f"{time.perf_counter() - t_start:.0f}s in all"
    )
    return 0
