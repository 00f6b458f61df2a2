"""Evaluation: every metric against scikit-learn, interval coverage, lesion matching, the report."""

from __future__ import annotations

import datetime as dt
import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm
from sklearn import metrics as skm
from synthetic_store import make_synthetic_findings

from pdacscreen.engine import metrics as M
from pdacscreen.flows.cli import main
from pdacscreen.flows.evaluate import evaluate, write
from pdacscreen.io.errors import InputError


def data(seed: int, n: int = 400, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(1.1 * y, 1.0)
    return y, (np.round(s, 1) if ties else s)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_case_metrics_match_sklearn(seed):
    y, s = data(seed)
    w = np.random.default_rng(seed + 10).integers(0, 4, y.size)
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert M.roc_auc(y, s, w) == pytest.approx(skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert M.average_precision(y, s, w) == pytest.approx(
        skm.average_precision_score(y, s, sample_weight=w), abs=1e-12
    )
    fpr, tpr, thr = M.roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    for t in (-0.5, 0.3, 0.5, 1.0):
        tn, fp, fn, tp = skm.confusion_matrix(y, s >= t).ravel()
        assert M.confusion_at(y, s, t) == (tp, fn, tn, fp)
    for target in (0.9, 0.95, 0.99):
        ok = (1 - f2) >= target
        best = np.argmax(np.where(ok, t2, -1))
        thr_t = M.threshold_at_specificity(y, s, target)
        assert thr_t == th2[best]
        assert skm.recall_score(y, s >= thr_t) == t2[best]
    m = M.case_metrics(y, s, threshold=0.5, n_boot=200, seed=3)
    assert m.auroc.value == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert m.average_precision.value == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    sens = m.at_threshold.sensitivity
    assert sens.value == pytest.approx(skm.recall_score(y, s >= 0.5))
    assert (sens.numerator, sens.denominator) == (int(np.sum(y & (s >= 0.5))), int(y.sum()))
    spec = m.at_threshold.specificity
    assert spec.value == pytest.approx(skm.recall_score(~y, s < 0.5))
    p95 = m.at_specificity[0]
    assert p95.target_specificity == 0.95 and p95.specificity.value >= 0.95
    assert p95.sensitivity.value == pytest.approx(skm.recall_score(y, s >= p95.threshold))
    for e in (m.auroc, m.average_precision, sens, spec, p95.sensitivity):
        assert e.ci_low <= e.value <= e.ci_high


def test_bootstrap_is_deterministic_for_a_seed():
    y, s = data(5)
    a = M.case_metrics(y, s, threshold=0.5, n_boot=300, seed=7)
    b = M.case_metrics(y, s, threshold=0.5, n_boot=300, seed=7)
    c = M.case_metrics(y, s, threshold=0.5, n_boot=300, seed=8)
    assert a == b and a.auroc.ci_low != c.auroc.ci_low


def test_undefined_metrics_are_nan_not_errors():
    m = M.case_metrics(np.zeros(20, bool), np.linspace(0, 1, 20), threshold=0.5, n_boot=50)
    assert np.isnan(m.auroc.value) and np.isnan(m.at_threshold.sensitivity.value)
    assert m.at_threshold.specificity.value == 0.5


def test_auroc_interval_covers_the_truth_of_a_binormal_model():
    """200 simulated studies of a binormal model (true AUROC = Phi(d / sqrt 2)): the stratified
    percentile bootstrap 95% interval must cover the true AUROC in 90-99% of them."""
    d = 1.2
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(2024)
    covered = 0
    for rep in range(200):
        y = np.r_[np.ones(80, bool), np.zeros(120, bool)]
        s = np.r_[rng.normal(d, 1, 80), rng.normal(0, 1, 120)]
        m = M.case_metrics(y, s, threshold=0.5, specificities=(), n_boot=400, seed=rep)
        covered += m.auroc.ci_low <= true_auc <= m.auroc.ci_high
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_match_by_centre_and_froc_by_hand():
    nan = np.nan
    c = M.match_by_centre(
        pred_center=np.array([[0, 0, 0], [0, 0, 30], [nan] * 3, [5, 5, 5], [0, 0, 0]], float),
        pred_score=np.array([0.9, 0.8, 0.1, 0.7, 0.6]),
        true_center=np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0], [nan] * 3, [0, 0, 0]], float),
        true_diameter=np.array([10, 20, 10, nan, 4]),
        tolerance_mm=1.0,
    )
    # case 0 hit; case 1 too far (30 > 10 + 1): FP and a miss; case 2 no prediction: miss;
    # case 3 no lesion: FP; case 4 at the centre: hit.
    assert c.case.tolist() == [0, 1, 3, 4]
    assert c.is_tp.tolist() == [True, False, False, True] and c.n_lesions == 4 and c.n_cases == 5
    fps, sens, thr = M.froc(c)
    np.testing.assert_allclose(fps, [0, 0, 0.2, 0.4, 0.4])
    np.testing.assert_allclose(sens, [0, 0.25, 0.25, 0.25, 0.5])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6])
    lm = M.lesion_metrics(c, threshold=0.65, method="centre_distance", n_boot=100)
    assert (lm.hit_rate.numerator, lm.hit_rate.denominator) == (1, 4)
    assert lm.false_positives_per_case == pytest.approx(2 / 5)
    # Lesion AP = sklearn's AP over the candidates x the share of lesions ever detected.
    want = skm.average_precision_score(c.is_tp, c.score) * c.is_tp.sum() / c.n_lesions
    assert lm.lesion_average_precision == pytest.approx(want)
    assert lm.sensitivity_at_fp["0.25"] == 0.25 and lm.sensitivity_at_fp["0.5"] == 0.5


