"""Model packages: writing, hash checks, missing/invalid fields, the shipped reference package."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pdacscreen.engine.errors import ModelPackageError
from pdacscreen.engine.network import NetworkSpec, build_network
from pdacscreen.engine.package import REFERENCE_PACKAGE, default_manifest, load_package
from pdacscreen.engine.training.export import write_package


def tiny_package(root, *, seed: int = 0, patch1=(16, 16, 16), patch2=(16, 16, 24), organ_bias=None):
    """A valid package with small untrained networks (patches reduced for speed).

    ``organ_bias`` sets the stage-1 output bias (background, pancreas) so that the localiser
    reports pancreas everywhere (large positive) -- the worst case for the stage-2 box.
    """
    torch.manual_seed(seed)
    manifest = default_manifest(name="tiny", version="0.0.1")
    manifest["stages"]["stage1"]["patch"] = list(patch1)
    manifest["stages"]["stage2"]["patch"] = list(patch2)
    nets = {
        "stage1": build_network(NetworkSpec(out_channels=2, base=4, depth=3)),
        "stage2": build_network(NetworkSpec(out_channels=3, base=4, depth=3, cls_head=True)),
    }
    if organ_bias is not None:
        with torch.no_grad():
            nets["stage1"].seg_head.weight.zero_()
            nets["stage1"].seg_head.bias.copy_(torch.tensor(organ_bias, dtype=torch.float32))
    write_package(root, nets=nets, manifest=manifest)
    return root


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory):
    return tiny_package(tmp_path_factory.mktemp("pkg") / "tiny")


def test_load_valid_package(pkg_dir):
    pkg = load_package(pkg_dir)
    assert pkg.name == "tiny" and pkg.version == "0.0.1"
    assert len(pkg.sha256) == 64
    assert pkg.thresholds.operating == pkg.thresholds["operating"] == 0.5
    assert pkg.stage1.patch == (16, 16, 16) and pkg.stage2.network.cls_head
    assert pkg.stage2.spacing_mm == (2.0, 2.0, 2.0)
    assert pkg.root == pkg_dir
    assert set(pkg.manifest["files"]) == {"stage1.onnx", "stage1.pt", "stage2.onnx", "stage2.pt"}


def test_hash_mismatch_names_the_file(pkg_dir, tmp_path):
    bad = shutil.copytree(pkg_dir, tmp_path / "bad")
    with open(bad / "stage2.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelPackageError, match="sha256 of stage2.onnx") as exc:
        load_package(bad)
    assert exc.value.code == "bad_model_package"


def test_missing_file_named(pkg_dir, tmp_path):
    bad = shutil.copytree(pkg_dir, tmp_path / "bad")
    (bad / "stage1.pt").unlink()
    with pytest.raises(ModelPackageError, match="file stage1.pt .* missing"):
        load_package(bad)


@pytest.mark.parametrize(
    "path, match",
    [
        (("thresholds", "specificity_95"), "thresholds.specificity_95"),
        (("stages", "stage2", "patch"), "stages.stage2.patch"),
        (("preprocessing", "window_hu"), "preprocessing.window_hu"),
        (("version",), "version"),
        (("postprocessing", "noise_hu_max"), "postprocessing.noise_hu_max"),
    ],
)
def test_missing_field_named(pkg_dir, tmp_path, path, match):
    bad = shutil.copytree(pkg_dir, tmp_path / "bad")
    data = json.loads((bad / "model.json").read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    (bad / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match=f"missing required field {match}"):
        load_package(bad)


def test_wrong_type_and_bad_patch(pkg_dir, tmp_path):
    bad = shutil.copytree(pkg_dir, tmp_path / "bad")
    data = json.loads((bad / "model.json").read_text())
    data["thresholds"]["operating"] = "high"
    (bad / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match="thresholds.operating must be float"):
        load_package(bad)
    data["thresholds"]["operating"] = 0.4
    data["stages"]["stage1"]["patch"] = [15, 16, 16]
    (bad / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match="multiples of 4"):
        load_package(bad)


def test_not_a_package(tmp_path):
    with pytest.raises(ModelPackageError, match="model.json not found"):
        load_package(tmp_path)


def test_write_is_deterministic(tmp_path):
    a = load_package(tiny_package(tmp_path / "a", seed=3))
    b = load_package(tiny_package(tmp_path / "b", seed=3))
    assert a.sha256 == b.sha256


def test_reference_package_loads():
    if not (REFERENCE_PACKAGE / "model.json").is_file():
        pytest.skip("reference package not trained yet")
    pkg = load_package()
    assert pkg.root == REFERENCE_PACKAGE
    size = sum(p.stat().st_size for p in REFERENCE_PACKAGE.iterdir())
    assert size < 20 * 1024 * 1024
    assert "not for clinical use" in (REFERENCE_PACKAGE / "README.md").read_text()
    assert 0.0 <= pkg.thresholds.specificity_95 <= 1.0
