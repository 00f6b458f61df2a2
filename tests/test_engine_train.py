"""Training: determinism for a seed, data split, thresholds, and `pdacscreen train` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pdacscreen.engine.network import NetworkSpec, build_network
from pdacscreen.engine.package import Preprocessing, default_manifest, load_package
from pdacscreen.engine.training.augment import NO_AUGMENT, AugmentConfig, sample_patch
from pdacscreen.engine.training.dataset import CachedStudy, StudyRecord, preprocess_study
from pdacscreen.engine.training.fit import (
    _thresholds,
    make_stage1_draw,
    make_stage2_draw,
    split_records,
)
from pdacscreen.engine.training.trainer import StageTraining, set_determinism, train_stage
from pdacscreen.io.phantom.subject import make_subject
from pdacscreen.io.types import CTVolume

# Two steps per stage on 4-channel networks: checks the plumbing, not the learning.
TINY_TRAINING = [
    *("--stage1-steps", "2", "--stage2-steps", "2"),
    *("--base1", "4", "--base2", "4", "--val-fraction", "0.5"),
]


@pytest.fixture(scope="module")
def studies() -> list[CachedStudy]:
    out = []
    for seed, kind in ((3, "pdac"), (4, "none")):
        s = make_subject(seed, matrix=128, lesion_type=kind)
        vol = CTVolume(s.noncontrast, s.spacing, s.affine)
        a = preprocess_study(vol, s.labels, coarse_mm=(6.0, 6.0, 6.0), fine_mm=(2.0, 2.0, 2.0))
        out.append(
            CachedStudy(
                "uid",
                a["coarse_hu"],
                a["coarse_label"],
                a["fine_hu"],
                a["fine_label"],
                kind == "pdac",
                kind,
                20.0,
                False,
            )
        )
    return out


def _train_once(studies, seed: int) -> tuple[dict, list]:
    set_determinism(seed, 1)
    pre = Preprocessing.from_manifest(default_manifest()["preprocessing"])
    net = build_network(NetworkSpec(out_channels=3, base=4, depth=3, cls_head=True))
    draw = make_stage2_draw(studies, patch=(16, 16, 24), batch=2, pre=pre, aug=AugmentConfig())
    hist = train_stage(net, draw, settings=StageTraining(steps=3, log_every=1), seed=seed)
    return {k: v.clone() for k, v in net.state_dict().items()}, hist


def test_same_seed_same_weights(studies):
    a, ha = _train_once(studies, seed=5)
    b, hb = _train_once(studies, seed=5)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c, _ = _train_once(studies, seed=6)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cached_arrays_and_patches(studies):
    pdac, none = studies
    assert pdac.fine_label.max() == 2 and none.fine_label.max() == 1
    assert pdac.coarse_label.any() and pdac.coarse_hu.dtype == np.float16
    rng = np.random.default_rng(0)
    centre = np.argwhere(pdac.fine_label == 2).mean(axis=0)
    hu, lab = sample_patch(
        pdac.fine_hu, pdac.fine_label, centre=centre, patch=(8, 8, 8), rng=rng, cfg=NO_AUGMENT
    )
    assert hu.shape == (8, 8, 8) and lab[4, 4, 4] == 2  # identity transform: the lesion centre
    hu2, lab2 = sample_patch(
        pdac.fine_hu, pdac.fine_label, centre=centre, patch=(8, 8, 8), rng=rng, cfg=AugmentConfig()
    )
    assert hu2.dtype == np.float32 and set(np.unique(lab2)) <= {0, 1, 2}
    pre = Preprocessing.from_manifest(default_manifest()["preprocessing"])
    draw = make_stage1_draw(studies, patch=(16, 32, 32), batch=2, pre=pre, aug=NO_AUGMENT)
    b = draw(np.random.default_rng(1))
    assert b.x.shape == (2, 1, 16, 32, 32) and b.y.shape == (2, 16, 32, 32)
    lo, hi = ((w - pre.mean) / pre.std for w in pre.window_hu)
    assert lo <= b.x.min() and b.x.max() <= hi + 1e-6


def test_split_is_stratified_and_deterministic(tmp_path):
    recs = [
        StudyRecord(f"s{i}", f"u{i}", ("pdac", "cyst", "none")[i % 3], 10.0, False, (), tmp_path)
        for i in range(30)
    ]
    tr, va = split_records(recs, fraction=0.2, seed=1)
    tr2, va2 = split_records(recs, fraction=0.2, seed=1)
    assert [r.series_uid for r in va] == [r.series_uid for r in va2]
    assert len(va) == 6 and {r.lesion_type for r in va} == {"pdac", "cyst", "none"}
    assert not {r.series_uid for r in tr} & {r.series_uid for r in va}


def test_thresholds_reach_the_specificity():
    rng = np.random.default_rng(0)
    neg, pos = rng.uniform(0, 0.6, 200), rng.uniform(0.4, 1.0, 50)
    scores = np.concatenate([neg, pos])
    labels = np.r_[np.zeros(200), np.ones(50)]
    th = _thresholds(scores, labels)
    assert (neg < th["specificity_95"]).mean() >= 0.95
    assert (neg < th["specificity_99"]).mean() >= 0.99
    assert th["specificity_99"] >= th["specificity_95"]


def test_train_cli_end_to_end(tmp_path):
    from pdacscreen.flows.cli import main
    from pdacscreen.io.phantom.archive import generate_archive

    archive = tmp_path / "arch"
    generate_archive(archive, studies=4, seed=21, matrix=128, workers=1)
    out = tmp_path / "pkg"
    rc = main(
        ["train", "--archive", str(archive), "--out", str(out), *TINY_TRAINING]
        + ["--cache", str(tmp_path / "cache")]
    )
    assert rc == 0
    pkg = load_package(out)
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["training_data"]["studies"] == 4
    assert manifest["training_data"]["commands"][0].startswith("pdacscreen phantom --out")
    assert "validation" in manifest["metrics"] and 0 <= pkg.thresholds.operating <= 1
    card = (out / "README.md").read_text()
    assert "not for clinical use" in card and "pdacscreen train" in card


def test_batches_do_not_depend_on_workers(studies):
    from pdacscreen.engine.training.trainer import _batches, make_batch_pool

    pre = Preprocessing.from_manifest(default_manifest()["preprocessing"])
    draw = make_stage2_draw(studies, patch=(16, 16, 24), batch=2, pre=pre, aug=AugmentConfig())
    serial = list(_batches(draw, "test-stage", 9, 0, 5, None, 1))
    pool = make_batch_pool(2, {"test-stage": draw})
    assert pool is not None
    try:
        pooled = list(_batches(draw, "test-stage", 9, 0, 5, pool, 2))
    finally:
        pool.terminate()
    assert len(serial) == len(pooled) == 5
    for a, b in zip(serial, pooled, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.cls, b.cls)
    # different steps draw different batches
    assert not np.array_equal(serial[0].x, serial[1].x)


def test_device_choice():
    from pdacscreen.engine.errors import TrainingError
    from pdacscreen.engine.training.trainer import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainingError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_pause_and_resume_equals_one_run(studies):
    """N steps, a pause (as on SIGTERM or a spent budget), a resume to 2N == 2N steps in one go."""
    from pdacscreen.engine.training.trainer import TrainingPaused, TrainState

    pre = Preprocessing.from_manifest(default_manifest()["preprocessing"])
    draw = make_stage2_draw(studies, patch=(16, 16, 24), batch=2, pre=pre, aug=AugmentConfig())
    settings = StageTraining(steps=12, log_every=4)

    def net():
        set_determinism(5, 1)
        return build_network(NetworkSpec(out_channels=3, base=4, depth=3, cls_head=True))

    straight = net()
    hist_straight = train_stage(straight, draw, settings=settings, seed=5)

    paused, saved = net(), []
    done = iter(range(100))
    with pytest.raises(TrainingPaused) as exc:
        train_stage(
            paused,
            draw,
            settings=settings,
            seed=5,
            on_checkpoint=saved.append,
            should_stop=lambda: next(done) == 5,  # after step 6 of 12, between two log entries
        )
    state = exc.value.state
    assert state.step == 6 and saved[-1] is state and state.loss_count == 2
    state = TrainState.from_dict(state.as_dict())  # as a checkpoint file holds it
    resumed = net()  # fresh weights: everything must come from the state
    hist_resumed = train_stage(resumed, draw, settings=settings, seed=5, start=state)
    assert [h["step"] for h in hist_resumed] == [h["step"] for h in hist_straight] == [4, 8, 12]
    for a, b in zip(hist_straight, hist_resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_train_cli_pauses_and_resumes(tmp_path):
    """`pdacscreen train --max-minutes 0` pauses with a checkpoint; `--resume` finishes the run."""
    from pdacscreen.engine.training.fit import EXIT_PAUSED
    from pdacscreen.flows.cli_train import main

    out = tmp_path / "pkg"
    args = ["--phantoms", "6", "--phantom-seed", "31", "--matrix", "128", "--out", str(out)]
    args += ["--stage1-steps", "3", "--stage2-steps", "3", "--base1", "4", "--base2", "4"]
    assert main([*args, "--max-minutes", "0"]) == EXIT_PAUSED
    ckpt = tmp_path / "pkg.checkpoint.pt"
    assert ckpt.is_file() and not (out / "model.json").exists()
    with pytest.raises(Exception, match="other training options"):
        main([*args, "--seed", "9", "--resume", str(ckpt)])
    assert main([*args, "--resume", str(ckpt)]) == 0
    meta = json.loads((out / "model.json").read_text())["training_data"]
    assert meta["stage1_steps"] == 3 and meta["stage2_steps"] == 3 and meta["sessions"] == 2
    assert not ckpt.exists()  # removed once the package is written


def test_train_from_phantoms_in_memory(tmp_path):
    from pdacscreen.flows.cli_train import main

    out = tmp_path / "pkg"
    rc = main(
        [
            "--phantoms",
            "6",
            "--phantom-seed",
            "31",
            "--matrix",
            "128",
            "--out",
            str(out),
            *TINY_TRAINING,
            "--workers",
            "2",
        ]
    )
    assert rc == 0
    pkg = load_package(out)
    td = json.loads((out / "model.json").read_text())["training_data"]
    assert td["archive"] is None and td["phantoms"]["seed"] == 31 and td["studies"] == 6
    assert td["training_studies"] + td["validation_studies"] == 6
    assert td["device"] == "cpu" and td["stage2_steps"] == 2
    assert td["commands"] == [td["command"]] and "--phantoms 6" in td["command"]
    assert 0 <= pkg.thresholds.operating <= 1
    # the same subjects as the archive `pdacscreen phantom --seed 31` writes; the records come
    # from the findings draw alone and agree with the rendered subjects
    from pdacscreen.engine.training.dataset import make_phantom_studies, phantom_records
    from pdacscreen.io.phantom.archive import study_plan
    from pdacscreen.io.phantom.subject import make_subject

    records = phantom_records(seed=31, studies=4)
    assert [r.pdac for r in records] == [study_plan(31, k, 0.5)[1] for k in range(4)]
    for r in records:
        sub = make_subject(r.truth["subject_seed"], matrix=128, pdac=r.pdac)
        assert sub.truth["lesion_type"] == r.lesion_type
        assert sub.truth["fatty_pancreas"] == r.fatty_pancreas
    arrays, volumes = make_phantom_studies(
        records, matrix=128, coarse_mm=(6.0, 6.0, 6.0), fine_mm=(2.0, 2.0, 2.0), keep_volumes={2}
    )
    assert len(arrays) == 4 and all(a["fine_label"].max() >= 1 for a in arrays)
    assert set(volumes) == {2} and volumes[2][0].dtype == np.int16


def test_sigterm_requests_a_pause_and_the_handler_is_restored():
    import os
    import signal

    from pdacscreen.engine.training.fit import _StopRequest

    before = signal.getsignal(signal.SIGTERM)
    stop = _StopRequest(deadline=None)
    assert stop() is False
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process keeps running
    assert stop() is True and stop.why == "SIGTERM"
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_stage1_only_on_varied_anatomy_keeps_stage2(tmp_path):
    """``--vary-anatomy --stage2-from PKG``: stage 1 retrained on randomised anatomy, stage 2
    exactly the given package's; an archive's fixed images cannot be varied."""
    from pdacscreen.engine.errors import TrainingError
    from pdacscreen.engine.training.fit import TrainOptions, fit
    from pdacscreen.flows.cli_train import main

    source = load_package(None)
    out = tmp_path / "pkg"
    argv = ["--phantoms", "6", "--phantom-seed", "31", "--matrix", "128", "--out", str(out)]
    argv += ["--stage1-steps", "2", "--base1", "4", "--val-fraction", "0.5"]
    assert main([*argv, "--vary-anatomy", "--stage2-from", str(source.root)]) == 0
    td = json.loads((out / "model.json").read_text())["training_data"]
    assert td["anatomy_variation"] is True and td["stage2_steps"] == 0
    assert td["stage2_from"]["package"] == f"{source.name} {source.version}"
    new, old = (
        torch.load(p.stage2.weights, weights_only=True) for p in (load_package(out), source)
    )
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)
    s1 = torch.load(load_package(out).stage1.weights, weights_only=True)
    assert next(iter(s1.values())).shape[0] == 4  # stage 1 is the new base-4 network
    # stage 1 does not depend on where stage 2 comes from: a full run's stage 1 is the same
    full = tmp_path / "full"
    argv_full = [a if a != str(out) else str(full) for a in argv]
    assert main([*argv_full, "--vary-anatomy", "--stage2-steps", "2", "--base2", "4"]) == 0
    s1_full = torch.load(load_package(full).stage1.weights, weights_only=True)
    assert all(torch.equal(s1[k], s1_full[k]) for k in s1)
    with pytest.raises(TrainingError, match="--vary-anatomy needs --phantoms"):
        fit(TrainOptions(out=tmp_path / "x", archive=tmp_path, vary_anatomy=True))
