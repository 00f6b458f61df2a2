"""Model packages: a folder of ONNX files (and torch weights) described by ``model.json``.

Format ``pdacscreen-model/1`` (documented for users in the package README and the project README):

.. code-block:: text

    model.json
      format            "pdacscreen-model/1"
      name, version     strings
      intended_use      string
      training_data     object (archive, studies, seeds, generator ...)
      files             {file name: sha256 hex} for every other file of the package
      preprocessing     {window_hu: [lo, hi], mean, std}   HU clip window, then (x - mean) / std
      stages.stage1     localiser: onnx, weights, network, spacing_mm [dz, dy, dx], patch [z, y, x],
                        overlap, classes, outputs
      stages.stage2     detector: the same plus margin_mm [z, y, x] and max_box_mm [z, y, x]
      thresholds        {operating, specificity_95, specificity_99, method}
      postprocessing    {pancreas_threshold, lesion_threshold, min_pancreas_ml, min_lesion_ml,
                         localisation_confidence_min, noise_hu_max,
                         score (optional: "cls" | "lesion_peak" | "pancreas_peak" |
                         "pancreas_topk" | "candidate_peak", see engine.postprocess)}
                        (packages made before 0.3 also hold contrast_blood_pool_hu: ignored, the
                        contrast phase is the selection rules' ``phase_check``)

Loading checks that every listed file exists and matches its sha256 and that every required field
is present with the right type; each problem is a :class:`ModelPackageError` naming the field or
file.  ``ModelPackage.sha256`` is the sha256 of model.json itself, which pins every file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdacscreen.engine.errors import ModelPackageError
from pdacscreen.engine.network import NetworkSpec

__all__ = [
    "FORMAT",
    "REFERENCE_PACKAGE",
    "ModelPackage",
    "StageSpec",
    "Preprocessing",
    "Postprocessing",
    "Thresholds",
    "load_package",
    "sha256_file",
    "write_manifest",
]

FORMAT = "pdacscreen-model/1"
REFERENCE_PACKAGE = Path(__file__).resolve().parent / "models" / "reference"
STAGES = ("stage1", "stage2")
SCORES = ("cls", "lesion_peak", "pancreas_peak", "pancreas_topk", "candidate_peak")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Thresholds(Mapping):
    """Operating points on the PDAC probability (also readable as a mapping)."""

    operating: float
    specificity_95: float
    specificity_99: float
    method: str

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)


@dataclass(frozen=True)
class Preprocessing:
    """HU -> model input: clip to ``window_hu`` then ``(x - mean) / std``."""

    window_hu: tuple[float, float]
    mean: float
    std: float

    @classmethod
    def from_manifest(cls, pre: Mapping) -> Preprocessing:
        """From model.json's ``preprocessing`` object, validated."""
        window = _get(pre, "window_hu", list, "preprocessing.")
        if len(window) != 2 or not window[0] < window[1]:
            raise ModelPackageError(
                f"model.json: preprocessing.window_hu must be [lo, hi], got {window}"
            )
        std = _get(pre, "std", float, "preprocessing.")
        if std <= 0:
            raise ModelPackageError(f"model.json: preprocessing.std must be > 0, got {std}")
        return cls(
            (float(window[0]), float(window[1])), _get(pre, "mean", float, "preprocessing."), std
        )