def test_match_by_mask_iou_and_26_connectivity():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[1:4, 1:4, 1:4] = 1  # lesion A, 27 voxels
    truth[6:9, 6:9, 6:9] = 1  # lesion B
    pred = np.zeros_like(truth)
    pred[2:5, 2:5, 2:5] = 1  # overlaps A: IoU 8 / 46 >= 0.1
    pred[1, 1, 1] = 1  # inside the same component via the overlap
    pred[5, 5, 5] = 1  # diagonal neighbour of pred[4,4,4]: one component with 26-connectivity
    pred[0, 9, 9] = 1  # isolated: a false positive
    scores, tps, n = M.match_by_mask(pred, truth, case_score=0.7)
    assert n == 2 and sorted(zip(tps, scores, strict=True)) == [(False, 0.7), (True, 0.7)]
    # Two candidates on one lesion: one TP, no FP; a detection map gives each its maximum.
    det = np.zeros(truth.shape, np.float32)
    det[1, 1:4, 1] = 0.4  # 3 voxels in A: IoU 3/27 >= 0.1
    det[3, 1:4, 3] = 0.9  # another 3 in A, not 26-adjacent to the first
    det[7, 7, 7] = 0.2  # 1 voxel in B: IoU 1/27 < 0.1 -> a false positive, and B is missed
    scores, tps, n = M.match_by_mask(det, truth, case_score=0.0)
    assert sorted(zip(tps, scores, strict=True)) == [
        (False, pytest.approx(0.2)),
        (True, pytest.approx(0.9)),
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    gen = make_synthetic_findings(root / "store", 1500, seed=4, prevalence=0.25)
    truth = gen.truth.to_pandas()
    labels = truth.iloc[:1400].copy()  # the last 100 processed studies have no label
    extra = labels.iloc[:3].copy()
    extra["study_instance_uid"] = ["9.9.1", "9.9.2", "9.9.3"]  # labelled, never processed
    labels = pd.concat([labels, extra], ignore_index=True)
    labels.loc[5, "label"] = None  # one empty label
    pq.write_table(pa.Table.from_pandas(labels, preserve_index=False), root / "labels.parquet")
    labels.to_csv(root / "labels.csv", index=False)
    out = root / "out"
    rc = main(["evaluate", str(gen.store.root), "--labels", str(root / "labels.parquet"), "--out", str(out),
               "--bootstrap", "300"])  # fmt: skip
    assert rc == 0
    return gen, labels, out, json.loads((out / "metrics.json").read_text())


def test_evaluate_matches_an_independent_computation(evaluated):
    gen, labels, out, m = evaluated
    df = gen.store.read_findings().merge(labels, on="study_instance_uid", suffixes=("", "_t"))
    ok = df[(df.status == "ok") & df.label.notna()]
    y, s = ok.label.astype(int).to_numpy(), ok.pdac_probability.to_numpy()
    cl = m["case_level"]
    assert cl["n"] == len(ok) and cl["n_positive"] == int(y.sum())
    assert cl["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert cl["average_precision"]["value"] == pytest.approx(
        skm.average_precision_score(y, s), abs=1e-12
    )
    assert cl["at_threshold"]["sensitivity"]["numerator"] == int(np.sum((y == 1) & (s >= 0.5)))
    assert cl["auroc"]["ci_low"] < cl["auroc"]["value"] < cl["auroc"]["ci_high"]
    counts = m["counts"]["excluded_by_reason"]
    findings = gen.store.read_findings()
    labelled = findings[findings.study_instance_uid.isin(labels.study_instance_uid)]
    assert (
        counts["no_label"] == 100 and counts["not_processed"] == 3 and counts["label_missing"] == 1
    )
    assert counts["failed"] == int((labelled.status == "failed").sum())
    assert counts["skipped"] == int((labelled.status == "skipped").sum())
    assert m["counts"]["evaluated"] + m["counts"]["excluded"] == len(findings) + 3
    assert {e["reason"] for e in m["exclusions"]} == set(counts)
    excl = pd.read_csv(out / "exclusions.csv")
    assert len(excl) == m["counts"]["excluded"] and "9.9.2" in set(excl.study_instance_uid)


def test_subgroups_lesions_and_report(evaluated):
    gen, labels, out, m = evaluated
    assert list(m["subgroups"]) == ["size", "location", "vendor", "thickness", "site"]
    size = m["subgroups"]["size"]
    assert size[0]["group"] == "< 2 cm"  # small tumours first
    n_pos = sum(g["case"]["n_positive"] for g in size)
    assert n_pos == m["case_level"]["n_positive"]
    assert all(g["case"]["n_negative"] == m["case_level"]["n_negative"] for g in size)
    assert [g["group"] for g in m["subgroups"]["location"]] == ["head", "body", "tail"]
    vendors = m["subgroups"]["vendor"]
    assert sum(g["case"]["n"] for g in vendors) == m["case_level"]["n"]
    les = m["lesion_level"]
    assert les["method"] == "centre_distance" and "approximation" in m["settings"]["hit_criterion"]
    assert les["n_lesions"] == m["case_level"]["n_positive"]
    assert 0 < les["hit_rate"]["value"] <= m["case_level"]["at_threshold"]["sensitivity"]["value"]
    for name in ("roc.png", "froc.png", "sensitivity_by_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    for needle in ("CLAIM", "TRIPOD+AI", "Series selection rule", "Preprocessing", "Config hash",
                   gen.config_hash, "Operating threshold", "Exclusions and missing data", "95% CI",
                   "roc.png", "&lt; 2 cm", "not_processed", "9.9.2"):  # fmt: skip
        assert needle in html, needle


def test_csv_labels_give_the_same_result(evaluated, tmp_path):
    gen, labels, out, m = evaluated
    root = out.parent
    res = evaluate(gen.store.root, root / "labels.csv", by=("size",), n_boot=300)
    assert res.metrics["case_level"] == m["case_level"]


def test_plots_are_optional(evaluated, tmp_path, monkeypatch):
    gen, labels, out, m = evaluated
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    res = evaluate(gen.store.root, out.parent / "labels.parquet", by=("size",), n_boot=50)
    paths = write(res, tmp_path / "noplot")
    assert not list((tmp_path / "noplot").glob("*.png"))
    assert "matplotlib is not installed" in paths["report"].read_text()


def test_mask_based_lesion_level(tmp_path):
    import nibabel as nib

    from pdacscreen.io.store import FindingsStore

    st = FindingsStore(tmp_path / "store")
    maps = tmp_path / "maps"
    maps.mkdir()
    lesion = np.zeros((12, 12, 12), np.uint8)
    lesion[2:6, 2:6, 2:6] = 1
    rows, labels = [], []
    for k, (y, p, place) in enumerate(
        [(1, 0.9, "on"), (1, 0.8, "off"), (0, 0.7, "off"), (1, 0.2, None), (0, 0.1, None)]
    ):
        uid = f"1.2.7.{k}"
        truth = lesion * 2 if y else np.zeros_like(lesion)
        truth[8:10, 8:10, 8:10] = 1  # "pancreas" label 1 is not a lesion
        if k % 2:
            np.save(maps / f"{uid}.npy", truth)
        else:  # named by series uid, as a phantom archive's labels/ folder is
            nib.save(nib.Nifti1Image(truth, np.eye(4)), maps / f"{uid}.9.nii.gz")
        ev = None
        if place:
            pred = np.zeros_like(lesion)
            sl = slice(3, 6) if place == "on" else slice(9, 12)
            pred[sl, sl, sl] = 1
            (st.evidence_dir / uid).mkdir(parents=True)
            nib.save(nib.Nifti1Image(pred, np.eye(4)), st.evidence_dir / uid / "lesion_mask.nii.gz")
            ev = f"evidence/{uid}"
        rows.append({"study_instance_uid": uid, "series_instance_uid": f"{uid}.9", "status": "ok", "pdac_probability": p, "pdac_flag": p >= 0.5,
                     "operating_threshold": 0.5, "evidence_path": ev, "lesion_count": int(place is not None)})  # fmt: skip
        labels.append({"study_instance_uid": uid, "label": y})
    st.append_findings(
        rows, sweep_id="s", sweep_date=dt.date(2025, 1, 1), model_version="1", config_hash="c"
    )
    pd.DataFrame(labels).to_csv(tmp_path / "labels.csv", index=False)
    res = evaluate(
        st.root, tmp_path / "labels.csv", by=(), label_maps=maps, lesion_label=2, n_boot=50
    )
    les = res.metrics["lesion_level"]
    assert les["method"] == "mask_iou" and les["n_lesions"] == 3
    assert les["hit_rate"]["numerator"] == 1  # only case 0's prediction overlaps its lesion
    assert les["false_positives_per_case"] == pytest.approx(2 / 5)  # cases 1 and 2, off target
    assert "IoU with a reference lesion is >= 0.1" in res.metrics["settings"]["hit_criterion"]


def test_bad_inputs_are_typed_errors(evaluated, tmp_path):
    gen, labels, out, m = evaluated
    (tmp_path / "l.csv").write_text("study,label\n1,1\n")
    with pytest.raises(InputError, match="study_instance_uid"):
        evaluate(gen.store.root, tmp_path / "l.csv")
    with pytest.raises(InputError, match="--by"):
        evaluate(gen.store.root, out.parent / "labels.csv", by=("colour",))
    with pytest.raises(InputError, match="model-version"):
        evaluate(gen.store.root, out.parent / "labels.csv", model_version="9.9")
    assert main(["evaluate", str(gen.store.root), "--labels", str(tmp_path / "none.csv")]) == 2


def test_labels_or_diagnoses_is_required_not_both(evaluated):
    gen, labels, out, m = evaluated
    store = str(gen.store.root)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", store])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["evaluate", store, "--labels", "a.csv", "--diagnoses", "b.csv"])
    res = evaluate(gen.store.root, out.parent / "labels.parquet", by=(), n_boot=0)
    assert len(res.cases) == m["counts"]["evaluated"]  # the cases an aggregate export counts


def test_minimal_labels_use_findings_for_acquisition_subgroups(evaluated, tmp_path):
    gen, labels, out, m = evaluated
    minimal = labels[["study_instance_uid", "label"]]
    minimal.to_csv(tmp_path / "min.csv", index=False)
    res = evaluate(gen.store.root, tmp_path / "min.csv", n_boot=50)
    mm = res.metrics
    assert mm["case_level"]["auroc"]["value"] == m["case_level"]["auroc"]["value"]
    assert mm["lesion_level"] is None and mm["settings"]["hit_criterion"] is None
    assert set(mm["subgroup_notes"]) == {"size", "location", "site"}  # never the predicted size
    assert mm["subgroups"]["size"] == [] and len(mm["subgroups"]["vendor"]) == 4
    paths = write(res, tmp_path / "min")
    assert "not available: labels have no lesion_diameter_mm" in paths["report"].read_text()


def test_assess_summary_and_evaluate_share_one_metrics_module():
    """The model card (assess) and the evaluation report score cases with the same code."""
    from pdacscreen.engine.training.assess import summarise

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30, int), np.zeros(50, int)]
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    rows = [
        {
            "probability": float(pi),
            "pdac": int(yi),
            "lesion_diameter_mm": 15.0 if yi else float("nan"),
            "lesion_type": "pdac" if yi else "none",
            "fatty_pancreas": False,
            "localised": bool(yi),
            "qc_flags": [],
            "seconds": 1.0,
        }
        for pi, yi in zip(p, y, strict=True)
    ]
    s = summarise(rows, operating=0.5)
    cm = M.case_metrics(y, p, threshold=0.5, specificities=(0.95,), n_boot=500)
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert s["auroc_ci"] == [cm.auroc.ci_low, cm.auroc.ci_high]
    assert (
        s["sensitivity_operating"] == cm.at_threshold.sensitivity.value == np.mean(p[y == 1] >= 0.5)
    )
    assert s["threshold_spec95_here"] == cm.at_specificity[0].threshold
