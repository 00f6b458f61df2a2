"""``pdacscreen calibrate``: thresholds from purpose-made negatives (engine/training/calibrate.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pdacscreen.engine.errors import TrainingError
from pdacscreen.engine.package import REFERENCE_PACKAGE, load_package
from pdacscreen.engine.training.calibrate import thresholds_at


def test_thresholds_reach_their_specificity_and_are_the_lowest_that_do():
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    th = thresholds_at(scores)
    for spec, key in ((0.95, "specificity_95"), (0.99, "specificity_99")):
        assert np.mean(scores < th[key]) >= spec
        kth = np.sort(scores)[int(np.ceil(spec * 400)) - 1]  # the highest negative allowed below
        assert np.mean(scores < kth) < spec < th[key] + 1 and th[key] > kth
    assert th["specificity_95"] <= th["specificity_99"]


def test_calibrate_writes_thresholds_and_keeps_the_weights(tmp_path):
    from pdacscreen.flows.cli_calibrate import main

    pkg = tmp_path / "pkg"
    shutil.copytree(REFERENCE_PACKAGE, pkg)
    before = json.loads((pkg / "model.json").read_text())
    argv = ["--model", str(pkg), "--phantom-seed", "5001", "--negatives", "20", "--matrix", "128"]
    assert main([*argv, "--cache", str(tmp_path / "cache"), "--write", "--workers", "2"]) == 0
    after = json.loads((pkg / "model.json").read_text())
    assert after["files"] == before["files"]  # weights untouched
    cal = after["calibration"]
    assert cal["negatives"] == 20 and cal["phantom_seed"] == 5001
    assert (
        "pdac" not in cal["by_finding"]
        and sum(v for k, v in cal["by_finding"].items() if k != "fatty_pancreas") == 20
    )
    th = load_package(pkg).thresholds
    assert "20 non-PDAC phantoms made for the purpose" in th.method
    assert th.operating == th.specificity_95 <= th.specificity_99
    assert "calibration: 20 negatives" in (pkg / "README.md").read_text()
    # the same negatives in one process give the same thresholds
    from pdacscreen.engine.training.calibrate import calibrate

    again = calibrate(pkg, seed=5001, negatives=20, matrix=128, cache=tmp_path / "cache")
    assert again.thresholds["specificity_95"] == th.specificity_95
    assert np.mean(again.scores < th.specificity_95) >= 0.95
    with pytest.raises(TrainingError, match="at least 20"):
        calibrate(pkg, seed=5001, negatives=5, matrix=128, cache=tmp_path / "cache")