@dataclass(frozen=True)
class StageSpec:
    """One stage: its files, network, grid (``spacing_mm`` as (dz, dy, dx)) and tiling."""

    name: str
    onnx: Path
    weights: Path | None
    network: NetworkSpec
    spacing_mm: tuple[float, float, float]
    patch: tuple[int, int, int]
    overlap: float
    classes: tuple[str, ...]
    outputs: tuple[str, ...]
    margin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    max_box_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Postprocessing:
    """Thresholds for masks, candidates and QC flags.

    ``score`` (optional in model.json, default ``"cls"``) is the study-level PDAC probability:
    ``"cls"`` the classification head (max over windows), ``"lesion_peak"`` the peak lesion
    probability of the segmentation (PANORAMA's "case score = max candidate"); the
    ``pancreas_*`` / ``candidate_peak`` scores look only inside the (grown) pancreas mask
    (:func:`pdacscreen.engine.postprocess.pancreas_scores`).
    """

    pancreas_threshold: float
    lesion_threshold: float
    min_pancreas_ml: float
    min_lesion_ml: float
    localisation_confidence_min: float
    noise_hu_max: float
    score: str = "cls"


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package (see module docstring for the format)."""

    root: Path
    name: str
    version: str
    sha256: str
    thresholds: Thresholds
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    stages: Mapping[str, StageSpec]
    manifest: Mapping[str, Any]

    @property
    def stage1(self) -> StageSpec:
        return self.stages["stage1"]

    @property
    def stage2(self) -> StageSpec:
        return self.stages["stage2"]


def _get(obj: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise ModelPackageError(f"model.json: missing required field {where}{key}")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ModelPackageError(
            f"model.json: field {where}{key} must be {getattr(kind, '__name__', kind)}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


def _vec(obj: Mapping, key: str, where: str, *, n: int = 3, kind: type = float) -> tuple:
    value = _get(obj, key, list, where)
    ok = len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
    )
    if not ok or (kind is int and not all(isinstance(v, int) for v in value)):
        raise ModelPackageError(
            f"model.json: field {where}{key} must be {n} positive {kind.__name__} values, got {value!r}"
        )
    return tuple(kind(v) for v in value)


def _stage(root: Path, name: str, data: Mapping, files: Mapping[str, str]) -> StageSpec:
    where = f"stages.{name}."
    onnx = _get(data, "onnx", str, where)
    if onnx not in files:
        raise ModelPackageError(f"model.json: {where}onnx names {onnx!r}, which is not in files")
    weights = data.get("weights")
    if weights is not None and weights not in files:
        raise ModelPackageError(
            f"model.json: {where}weights names {weights!r}, which is not in files"
        )
    try:
        network = NetworkSpec.from_dict(dict(_get(data, "network", dict, where)))
    except (TypeError, ValueError) as e:
        raise ModelPackageError(f"model.json: {where}network is invalid: {e}") from e
    patch = _vec(data, "patch", where, kind=int)
    bad = [p for p in patch if p % network.divisor]
    if bad:
        raise ModelPackageError(
            f"model.json: {where}patch {list(patch)} must be multiples of {network.divisor}"
        )
    overlap = _get(data, "overlap", float, where)
    if not 0.0 <= overlap < 1.0:
        raise ModelPackageError(f"model.json: {where}overlap must be in [0, 1), got {overlap}")
    classes = tuple(_get(data, "classes", list, where))
    if len(classes) != network.out_channels:
        raise ModelPackageError(
            f"model.json: {where}classes has {len(classes)} names but the network has "
            f"{network.out_channels} output channels"
        )
    spec = dict(
        name=name,
        onnx=root / onnx,
        weights=None if weights is None else root / weights,
        network=network,
        spacing_mm=_vec(data, "spacing_mm", where),
        patch=patch,
        overlap=overlap,
        classes=classes,
        outputs=tuple(_get(data, "outputs", list, where)),
    )
    if name == "stage2":
        spec["margin_mm"] = tuple(float(v) for v in _get(data, "margin_mm", list, where))
        spec["max_box_mm"] = _vec(data, "max_box_mm", where)
        if len(spec["margin_mm"]) != 3:
            raise ModelPackageError(f"model.json: {where}margin_mm must be 3 values")
        if not network.cls_head or "cls" not in spec["outputs"]:
            raise ModelPackageError(f"model.json: {where} needs a classification head output 'cls'")
    return StageSpec(**spec)


def load_package(path: Path | str | None = None) -> ModelPackage:
    """Load and validate a model package folder (``None``: the shipped reference model).

    Raises:
        ModelPackageError: missing folder/file/field, wrong type, or a sha256 mismatch.
    """
    root = Path(path) if path is not None else REFERENCE_PACKAGE
    manifest_path = root / "model.json"
    if not manifest_path.is_file():
        raise ModelPackageError(f"model package {root}: model.json not found")
    raw = manifest_path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelPackageError(f"model package {root}: model.json is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelPackageError(f"model package {root}: model.json must hold a JSON object")
    fmt = _get(data, "format", str, "")
    if fmt != FORMAT:
        raise ModelPackageError(f"model.json: field format must be {FORMAT!r}, got {fmt!r}")
    name = _get(data, "name", str, "")
    version = _get(data, "version", str, "")
    _get(data, "intended_use", str, "")
    _get(data, "training_data", dict, "")
    files = _get(data, "files", dict, "")
    for fname, digest in files.items():
        fpath = root / fname
        if not fpath.is_file():
            raise ModelPackageError(
                f"model package {root}: file {fname} listed in model.json is missing"
            )
        actual = sha256_file(fpath)
        if actual != digest:
            raise ModelPackageError(
                f"model package {root}: sha256 of {fname} is {actual}, model.json says {digest}"
            )
    preprocessing = Preprocessing.from_manifest(_get(data, "preprocessing", dict, ""))
    stages_raw = _get(data, "stages", dict, "")
    stages = {s: _stage(root, s, _get(stages_raw, s, dict, "stages."), files) for s in STAGES}
    th = _get(data, "thresholds", dict, "")
    thresholds = Thresholds(
        operating=_get(th, "operating", float, "thresholds."),
        specificity_95=_get(th, "specificity_95", float, "thresholds."),
        specificity_99=_get(th, "specificity_99", float, "thresholds."),
        method=_get(th, "method", str, "thresholds."),
    )
    post = _get(data, "postprocessing", dict, "")
    score = post.get("score", "cls")
    if score not in SCORES:
        raise ModelPackageError(
            f"model.json: postprocessing.score must be one of {SCORES}, got {score!r}"
        )
    postprocessing = Postprocessing(
        **{
            f: _get(post, f, float, "postprocessing.")
            for f in Postprocessing.__dataclass_fields__
            if f != "score"
        },
        score=score,
    )
    return ModelPackage(
        root=root,
        name=name,
        version=version,
        sha256=hashlib.sha256(raw).hexdigest(),
        thresholds=thresholds,
        preprocessing=preprocessing,
        postprocessing=postprocessing,
        stages=stages,
        manifest=data,
    )


def write_manifest(root: Path, manifest: dict) -> Path:
    """Fill ``manifest["files"]`` with the sha256 of every listed file and write model.json.

    ``manifest["files"]`` may be given as a list of file names or a dict (values are replaced).
    """
    names = sorted(manifest.get("files") or [])
    manifest = dict(manifest, files={n: sha256_file(root / n) for n in names})
    path = root / "model.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def default_manifest(*, name: str = "pdacscreen-reference", version: str = "0.0.0") -> dict:
    """The reference settings as a model.json skeleton (no files, untrained thresholds).

    Training fills ``thresholds``, ``training_data`` and ``metrics``; :func:`write_package` in
    :mod:`pdacscreen.engine.training.export` fills ``files`` and each stage's ``onnx``/``weights``/``network``.
    """
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "intended_use": (
            "Research software: reference model trained on synthetic phantoms, not for clinical use."
        ),
        "training_data": {},
        "files": [],
        "preprocessing": {"window_hu": [-120.0, 180.0], "mean": 40.0, "std": 50.0},
        "stages": {
            "stage1": {
                "spacing_mm": [6.0, 6.0, 6.0],
                "patch": [32, 48, 48],
                "overlap": 0.25,
                "classes": ["background", "pancreas"],
            },
            "stage2": {
                "spacing_mm": [2.0, 2.0, 2.0],
                "patch": [24, 40, 56],
                "overlap": 0.5,
                "classes": ["background", "pancreas", "lesion"],
                "margin_mm": [20.0, 20.0, 20.0],
                "max_box_mm": [160.0, 160.0, 240.0],
            },
        },
        "thresholds": {
            "operating": 0.5,
            "specificity_95": 0.5,
            "specificity_99": 0.5,
            "method": "untrained default",
        },
        "postprocessing": {
            "pancreas_threshold": 0.5,
            "lesion_threshold": 0.5,
            "min_pancreas_ml": 5.0,
            "min_lesion_ml": 0.05,
            "localisation_confidence_min": 0.6,
            "noise_hu_max": 30.0,
        },
    }
