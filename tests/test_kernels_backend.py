"""Backend choice: import without CuPy or a GPU, auto fallback, clear errors, CUDA sources compile."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from pdacscreen.kernels import GpuUnavailableError, KernelInputError, has_gpu, resolve
from pdacscreen.kernels._backend import device_memoize, spacing_from_affine


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_touches_no_cupy_and_works_without_it():
    # With CuPy installed: importing the package must not import it.
    assert _python("import sys, pdacscreen.kernels; print('cupy' in sys.modules)") == "False"
    # With CuPy unavailable (import blocked): auto runs on NumPy, cupy is a clear typed error.
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np, pdacscreen.kernels as k\n"
        "assert not k.has_gpu()\n"
        "y = k.to_model_input(np.arange(8, dtype=np.int16).reshape(2, 2, 2))\n"
        "assert type(y) is np.ndarray, type(y)\n"
        "try:\n"
        "    k.to_model_input(np.zeros((1, 1, 1)), backend='cupy')\n"
        "except k.GpuUnavailableError as e:\n"
        "    print(e.code, 'gpu' in str(e).lower())\n"
    )
    assert _python(code) == "gpu_unavailable True"


def test_resolve_names():
    assert resolve("numpy").name == "numpy"
    assert resolve("auto").name == ("cupy" if has_gpu() else "numpy")
    with pytest.raises(KernelInputError, match="'auto', 'numpy', 'cupy'.*'gpu'") as e:
        resolve("gpu")
    assert e.value.code == "bad_input"


@pytest.mark.skipif(has_gpu(), reason="a GPU is present: backend='cupy' is valid here")
def test_explicit_cupy_without_gpu_is_a_typed_error():
    with pytest.raises(GpuUnavailableError) as e:
        resolve("cupy")
    assert e.value.code == "gpu_unavailable"
    assert "backend='auto'" in str(e.value)


def test_has_gpu_is_cached_and_boolean():
    assert has_gpu() is has_gpu()
    assert isinstance(has_gpu(), bool)


def test_device_memoize_builds_nothing_until_called():
    calls = []

    @device_memoize
    def build(name: str) -> str:
        calls.append(name)
        return name

    assert calls == []  # decoration alone imports no CuPy and builds nothing
    if not has_gpu():
        with pytest.raises(GpuUnavailableError):
            build("x")
    else:
        assert build("x") == "x" and build("x") == "x"
        assert calls == ["x"]


def test_spacing_from_affine_rejects_degenerate():
    aff = np.diag([2.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(spacing_from_affine(aff), [2.0, 0.5, 0.5])
    aff[:3, 1] = 0
    with pytest.raises(KernelInputError, match="spacing"):
        spacing_from_affine(aff)


CUDA_SOURCES = sorted((REPO / "kernels").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_with_nvcc(source: Path, tmp_path: Path):
    out = subprocess.run(
        ["nvcc", "--ptx", "-Werror", "all-warnings", str(source), "-o", str(tmp_path / "k.ptx")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert ".entry pdacscreen_" in (tmp_path / "k.ptx").read_text()


def test_cuda_sources_ship_with_the_package():
    assert CUDA_SOURCES, "kernels/*.cu expected (components statistics kernel)"
    from importlib import resources

    names = {p.name for p in resources.files("pdacscreen.kernels").iterdir()}
    assert {p.name for p in CUDA_SOURCES} <= names


def test_gpucheck_logic_runs_with_numpy_standing_in(capsys):
    """infra/gpu-check's timing script, minus the GPU: every row is computed and agrees."""
    from pdacscreen.kernels import gpucheck

    assert gpucheck.main(["--dry-run", "--shape", "16", "320", "320", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in (
        "to_model_input",
        "body_mask",
        "resample 4 mm",
        "crop_resample",
        "components",
        "blood_pool_hu",
        "noise_hu",
        "z_coverage_mm",
        "whole preprocessing",
    ):
        assert row in out
    assert "DIFF" not in out


def test_gpu_check_script_is_executable_bash():
    script = REPO / "infra" / "gpu-check"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
