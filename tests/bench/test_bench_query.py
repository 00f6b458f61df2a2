"""Benchmark: flag rate by vendor over a 1,000,000-row findings store, ``pdacscreen query`` (DuckDB,
reads two columns) against pandas reading the whole dataset and grouping. Target: >= 5x."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from baselines import best_of
from synthetic_store import make_synthetic_findings

from pdacscreen.flows.query import EXAMPLE_QUERIES, query

N_ROWS = 1_000_000


@pytest.mark.bench
def test_bench_query_flag_rate_by_vendor(tmp_path):
    t0 = time.perf_counter()
    gen = make_synthetic_findings(tmp_path / "store", N_ROWS, seed=1, n_files=16, n_days=8)
    t_gen = time.perf_counter() - t0
    sql = EXAMPLE_QUERIES["flag_rate_by_vendor"]

    def with_pandas():
        df = pd.read_parquet(gen.store.findings_dir)  # the whole dataset, every column
        ok = df[df["status"] == "ok"]
        return ok.groupby("manufacturer", observed=True)["pdac_flag"].agg(["size", "sum"])

    t_duck, table = best_of(lambda: query(gen.store.root, sql), repeats=3)
    t_pd, want = best_of(with_pandas, repeats=3)
    got = table.to_pandas().set_index("manufacturer")
    for vendor, row in want.iterrows():  # same answer both ways
        assert got.loc[vendor, "studies"] == row["size"]
        assert got.loc[vendor, "flagged"] == row["sum"]
    ratio = t_pd / t_duck
    print(
        f"\nBENCH query_flag_rate_by_vendor ratio={ratio:.1f} "
        f"pdacscreen query (DuckDB, current_findings) {t_duck * 1000:.0f} ms vs pandas read+groupby {t_pd * 1000:.0f} ms "
        f"on {N_ROWS} rows in {len(gen.files)} files (generated in {t_gen:.1f} s; target >= 5x)"
    )
    assert got["studies"].sum() == want["size"].sum()

    # The same question over latest_findings (a window over every row) against pandas doing the
    # same deduplication: reported, no target.
    latest_sql = sql.replace("current_findings", "latest_findings")

    def with_pandas_latest():
        df = pd.read_parquet(gen.store.findings_dir)
        df = df.sort_values("processed_at").drop_duplicates(
            ["study_instance_uid", "model_name"], keep="last"
        )
        ok = df[df["status"] == "ok"]
        return ok.groupby("manufacturer", observed=True)["pdac_flag"].agg(["size", "sum"])

    t_duck2, table2 = best_of(lambda: query(gen.store.root, latest_sql), repeats=2)
    t_pd2, want2 = best_of(with_pandas_latest, repeats=2)
    assert table2.to_pandas().set_index("manufacturer")["studies"].sum() == want2["size"].sum()
    print(
        f"BENCH query_latest_flag_rate_by_vendor ratio={t_pd2 / t_duck2:.1f} "
        f"latest_findings view {t_duck2 * 1000:.0f} ms vs pandas read+dedupe+groupby {t_pd2 * 1000:.0f} ms"
    )
