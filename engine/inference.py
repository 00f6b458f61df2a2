"""The two-stage detector: a CT volume in, a :class:`StudyResult` (findings + masks) out.

Per study (``detect``):

1. stage 1: the whole scan on the coarse grid (:func:`pdacscreen.engine.preprocess.coarse_grid`,
   :func:`~pdacscreen.engine.preprocess.model_input`), the localiser over it window by window
   (:func:`pdacscreen.engine.tiling.sliding_window`) -> pancreas probability -> pancreas box
   (world mm) + QC;
2. crop: only that box at the fine spacing (:func:`~pdacscreen.engine.preprocess.fine_crop`; the
   box is capped by ``max_box_mm`` so memory and window count are bounded for any scan size);
3. stage 2: the detector by sliding window with Gaussian blending -> pancreas / lesion
   probabilities and the study-level PDAC probability (max of the classification head over windows);
4. crop check: when the stage-2 gland reaches a crop face that lies inside the scan, the gland
   goes on outside the crop; the crop is grown on those sides and stage 2 runs once more
   (:class:`~pdacscreen.engine.postprocess.LocalisationQC`); a localisation that looks partial
   (the crop had to grow, the gland still at the crop's face, a gland too short, or stage-1 mass
   outside the chosen component) is flagged ``partial_localisation`` with the measured reason in
   ``diagnostics["qc_reasons"]``; a study without the flag has the plain two-stage result;
5. postprocessing: organ mask, lesion candidates, measurements, location, QC flags.

The model input is built only in :mod:`pdacscreen.engine.preprocess` (training uses the same
functions); all array math runs through :mod:`pdacscreen.kernels` (NumPy here, CuPy on a GPU).
Arrays are ``(z, y, x)``; affines map index ``(k, j, i, 1)`` to LPS mm.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from pdacscreen.engine.backends import Backend, cuda_available, open_backend
from pdacscreen.engine.config import EngineConfig
from pdacscreen.engine.errors import EngineInputError, InferenceError
from pdacscreen.engine.package import ModelPackage, StageSpec
from pdacscreen.engine.postprocess import (
    LocalisationQC,
    crop_faces_touched,
    gland_length_mm,
    grow_box,
    lesion_candidates,
    localise,
    organ_mask,
    pancreas_scores,
    partial_localisation,
    softmax,
)
from pdacscreen.engine.preprocess import coarse_grid, fine_crop, model_input
from pdacscreen.engine.tiling import sliding_window
from pdacscreen.io.errors import PdacscreenError
from pdacscreen.io.types import CTVolume, voxel_to_world
from pdacscreen.kernels import noise_hu, to_host

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
    """Working state of one study through the two stages."""

    volume: CTVolume
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    coarse_affine: np.ndarray | None = None
    coarse_input: np.ndarray | None = None
    localisation: object | None = None
    crop_hu: np.ndarray | None = None
    crop_affine: np.ndarray | None = None
    crop_input: np.ndarray | None = None
    crop_box: tuple | None = None
    stage2_probs: np.ndarray | None = None
    organ: np.ndarray | None = None
    open_faces: dict = field(default_factory=dict)
    qc: list = field(default_factory=list)


class Detector:
    """Two-stage PDAC detector bound to one model package and one backend.

    Args:
        package: a loaded :class:`ModelPackage`.
        config: an :class:`~pdacscreen.engine.config.EngineConfig` (resolved for this node when it
            still says ``auto``); it sets the backend and the batch.
        backend: inference backend name (see :mod:`pdacscreen.engine.backends`), when no config.
        batch_size: windows per network call, when no config.
        kernel_backend: ``"auto" | "numpy" | "cupy"`` for pre/postprocessing kernels.
        threads: intra-op threads for ONNX Runtime (None: its default).
        localisation_qc: the ``partial_localisation`` check and crop growth
            (:class:`~pdacscreen.engine.postprocess.LocalisationQC`; None: its defaults).
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
        localisation_qc: LocalisationQC | None = None,
    ) -> None:
        self.localisation_qc = localisation_qc or LocalisationQC()
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
        """Findings for one study.

        Raises:
            InferenceError: wrapping the typed cause (``code`` says which), for input the
                detector cannot take or a failure of a stage.
        """
        if not isinstance(volume, CTVolume):
            raise InferenceError(
                f"detect takes a CTVolume, got {type(volume).__name__}", code="bad_input"
            )
        job = _Job(volume)
        try:
            self._guard(job, self._prepare_stage1)
            self._guard(job, lambda j: self._run_stage(j, "stage1"))
            self._guard(job, self._prepare_stage2)
            if job.crop_input is not None:
                self._guard(job, lambda j: self._run_stage(j, "stage2"))
                self._guard(job, self._check_crop)
            return self._guard(job, self._finish)
        finally:  # free the big intermediates promptly
            job.coarse_input = job.crop_input = None

    # ------------------------------------------------------------------ stages
    def _guard(self, job: _Job, fn):
        try:
            return fn(job)
        except InferenceError:
            raise
        except PdacscreenError as e:
            raise InferenceError(
                f"study {job.volume.series_instance_uid or 'no uid'}: {e}", code=e.code
            ) from e
        except (ValueError, MemoryError, FloatingPointError) as e:
            raise InferenceError(
                f"study {job.volume.series_instance_uid or 'no uid'}: {type(e).__name__}: {e}"
            ) from e

    def _prepare_stage1(self, job: _Job) -> None:
        t0 = time.perf_counter()
        coarse, job.coarse_affine = coarse_grid(
            job.volume, self.package.stage1.spacing_mm, backend=self.kernel_backend
        )
        job.coarse_input = model_input(
            coarse, self.package.preprocessing, backend=self.kernel_backend
        )
        job.diagnostics["coarse_shape"] = tuple(int(s) for s in job.coarse_input.shape)
        job.timings["stage1_preprocess"] = time.perf_counter() - t0

    def _prepare_stage2(self, job: _Job) -> None:
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
        self._crop(job, (loc.box_min, loc.box_max))
        job.timings["crop"] = time.perf_counter() - t0

    def _crop(self, job: _Job, box) -> None:
        """Stage 2's input: the world box ``(min, max)`` (x, y, z) mm at the stage-2 spacing."""
        crop, job.crop_affine = fine_crop(
            job.volume.array,
            job.volume.affine,
            box,
            self.package.stage2.spacing_mm,
            backend=self.kernel_backend,
        )
        job.crop_box = (tuple(box[0]), tuple(box[1]))
        job.crop_hu = np.asarray(to_host(crop), dtype=np.float32)
        job.crop_input = model_input(
            job.crop_hu, self.package.preprocessing, backend=self.kernel_backend
        )
        job.diagnostics["crop_shape"] = tuple(int(s) for s in job.crop_hu.shape)

    def _segment(self, job: _Job) -> None:
        """Stage-2 probabilities, gland mask and the crop faces it reaches inside the scan."""
        post = self.package.postprocessing
        job.stage2_probs = softmax(job.diagnostics.pop("stage2_logits"))
        job.organ = organ_mask(
            job.stage2_probs[1] + job.stage2_probs[2],
            job.crop_affine,
            threshold=post.pancreas_threshold,
        )
        touched = crop_faces_touched(
            job.organ, job.crop_affine, min_voxels=self.localisation_qc.min_touch_voxels
        )
        smin, smax = _scan_bounds(job.volume)
        lo, hi = job.crop_box
        tol = 1e-3
        job.open_faces = {
            f: n
            for f, n in touched.items()
            if (f[1] == "-" and lo["xyz".index(f[0])] > smin["xyz".index(f[0])] + tol)
            or (f[1] == "+" and hi["xyz".index(f[0])] < smax["xyz".index(f[0])] - tol)
        }

    def _check_crop(self, job: _Job) -> None:
        """Grow the crop once where the stage-2 gland reaches a face inside the scan, rerun stage 2.

        Studies whose gland reaches no such face are untouched (same probabilities as without
        the check)."""
        self._segment(job)
        qc = self.localisation_qc
        job.diagnostics["crop_faces_first"] = dict(job.open_faces)
        job.diagnostics["crop_enlarged"] = False
        if not (job.open_faces and qc.grow):
            return
        smin, smax = _scan_bounds(job.volume)
        grown = grow_box(
            *job.crop_box,
            tuple(job.open_faces),
            scan_min=smin,
            scan_max=smax,
            grow_mm=qc.grow_mm,
            max_box_mm=self.package.stage2.max_box_mm,
        )
        if grown is None:
            return
        t0 = time.perf_counter()
        first = job.timings.get("stage2", 0.0)
        job.diagnostics["cls_probability_first"] = 1.0 / (
            1.0 + math.exp(-job.diagnostics["cls_logit"])
        )
        job.diagnostics["crop_box_first_min_mm"], job.diagnostics["crop_box_first_max_mm"] = (
            job.crop_box
        )
        self._crop(job, grown)
        self._run_stage(job, "stage2")
        self._segment(job)
        job.diagnostics["crop_enlarged"] = True
        job.timings["stage2"] = first + job.timings["stage2"]  # both runs
        job.timings["stage2_enlarged"] = time.perf_counter() - t0  # crop + run + masks, again

    def _run_stage(self, job: _Job, name: str) -> None:
        """The stage's network over its input, window by window (:func:`tiling.sliding_window`)."""
        t0 = time.perf_counter()
        st: StageSpec = self.package.stages[name]
        backend = self.backends[name]
        pre = self.package.preprocessing

        def predict(batch: np.ndarray) -> dict[str, np.ndarray]:
            return {
                k: np.asarray(to_host(v), dtype=np.float32)
                for k, v in backend.predict(batch).items()
            }

        image = job.coarse_input if name == "stage1" else job.crop_input
        out = sliding_window(
            image,
            patch=st.patch,
            predict=predict,
            overlap=st.overlap,
            batch_size=self.batch_size,
            pad_value=(pre.window_hu[0] - pre.mean) / pre.std,
        )
        job.diagnostics[f"{name}_windows"] = int(out["windows"])
        job.diagnostics[f"{name}_logits"] = out["seg"]
        if name == "stage2":
            job.diagnostics["cls_logit"] = float(out["cls"][0]) if "cls" in out else -math.inf
        job.timings[name] = time.perf_counter() - t0

    def _finish(self, job: _Job) -> StudyResult:
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
        if job.crop_input is None or job.stage2_probs is None:
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
        probs, organ = job.stage2_probs, job.organ
        caff = job.crop_affine
        lesion_prob = probs[2]
        lesions, lesion_labels = lesion_candidates(
            lesion_prob,
            organ,
            caff,
            threshold=post.lesion_threshold,
            min_ml=post.min_lesion_ml,
            return_labels=True,
        )
        lesion_mask = lesion_labels > 0
        job.diagnostics.update(pancreas_scores(lesion_prob, organ, lesions, lesion_labels, caff))
        loc = job.localisation
        length = gland_length_mm(organ | lesion_mask, caff)
        job.diagnostics["gland_length_mm"] = length
        job.diagnostics["crop_faces"] = dict(job.open_faces)
        reason = partial_localisation(
            stage1_length_mm=loc.length_mm,
            outside_fraction=loc.outside_fraction,
            gland_length_mm=length,
            open_faces=tuple(job.open_faces),
            qc=self.localisation_qc,
            grown_faces=tuple(job.diagnostics["crop_faces_first"])
            if job.diagnostics.get("crop_enlarged")
            else (),
        )
        if reason:
            qc.append("partial_localisation")
            job.diagnostics["qc_reasons"] = {"partial_localisation": reason}
            log.info("study %s: partial_localisation: %s", vol.series_instance_uid, reason)
        parenchyma = organ & ~lesion_mask
        vox_ml = abs(float(np.linalg.det(caff[:3, :3]))) / 1000.0
        hu = job.crop_hu
        p_cls = 1.0 / (1.0 + math.exp(-job.diagnostics.pop("cls_logit")))
        p_peak = float(lesion_prob.max()) if lesion_prob.size else 0.0
        job.diagnostics["cls_probability"] = p_cls
        job.diagnostics["lesion_peak"] = p_peak
        # the study score the package names (model.json postprocessing.score); the others are
        # kept in the diagnostics so `assess` can compare them on the same studies
        p = {"cls": p_cls, "lesion_peak": p_peak}.get(post.score, job.diagnostics.get(post.score))
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
            d["stage1_length_mm"] = float(loc.length_mm)
            d["stage1_volume_ml"] = float(loc.volume_ml)
            d["stage1_outside_fraction"] = float(loc.outside_fraction)
        if job.crop_box is not None:
            d["crop_box_min_mm"], d["crop_box_max_mm"] = job.crop_box
        return d


def _scan_bounds(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y, z) mm min/max over the scan's 8 corner voxel centres."""
    n = np.array(volume.shape, float) - 1.0
    corners = np.array(
        [[a * n[0], b * n[1], c * n[2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    )
    world = voxel_to_world(volume.affine, corners)
    return world.min(axis=0), world.max(axis=0)
