"""ONNX export of the engine's networks, with dynamic batch and spatial axes.

The graph takes ``input`` ``(N, C, z, y, x)`` float32 and returns ``seg`` ``(N, K, z, y, x)`` (and
``cls`` ``(N, 1)`` for stage 2).  Spatial sizes stay dynamic (multiples of the network's divisor)
so ONNX Runtime can run any window; TensorRT pins them in its optimisation profile.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from pdacscreen.engine.errors import EngineError
from pdacscreen.engine.network import UNet3d
from pdacscreen.engine.package import write_manifest

__all__ = ["OPSET", "export_onnx", "onnx_parity"]

log = logging.getLogger(__name__)
OPSET = 17


def export_onnx(net: UNet3d, path: Path, *, patch: tuple[int, int, int]) -> Path:
    """Export ``net`` (eval mode, CPU) to ``path`` with an example input of ``(1, C, *patch)``.

    The file is deterministic for given weights (same bytes for the same network).
    """
    net = net.eval().cpu()
    outputs = ["seg", "cls"] if net.spec.cls_head else ["seg"]
    spatial = {0: "n", 2: "z", 3: "y", 4: "x"}
    dynamic = {"input": spatial, "seg": spatial}
    if net.spec.cls_head:
        dynamic["cls"] = {0: "n"}
    example = torch.zeros((1, net.spec.in_channels, *patch), dtype=torch.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net,
                (example,),
                str(path),
                input_names=["input"],
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
        except Exception as e:  # noqa: BLE001 - exporter failures come in many types
            raise EngineError(
                f"ONNX export to {path} failed: {e}", code="onnx_export_failed"
            ) from e
    log.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


def onnx_parity(net: UNet3d, path: Path, batch: np.ndarray) -> dict[str, float]:
    """Max absolute difference per output between torch and ONNX Runtime (CPU) on ``batch``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {"input": batch.astype(np.float32)}), strict=True))
    with torch.inference_mode():
        ref = net.eval()(torch.from_numpy(batch.astype(np.float32)))
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {n: float(np.abs(got[n] - r.numpy()).max()) for n, r in zip(names, ref, strict=True)}


def write_package(
    root: Path,
    *,
    nets: dict[str, UNet3d],
    manifest: dict,
) -> Path:
    """Write a model package: ``<stage>.onnx`` and ``<stage>.pt`` per net, then model.json.

    ``manifest`` is model.json without ``files`` and without the stages' ``onnx``/``weights``/
    ``network`` entries, which are filled in here; returns the package folder.
    """

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {k: v for k, v in manifest.items()}
    stages = {k: dict(v) for k, v in manifest["stages"].items()}
    files = []
    for name, net in nets.items():
        stage = stages[name]
        onnx_name, pt_name = f"{name}.onnx", f"{name}.pt"
        export_onnx(net, root / onnx_name, patch=tuple(stage["patch"]))
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        torch.save(state, root / pt_name)
        stage.update(onnx=onnx_name, weights=pt_name, network=net.spec.to_dict())
        stage["outputs"] = ["seg", "cls"] if net.spec.cls_head else ["seg"]
        files += [onnx_name, pt_name]
    extra = [f for f in manifest.get("files", []) if f not in files]
    manifest["stages"] = stages
    manifest["files"] = files + extra
    write_manifest(root, manifest)
    return root
