"""ONNX export parity and parity between every pair of backends available on this machine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_engine_package import tiny_package

from pdacscreen.engine.backends import (
    cuda_available,
    open_backend,
    resolve_backend,
    tensorrt_available,
)
from pdacscreen.engine.errors import BackendUnavailableError, EngineInputError
from pdacscreen.engine.network import NetworkSpec, build_network
from pdacscreen.engine.package import load_package
from pdacscreen.engine.training.export import export_onnx, onnx_parity


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return load_package(tiny_package(tmp_path_factory.mktemp("pkg") / "tiny", seed=1))


def available_backends() -> list[str]:
    names = ["onnxruntime", "torch-cpu"]
    if cuda_available():
        names.append("torch-cuda")
    try:
        resolve_backend("onnxruntime-cuda")
        names.append("onnxruntime-cuda")
    except BackendUnavailableError:
        pass
    if tensorrt_available():
        names.append("tensorrt")
    return names


@pytest.mark.parametrize("cls_head", [False, True])
def test_onnx_export_parity_dynamic_shapes(tmp_path, cls_head):
    torch.manual_seed(0)
    net = build_network(NetworkSpec(out_channels=3, base=4, depth=3, cls_head=cls_head))
    path = export_onnx(net, tmp_path / "n.onnx", patch=(8, 8, 16))
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 8, 8, 16), (3, 1, 12, 16, 20)]:  # batch and spatial axes are dynamic
        diffs = onnx_parity(net, path, rng.normal(size=shape).astype(np.float32))
        assert set(diffs) == ({"seg", "cls"} if cls_head else {"seg"})
        assert max(diffs.values()) < 1e-4, diffs


def test_backend_pairs_agree(pkg):
    names = available_backends()
    rng = np.random.default_rng(5)
    for stage in (pkg.stage1, pkg.stage2):
        batch = rng.normal(size=(2, 1, *stage.patch)).astype(np.float32)
        outs = {n: open_backend(stage, backend=n).predict(batch) for n in names}
        for n, out in outs.items():
            assert set(out) == set(stage.outputs), n
            assert out["seg"].shape == (2, stage.network.out_channels, *stage.patch)
        for a, b in itertools.combinations(names, 2):
            # FP16 TensorRT gets the loosest tolerance; CUDA torch runs FP32 convolutions with
            # TF32 tensor cores (10-bit mantissa; on an H200 the seg logits differ by up to
            # 2.6e-3 from FP32 CPU), so any CUDA pair gets 1e-2; CPU FP32 runtimes agree to 1e-4.
            if "tensorrt" in (a, b):
                tol = 5e-2
            elif any(n.endswith("cuda") for n in (a, b)):
                tol = 1e-2
            else:
                tol = 1e-4
            for key in stage.outputs:
                np.testing.assert_allclose(
                    outs[a][key], outs[b][key], atol=tol, rtol=tol, err_msg=f"{a} vs {b}"
                )


def test_auto_and_explicit_choice():
    auto = resolve_backend("auto")
    if tensorrt_available():
        assert auto == "tensorrt"
    elif cuda_available():
        assert auto == "torch-cuda"
    else:
        assert auto == "onnxruntime"
    assert resolve_backend("torch") == ("torch-cuda" if cuda_available() else "torch-cpu")
    if not tensorrt_available():
        with pytest.raises(BackendUnavailableError, match="tensorrt") as exc:
            resolve_backend("tensorrt")
        assert exc.value.code == "backend_unavailable"
    if not cuda_available():
        with pytest.raises(BackendUnavailableError, match="torch-cuda"):
            resolve_backend("torch-cuda")
    with pytest.raises(EngineInputError, match="did you mean 'onnxruntime'"):
        resolve_backend("onnx")


def test_bad_batch_shape_is_typed_error(pkg):
    be = open_backend(pkg.stage2, backend="onnxruntime")
    with pytest.raises(EngineInputError, match="multiples of 4"):
        be.predict(np.zeros((1, 1, 16, 16, 23), np.float32))
    with pytest.raises(EngineInputError, match=r"batch must be \(N, 1"):
        be.predict(np.zeros((16, 16, 24), np.float32))


@pytest.mark.skipif(not tensorrt_available(), reason="TensorRT and a GPU are not available here")
def test_tensorrt_plan_is_cached(pkg, tmp_path):
    from pdacscreen.engine.backends import TensorRTBackend
    from pdacscreen.engine.package import sha256_file

    stage = pkg.stage2
    digest = sha256_file(stage.onnx)
    first = TensorRTBackend(stage, onnx_sha256=digest, cache_dir=tmp_path, max_batch=2)
    assert first.plan_path.is_file()
    mtime = first.plan_path.stat().st_mtime_ns
    second = TensorRTBackend(stage, onnx_sha256=digest, cache_dir=tmp_path, max_batch=2)
    assert second.plan_path == first.plan_path and second.plan_path.stat().st_mtime_ns == mtime
    import cupy

    x = cupy.asarray(np.random.default_rng(0).normal(size=(2, 1, *stage.patch)).astype(np.float32))
    out = second.predict(x)
    assert isinstance(out["seg"], cupy.ndarray)  # stays on the device
