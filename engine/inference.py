"""The two-stage detector: a CT volume in, a :class:`StudyResult` (findings + masks) out.

Per study (``detect``) or for several at once (``detect_batch``, windows of all studies share
batches):

1. stage 1: resample the whole scan to the coarse grid (``stage1.spacing_mm``), normalise, run the
   localiser window by window -> pancreas probability -> pancreas box (world mm) + QC;
2. crop: sample only that box at the fine spacing (``crop_resample``; the box is capped by
   ``max_box_mm`` so memory and window count are bounded for any scan size);
3. stage 2: sliding window with Gaussian blending -> pancreas / lesion probabilities and the
   study-level PDAC probability (max of the classification head over windows);
4. postprocessing: organ mask, lesion candidates, measurements, location, QC flags.

All pre- and postprocessing runs through :mod:`pdacscreen.kernels` (NumPy here, CuPy on a GPU).
Arrays are ``(z, y, x)``; affines map index ``(k, j, i, 1)`` to LPS mm.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pdacscreen.engine.backends import Backend, cuda_available, open_backend
from pdacscreen.engine.config import EngineConfig
from pdacscreen.engine.errors import EngineInputError, InferenceError
from pdacscreen.engine.package import ModelPackage, StageSpec
from pdacscreen.engine.postprocess import (
    lesion_candidates,
    localise,
    organ_mask,
    softmax,
)
from pdacscreen.engine.tiling import Blender, TilePlan, extract_patch, pad_to_plan, plan_tiles
from pdacscreen.io.errors import PdacscreenError
from pdacscreen.io.types import CTVolume

__all__ = ["Detector", "StudyResult", "StudyMasks", "FINDINGS_COLUMNS"]

log = logging.getLogger(__name__)

FINDINGS_COLUMNS = (
    "pdac_probability",
    "pdac_flag",
    "operating_threshold",
    "lesion_count",
    "lesion_diameter_mm",
    "lesion_volume_ml",
    "lesion_center_x_mm",
    "lesion_center_y_mm",
    "lesion_center_z_mm",
    "lesion_location",
    "pancreas_volume_ml",
    "pancreas_mean_hu",
    "qc_flags",
)


@dataclass(frozen=True)
class StudyMasks:
    """Stage-2 masks on the crop grid (not serialised into findings).

    ``pancreas``/``lesion`` are uint8 ``(z, y, x)`` masks, ``lesion_prob`` float16 in [0, 1],
    ``affine`` maps crop index ``(k, j, i, 1)`` -> LPS mm; ``focus_mm`` is the (x, y, z) point the
    key image cuts through (largest lesion centre, else the pancreas centre).
    """

    pancreas: np.ndarray
    lesion: np.ndarray
    lesion_prob: np.ndarray
    affine: np.ndarray
    focus_mm: tuple[float, float, float]


@dataclass(frozen=True)
class StudyResult:
    """Findings of one study. Lesion fields describe the largest candidate (NaN/"" when none).

    ``pdac_probability`` is NaN when the pancreas was not found (QC flag ``pancreas_not_found``).
    Coordinates are patient LPS mm; volumes ml; HU for ``pancreas_mean_hu``.
    """

    pdac_probability: float
    pdac_flag: bool
    operating_threshold: float
    lesion_count: int
    lesion_diameter_mm: float
    lesion_volume_ml: float
    lesion_center_x_mm: float
    lesion_center_y_mm: float
    lesion_center_z_mm: float
    lesion_location: str
    pancreas_volume_ml: float
    pancreas_mean_hu: float
    qc_flags: tuple[str, ...]
    timings: dict = field(default_factory=dict, compare=False)
    masks: StudyMasks | None = field(default=None, compare=False, repr=False)
    diagnostics: dict = field(default_factory=dict, compare=False)

    def to_row(self) -> dict:
        """The findings columns (``qc_flags`` as a list)."""
        row = {name: getattr(self, name) for name in FINDINGS_COLUMNS}
        row["qc_flags"] = list(self.qc_flags)
        return row


@dataclass
class _Job:
    """Working state of one study inside a batch."""

    index: int
    volume: CTVolume
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    coarse_affine: np.ndarray | None = None
    coarse_input: np.ndarray | None = None
    localisation: object | None = None
    crop_hu: np.ndarray | None = None
    crop_affine: np.ndarray | None = None
    crop_input: np.ndarray | None = None
    qc: list = field(default_factory=list)
    error: Exception | None = None


def _host(a):
    from pdacscreen.kernels import to_host

    return to_host(a)


class Detector:
    """Two-stage PDAC detector bound to one model package and one backend.

    Args:
        package: a loaded :class:`ModelPackage`.
        config: an :class:`~pdacscreen.engine.config.EngineConfig` (resolved for this node when it
            still says ``auto``); it sets the backend and the batch.
        backend: inference backend name (see :mod:`pdacscreen.engine.backends`), when no config.
        batch_size: windows per network call (windows of several studies share a batch), when no
            config.
        kernel_backend: ``"auto" | "numpy" | "cupy"`` for pre/postprocessing kernels.
        threads: intra-op threads for ONNX Runtime (None: its default).
    """

    def __init__(
        self,
        package: ModelPackage,
        *,
        config: EngineConfig | None = None,
        backend: str = "auto",
        batch_size: int = 4,
        kernel_backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        if config is not None:
            config = config.resolve(gpu=cuda_available())
            backend, batch_size = config.backend_name(), config.batch
        if batch_size < 1:
            raise EngineInputError(f"batch_size must be >= 1, got {batch_size}")
        self.package = package
        self.batch_size = int(batch_size)
        self.kernel_backend = kernel_backend
        self.backends: dict[str, Backend] = {
            name: open_backend(
                package.stages[name], backend=backend, threads=threads, max_batch=batch_size
            )
            for name in ("stage1", "stage2")
        }
        self.backend_name = self.backends["stage2"].name
        precision = "fp16" if self.backend_name == "tensorrt" else "fp32"
        runtime, _, device = self.backend_name.partition("-")
        #: what actually runs the model, as recorded in findings rows (runtime-device-precision)
        self.engine_backend = f"{runtime}-{device or 'cuda'}-{precision}"

    # ------------------------------------------------------------------ public API
    def detect(self, volume: CTVolume) -> StudyResult:
        """Findings for one study."""
        return self.detect_batch([volume])[0]

    def detect_batch(self, volumes: Sequence[CTVolume]) -> list[StudyResult]:
        """Findings for several studies; their windows are batched together.

        Raises:
            InferenceError: for the first study that fails (``.index`` says which; the caller can
                retry the others), wrapping the typed cause.
        """
        jobs = [_Job(i, v) for i, v in enumerate(volumes)]
        for job in jobs:
            if not isinstance(job.volume, CTVolume):
                raise InferenceError(
                    f"detect_batch item {job.index} must be a CTVolume, got {type(job.volume).__name__}",
                    code="bad_input",
                    index=job.index,
                )
        try:
            for job in jobs:
                self._guard(job, self._prepare_stage1)
            self._run_stage(jobs, "stage1")
            for job in jobs:
                self._guard(job, self._prepare_stage2)
            self._run_stage([j for j in jobs if j.crop_input is not None], "stage2")
            return [self._guard(job, self._finish) for job in jobs]
        finally:
            for job in jobs:  # free the big intermediates promptly
                job.coarse_input = job.crop_input = None

    # ------------------------------------------------------------------ stages
    def _guard(self, job: _Job, fn):
        try:
            return fn(job)
        except InferenceError:
            raise
        except PdacscreenError as e:
            raise InferenceError(
                f"study {job.index} ({job.volume.series_instance_uid or 'no uid'}): {e}",
                code=e.code,
                index=job.index,
            ) from e
        except (ValueError, MemoryError, FloatingPointError) as e:
            raise InferenceError(
                f"study {job.index} ({job.volume.series_instance_uid or 'no uid'}): "
                f"{type(e).__name__}: {e}",
                index=job.index,
            ) from e

    def _to_input(self, hu) -> np.ndarray:
        from pdacscreen.kernels import to_model_input

        pre = self.package.preprocessing
        x = to_model_input(
            hu,
            window=pre.window_hu,
            mean=pre.mean,
            std=pre.std,
            dtype="float32",
            backend=self.kernel_backend,
        )
        return np.asarray(_host(x), dtype=np.float32)

    def _prepare_stage1(self, job: _Job) -> None:
        from pdacscreen.kernels import resample

        t0 = time.perf_counter()
        st = self.package.stage1
        vol = job.volume
        coarse, caff = resample(
            vol.array,
            vol.affine,
            st.spacing_mm,
            order=1,
            antialias=True,
            fill=-1024.0,
            backend=self.kernel_backend,
        )
        job.coarse_affine = np.asarray(caff)
        job.coarse_input = self._to_input(coarse)
        job.diagnostics["coarse_shape"] = tuple(int(s) for s in job.coarse_input.shape)
        job.timings["stage1_preprocess"] = time.perf_counter() - t0

    def _prepare_stage2(self, job: _Job) -> None:
        from pdacscreen.kernels import crop_resample

        t0 = time.perf_counter()
        st2 = self.package.stage2
        post = self.package.postprocessing
        prob = softmax(job.diagnostics.pop("stage1_logits"))[1]
        loc = localise(
            prob,
            job.coarse_affine,
            threshold=post.pancreas_threshold,
            min_ml=post.min_pancreas_ml,
            margin_mm=st2.margin_mm,
            max_box_mm=st2.max_box_mm,
        )
        job.localisation = loc
        if not loc.found:
            job.qc.append("pancreas_not_found")
            job.timings["crop"] = time.perf_counter() - t0
            return
        if loc.cut_by_fov:
            job.qc.append("pancreas_cut_by_fov")
        if loc.confidence < post.localisation_confidence_min:
            job.qc.append("low_localisation_confidence")
        crop, caff = crop_resample(
            job.volume.array,
            job.volume.affine,
            box_min=loc.box_min,
            box_max=loc.box_max,
            target_spacing=st2.spacing_mm,
            order=1,
            fill=-1024.0,
            backend=self.kernel_backend,
        )
        job.crop_hu = np.asarray(_host(crop), dtype=np.float32)
        job.crop_affine = np.asarray(caff)
        job.crop_input = self._to_input(job.crop_hu)
        job.diagnostics["crop_shape"] = tuple(int(s) for s in job.crop_hu.shape)
        job.timings["crop"] = time.perf_counter() - t0

    def _run_stage(self, jobs: list[_Job], name: str) -> None:
        """Tile every job's input, run all windows in shared batches, blend per job."""
        if not jobs:
            return
        st: StageSpec = self.package.stages[name]
        backend = self.backends[name]
        pre = self.package.preprocessing
        pad_value = (pre.window_hu[0] - pre.mean) / pre.std
        attr = "coarse_input" if name == "stage1" else "crop_input"
        plans: list[TilePlan] = []
        padded: list[np.ndarray] = []
        blenders: list[Blender] = []
        cls = [-math.inf] * len(jobs)
        for job in jobs:
            image = getattr(job, attr)
            plan = plan_tiles(image.shape, patch=st.patch, overlap=st.overlap)
            plans.append(plan)
            padded.append(pad_to_plan(image[None], plan, value=pad_value))
            blenders.append(Blender(plan, st.network.out_channels))
            job.diagnostics[f"{name}_windows"] = plan.count
        work = [(j, s) for j, plan in enumerate(plans) for s in plan.starts]
        seconds = [0.0] * len(jobs)
        for b in range(0, len(work), self.batch_size):
            chunk = work[b : b + self.batch_size]
            batch = np.stack([extract_patch(padded[j], s, st.patch) for j, s in chunk])
            t0 = time.perf_counter()
            out = backend.predict(np.ascontiguousarray(batch))
            dt = (time.perf_counter() - t0) / len(chunk)
            seg = np.asarray(_host(out["seg"]), dtype=np.float32)
            cls_out = np.asarray(_host(out["cls"]), dtype=np.float32) if "cls" in out else None
            for n, (j, s) in enumerate(chunk):
                blenders[j].add(s, seg[n])
                seconds[j] += dt
                if cls_out is not None:
                    cls[j] = max(cls[j], float(cls_out[n, 0]))
        for j, job in enumerate(jobs):
            t0 = time.perf_counter()
            job.diagnostics[f"{name}_logits"] = blenders[j].result()
            if name == "stage2":
                job.diagnostics["cls_logit"] = cls[j]
            job.timings[name] = seconds[j] + time.perf_counter() - t0

    def _finish(self, job: _Job) -> StudyResult:
        from pdacscreen.kernels import noise_hu

        t0 = time.perf_counter()
        post = self.package.postprocessing
        th = self.package.thresholds.operating
        qc = list(job.qc)
        vol = job.volume
        # Noise QC on a strided in-plane view (no copy) of about 2 mm: the local SD in homogeneous
        # tissue needs no finer grid; on a 512 matrix this quarters the cost and moves the estimate
        # towards the nominal (correlated) noise.  The contrast phase is not the engine's: the
        # loader measures it once (kernels.measure.measure_phase).
        step = max(1, int(2.0 // min(vol.spacing[1], vol.spacing[2])))
        sub = vol.array[:, ::step, ::step]
        try:
            if float(noise_hu(sub, backend=self.kernel_backend)) > post.noise_hu_max:
                qc.append("high_noise")
        except PdacscreenError as e:
            log.debug("noise measurement failed: %s", e)
        nan = float("nan")
        if job.crop_input is None or "stage2_logits" not in job.diagnostics:
            job.timings["postprocess"] = time.perf_counter() - t0
            return StudyResult(
                nan,
                False,
                th,
                0,
                nan,
                0.0,
                nan,
                nan,
                nan,
                "",
                0.0,
                nan,
                tuple(qc),
                timings=dict(job.timings),
                diagnostics=self._diag(job),
            )
        probs = softmax(job.diagnostics.pop("stage2_logits"))
        caff = job.crop_affine
        organ = organ_mask(probs[1] + probs[2], caff, threshold=post.pancreas_threshold)
        lesion_prob = probs[2]
        lesions, lesion_mask = lesion_candidates(
            lesion_prob, organ, caff, threshold=post.lesion_threshold, min_ml=post.min_lesion_ml
        )
        parenchyma = organ & ~lesion_mask
        vox_ml = abs(float(np.linalg.det(caff[:3, :3]))) / 1000.0
        hu = job.crop_hu
        p_cls = 1.0 / (1.0 + math.exp(-job.diagnostics.pop("cls_logit")))
        p_peak = float(lesion_prob.max()) if lesion_prob.size else 0.0
        job.diagnostics["cls_probability"] = p_cls
        job.diagnostics["lesion_peak"] = p_peak
        p = p_peak if post.score == "lesion_peak" else p_cls
        if lesions:
            big = lesions[0]
            focus = big.center_mm
            lesion_fields = (big.diameter_mm, big.volume_ml, *big.center_mm, big.location)
        else:
            idx = np.argwhere(organ)
            centre = idx.mean(axis=0) if len(idx) else (np.array(organ.shape) - 1) / 2.0
            focus = tuple(float(v) for v in caff[:3, :3] @ centre + caff[:3, 3])
            lesion_fields = (nan, 0.0, nan, nan, nan, "")
        masks = StudyMasks(
            pancreas=(organ | lesion_mask).astype(np.uint8),
            lesion=lesion_mask.astype(np.uint8),
            lesion_prob=lesion_prob.astype(np.float16),
            affine=caff,
            focus_mm=focus,
        )
        job.timings["postprocess"] = time.perf_counter() - t0
        return StudyResult(
            pdac_probability=float(p),
            pdac_flag=bool(p >= th),
            operating_threshold=float(th),
            lesion_count=len(lesions),
            lesion_diameter_mm=float(lesion_fields[0]),
            lesion_volume_ml=float(lesion_fields[1]),
            lesion_center_x_mm=float(lesion_fields[2]),
            lesion_center_y_mm=float(lesion_fields[3]),
            lesion_center_z_mm=float(lesion_fields[4]),
            lesion_location=str(lesion_fields[5]),
            pancreas_volume_ml=float((organ | lesion_mask).sum() * vox_ml),
            pancreas_mean_hu=float(hu[parenchyma].mean()) if parenchyma.any() else nan,
            qc_flags=tuple(qc),
            timings=dict(job.timings),
            masks=masks,
            diagnostics=self._diag(job),
        )

    def _diag(self, job: _Job) -> dict:
        d = {k: v for k, v in job.diagnostics.items() if not k.endswith("_logits")}
        d["model"] = f"{self.package.name} {self.package.version}"
        d["backend"] = self.backend_name
        loc = job.localisation
        if loc is not None:
            d["localisation_confidence"] = float(loc.confidence)
            d["box_min_mm"], d["box_max_mm"] = loc.box_min, loc.box_max
        return d
