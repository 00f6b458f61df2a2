"""Federated evaluation (flows/federated.py, flows/cli_evaluate_network.py).

Sites are drawn from binormal models on the logit scale; the pooled AUROC from their aggregate
exports is compared with the AUROC of the pooled study rows.  Binning error bound: pairs of a
positive and a negative more than one bin apart are ordered as in the rows, so the binned AUROC
(ties 1/2) differs from the rows' by at most half the share of pairs that fall in one bin,
``0.5 * sum_b pos_b * neg_b / (P * N)``; for scores of bounded density this is O(bin width).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm
from synthetic_store import make_synthetic_findings

from pdacscreen.engine import metrics as M
from pdacscreen.flows import federated as F
from pdacscreen.flows.cli import main
from pdacscreen.io.errors import InputError


def site(seed, n=3000, *, sep=2.0, prevalence=0.15):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    s = 1 / (1 + np.exp(-(rng.normal(-1.5, 1.0, n) + sep * y)))
    vendor = np.asarray(["SIEMENS", "GE", "Philips"], object)[rng.integers(0, 3, n)]
    return y, s, vendor


def export(y, s, vendor, name, *, k=10, bins=1000):
    return F.build_aggregate(
        s, y, subgroups={"manufacturer": vendor}, threshold=0.5, site=name,
        model={"name": "ref", "version": "0.1.0"}, bins=bins, k=k,
    )  # fmt: skip


def _binned(y, s, bins):
    b = np.clip(np.floor(s * bins).astype(int), 0, bins - 1)
    return np.bincount(b[y], minlength=bins), np.bincount(b[~y], minlength=bins)


@pytest.mark.parametrize("bins", [1000, 20])
def test_pooled_auroc_equals_the_rows_auroc_up_to_binning_error(bins):
    sites = [site(1), site(2, sep=1.2)]
    net = F.network([export(*d, f"s{i}", k=1, bins=bins) for i, d in enumerate(sites)])
    y = np.concatenate([d[0] for d in sites])
    s = np.concatenate([d[1] for d in sites])
    rows = skm.roc_auc_score(y, s)
    pos, neg = _binned(y, s, bins)
    bound = 0.5 * np.sum(pos * neg) / (pos.sum() * neg.sum())
    pooled = net["pooled"][0]
    assert pooled["subgroup"] == "all" and pooled["n_positive"] == y.sum()
    assert abs(pooled["auroc"]["value"] - rows) <= bound + 1e-12
    lo, hi = pooled["auroc_bounds"]
    assert lo <= rows <= hi and hi - lo == pytest.approx(2 * bound)
    assert bound < (2e-3 if bins == 1000 else 0.05)  # O(bin width)
    assert pooled["auroc"]["ci_low"] < pooled["auroc"]["value"] < pooled["auroc"]["ci_high"]


def test_delong_variance_from_counts_matches_the_row_formula():
    rng = np.random.default_rng(4)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(y * 1.0, 1.0), 1)  # ties
    x, z = s[y], s[~y]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    want = v10.var(ddof=1) / x.size + v01.var(ddof=1) / z.size
    values = np.unique(s)
    pos = np.array([np.sum(x == v) for v in values])
    neg = np.array([np.sum(z == v) for v in values])
    assert M.auroc_from_counts(pos, neg) == pytest.approx(psi.mean(), abs=1e-12)
    assert M.auroc_variance_from_counts(pos, neg) == pytest.approx(want, rel=1e-10)


def test_suppression_keeps_every_cell_at_or_above_k_and_the_roc_honest():
    y, s, vendor = site(3, n=2000, prevalence=0.05)
    vendor[:3] = "TOSHIBA"  # a group of 3 studies: merged into "other"
    k = 10
    agg = export(y, s, vendor, "A", k=k)
    tables = {(t["subgroup"], t["group"], t["label"]): t for t in agg["tables"]}
    for t in agg["tables"]:
        assert all(c >= k for _, _, c in t["cells"])
    assert not any(g == "TOSHIBA" for _, g, _ in tables)
    assert ("manufacturer", "other", "negative") in tables
    for label, member in (("positive", y), ("negative", ~y)):
        assert tables[("all", "all", label)]["n"] == member.sum()  # nothing dropped
        groups = [t for (d, _, lab), t in tables.items() if d == "manufacturer" and lab == label]
        assert sum(t["n"] for t in groups) == member.sum()
        edges = {tuple(map(tuple, (c[:2] for c in t["cells"]))) for t in groups}
        cells = sorted({c for e in edges for c in e})  # one partition shared by the groups
        assert all(a[1] <= b[0] for a, b in zip(cells, cells[1:], strict=False))
    summary = F.site_summary(agg)["tables"][0]
    lo, hi = summary["auroc_bounds"]
    assert lo <= skm.roc_auc_score(y, s) <= hi
    assert hi - lo < 0.2  # merged cells widen the bounds, but they stay informative


def test_small_labels_are_not_published():
    y, s, vendor = site(5, n=400, prevalence=0.01)
    agg = export(y, s, vendor, "tiny", k=10)
    assert y.sum() < 10
    assert agg["suppressed"] == [{"label": "positive", "why": "fewer than k=10 studies"}]
    assert {t["label"] for t in agg["tables"]} == {"negative"}


def test_heterogeneity_is_small_for_one_distribution_and_large_for_two():
    same = F.network([export(*site(seed), f"s{seed}") for seed in (10, 11, 12)])
    diff = F.network([export(*site(20, sep=2.8), "a"), export(*site(21, sep=0.8), "b")])
    assert same["heterogeneity"]["i2"] < 0.3 and same["heterogeneity"]["p_value"] > 0.05
    assert diff["heterogeneity"]["i2"] > 0.9 and diff["heterogeneity"]["p_value"] < 1e-6
    h = M.heterogeneity([0.8, 0.8, 0.8], [1e-3, 2e-3, 1e-3])
    assert h.q == pytest.approx(0.0) and h.i2 == 0.0 and h.fixed.value == pytest.approx(0.8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    out = {}
    for name, seed, sep in (("north", 7, 2.5), ("south", 8, 2.5)):
        gen = make_synthetic_findings(root / name, 1500, seed=seed, prevalence=0.2, separation=sep)
        truth = gen.truth.to_pandas()
        truth["patient_sex"] = np.where(np.arange(len(truth)) % 2, "F", "M")
        truth["patient_age"] = [f"{40 + i % 45:03d}Y" for i in range(len(truth))]
        pq.write_table(gen.truth.from_pandas(truth), root / f"{name}.parquet")
        path = root / f"{name}.json"
        rc = main(["evaluate", str(gen.store.root), "--labels", str(root / f"{name}.parquet"),
                   "--out", str(root / f"ev-{name}"), "--bootstrap", "50", "--by", "vendor",
                   "--export-aggregate", str(path), "--site-name", name])  # fmt: skip
        assert rc == 0
        out[name] = (gen, truth, path)
    return root, out


def test_an_export_holds_only_bin_counts(stores):
    root, out = stores
    for gen, _, path in out.values():
        text = path.read_text()
        f = gen.store.read_findings()
        for col in ("study_instance_uid", "series_instance_uid", "patient_key", "accession_key"):
            for value in f[col].dropna().unique()[:2000]:
                assert str(value) not in text, (col, value)
        assert not re.search(r"\d+\.\d+\.\d+\.\d+", text)  # no UID-like strings
        assert not re.search(r"\d{4}-\d{2}-\d{2}", text)  # no dates
        agg = json.loads(text)
        assert set(agg) == {"schema", "site", "model", "threshold", "bins", "k", "suppression",
                            "tables", "suppressed", "other_groups", "counts", "note"}  # fmt: skip
        for t in agg["tables"]:
            assert set(t) == {"subgroup", "group", "label", "n", "cells"}
            for lo, hi, c in t["cells"]:
                assert all(isinstance(v, int) for v in (lo, hi, c)) and c >= agg["k"] == 10
        dims = {t["subgroup"] for t in agg["tables"]}
        assert dims == {"all", "manufacturer", "thickness", "sex", "age"}
        assert "synthetic phantoms" in agg["note"]


def test_evaluate_network_cli_pools_the_sites(stores, tmp_path):
    root, out = stores
    paths = [str(p) for *_, p in out.values()]
    rc = main(["evaluate-network", *paths, "--out", str(tmp_path / "net.json")])
    assert rc == 0
    net = json.loads((tmp_path / "net.json").read_text())
    assert net["sites"] == ["north", "south"] and len(net["per_site"]) == 2
    rows = []
    for gen, truth, _ in out.values():
        f = gen.store.read_findings().merge(truth[["study_instance_uid", "label"]])
        rows.append(f[(f.status == "ok") & f.label.notna()])
    df = pd.concat(rows)
    pooled = net["pooled"][0]
    assert pooled["n_positive"] == int(df.label.sum()) and pooled["n_negative"] == int(
        (df.label == 0).sum()
    )
    lo, hi = pooled["auroc_bounds"]
    assert lo <= skm.roc_auc_score(df.label, df.pdac_probability) <= hi
    assert {(p["subgroup"], p["group"]) for p in net["pooled"]} >= {("sex", "F"), ("sex", "M")}
    assert net["heterogeneity"]["i2"] < 0.5  # two sites from one model
    assert len(net["roc"]["fpr"]) == 1001 and net["roc"]["fpr"][0] == 1.0
    (tmp_path / "coarse.json").write_text(
        json.dumps(
            {
                **json.loads(out["north"][2].read_text()),
                "bins": {"n": 10, "low": 0.0, "high": 1.0},
                "tables": [],
            }
        )
    )
    with pytest.raises(InputError, match="bins"):
        F.network([F.load_aggregate(out["south"][2]), F.load_aggregate(tmp_path / "coarse.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other"}))
    assert main(["evaluate-network", str(tmp_path / "bad.json")]) == 2
