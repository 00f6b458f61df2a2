"""``pdacscreen query``: DuckDB views over a generated store, the README's example queries, Dask."""

from __future__ import annotations

import datetime as dt
import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic_store import make_synthetic_findings

from pdacscreen.flows.cli import main
from pdacscreen.flows.query import EXAMPLE_QUERIES, VIEWS, connect, findings_dataframe, query
from pdacscreen.io.errors import InputError, QueryError
from pdacscreen.io.store import FindingsStore


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    root = tmp_path_factory.mktemp("q") / "store"
    return make_synthetic_findings(root, 3000, seed=11, index=True)


@pytest.fixture(scope="module")
def df(gen):
    return gen.store.read_findings()


def test_views_are_registered_and_complete(gen, df):
    con = connect(gen.store.root)
    names = {
        r[0]
        for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()
    }
    assert set(VIEWS) <= names
    assert con.sql("SELECT count(*) FROM findings").fetchall()[0][0] == len(df)
    n_fail = len(gen.store.read_failures())
    assert con.sql("SELECT count(*) FROM failures").fetchall()[0][0] == n_fail > 0
    assert con.sql("SELECT count(*) FROM index").fetchall()[0][0] == 3000
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE findings)").fetchall())
    assert types["sweep_date"] == "DATE" and types["qc_flags"] == "VARCHAR[]"
    assert (
        types["processed_at"] == "TIMESTAMP WITH TIME ZONE" and types["lesion_count"] == "INTEGER"
    )


@pytest.mark.parametrize("name", sorted(EXAMPLE_QUERIES))
def test_every_example_query_runs(gen, name):
    table = query(gen.store.root, EXAMPLE_QUERIES[name])
    assert isinstance(table, pa.Table) and table.num_columns >= 1
    assert table.num_rows >= 1


def test_flag_rate_by_vendor_matches_pandas(gen, df):
    got = (
        query(gen.store.root, EXAMPLE_QUERIES["flag_rate_by_vendor"])
        .to_pandas()
        .set_index("manufacturer")
    )
    ok = df[df.status == "ok"]
    want = ok.groupby("manufacturer").agg(
        studies=("study_instance_uid", "size"), flagged=("pdac_flag", "sum")
    )
    assert got["studies"].to_dict() == want["studies"].to_dict()
    assert got["flagged"].to_dict() == {k: int(v) for k, v in want["flagged"].items()}
    for vendor, row in got.iterrows():
        assert row["flag_rate"] == pytest.approx(
            want.loc[vendor, "flagged"] / want.loc[vendor, "studies"], abs=1e-4
        )


def test_flagged_last_night_and_breakdowns_match_pandas(gen, df):
    got = query(gen.store.root, EXAMPLE_QUERIES["flagged_last_night"]).to_pandas()
    last = df[(df.sweep_date == df.sweep_date.max()) & (df.pdac_flag == True)]  # noqa: E712
    last = last.sort_values("pdac_probability", ascending=False)
    assert list(got["accession_key"]) == list(last["accession_key"])
    by_phase = query(gen.store.root, EXAMPLE_QUERIES["flag_rate_by_phase"]).to_pandas()
    assert by_phase["studies"].sum() == (df.status == "ok").sum()
    thick = query(gen.store.root, EXAMPLE_QUERIES["flag_rate_by_slice_thickness"]).to_pandas()
    assert list(thick["thickness"]) == ["<= 1.5 mm", "1.5-3 mm", "> 3 mm"]
    thin = df[(df.status == "ok") & (df.slice_thickness_mm <= 1.5)]
    assert thick.set_index("thickness").loc["<= 1.5 mm", "studies"] == len(thin)
    fails = query(gen.store.root, EXAMPLE_QUERIES["failures_by_error_code"]).to_pandas()
    want = gen.store.read_failures()["error_code"].value_counts()
    assert dict(zip(fails["error_code"], fails["failures"], strict=True)) == want.to_dict()
    not_ok = query(gen.store.root, EXAMPLE_QUERIES["studies_not_ok_by_code"]).to_pandas()
    assert not_ok["studies"].sum() == (df.status != "ok").sum()


def test_pancreas_volume_change_matches_pandas(gen, df):
    got = (
        query(gen.store.root, EXAMPLE_QUERIES["pancreas_volume_change"])
        .to_pandas()
        .set_index("patient_key")
    )
    ok = df[(df.status == "ok") & df.study_date.notna()].sort_values("study_date")
    per = ok.groupby("patient_key").agg(
        n=("study_instance_uid", "size"),
        first=("pancreas_volume_ml", "first"),
        last=("pancreas_volume_ml", "last"),
    )
    per = per[per.n >= 2]
    assert set(got.index) == set(per.index) and len(got) > 10
    for key, row in per.head(20).iterrows():
        assert got.loc[key, "studies"] == row.n
        assert got.loc[key, "change_pct"] == pytest.approx(
            100 * (row["last"] / row["first"] - 1), abs=0.06
        )


def test_latest_and_current_findings(tmp_path):
    st = FindingsStore(tmp_path)
    base = {"status": "ok", "pdac_flag": False, "model_name": "ref"}
    for day, version, p in [(1, "1.0", 0.1), (2, "1.1", 0.2), (3, "1.1", 0.3)]:
        st.append_findings(
            [{**base, "study_instance_uid": "1.2.3", "pdac_probability": p,
              "processed_at": dt.datetime(2025, 3, day, 2, tzinfo=dt.UTC)}],
            sweep_id=f"s{day}", sweep_date=dt.date(2025, 3, day), model_version=version,
            config_hash=f"c{day}",
        )  # fmt: skip
    st.append_findings(  # another study, only ever processed by the old version
        [{**base, "study_instance_uid": "1.2.4", "pdac_probability": 0.4,
          "processed_at": dt.datetime(2025, 3, 1, 3, tzinfo=dt.UTC)}],
        sweep_id="s1b", sweep_date=dt.date(2025, 3, 1), model_version="1.0", config_hash="c1",
    )  # fmt: skip
    assert query(tmp_path, "SELECT count(*) AS n FROM findings").column("n").to_pylist() == [4]
    latest = query(
        tmp_path, "SELECT * FROM latest_findings ORDER BY study_instance_uid"
    ).to_pylist()
    assert [(r["study_instance_uid"], r["pdac_probability"]) for r in latest] == [
        ("1.2.3", 0.3),
        ("1.2.4", 0.4),
    ]
    current = query(tmp_path, "SELECT * FROM current_findings").to_pylist()
    assert [(r["study_instance_uid"], r["sweep_id"]) for r in current] == [("1.2.3", "s3")]


def test_empty_store_has_empty_views(tmp_path):
    (tmp_path / "findings").mkdir()
    for view in VIEWS:
        assert query(tmp_path, f"SELECT count(*) AS n FROM {view}").column("n").to_pylist() == [0]
    for sql in EXAMPLE_QUERIES.values():
        query(tmp_path, sql)  # every example still runs (no rows or zero counts)
    with pytest.raises(InputError, match="existing folder"):
        query(tmp_path / "missing", "SELECT 1")


def test_temporary_and_hidden_files_are_never_read(gen, tmp_path):
    st = FindingsStore(tmp_path)
    make_synthetic_findings(st, 50, seed=2, n_files=1, n_days=1)
    part = next(st.findings_dir.glob("sweep_date=*"))
    (part / ".part-x.parquet.tmp-123").write_bytes(b"PAR1 partial")
    pq.write_table(pa.table({"study_instance_uid": ["ghost"]}), part / "_ghost.parquet")
    pq.write_table(pa.table({"study_instance_uid": ["ghost"]}), part / ".ghost.parquet")
    assert query(tmp_path, "SELECT count(*) AS n FROM findings").column("n").to_pylist() == [50]
    assert len(st.read_findings()) == 50


def test_bad_sql_is_a_query_error(gen):
    with pytest.raises(QueryError, match="findings") as e:
        query(gen.store.root, "SELECT nope FROM findings")
    assert e.value.code == "bad_query"


def test_cli_formats(gen, tmp_path, capsys):
    sql = "SELECT manufacturer, count(*) AS n, list(DISTINCT status) AS s FROM findings GROUP BY 1 ORDER BY 1"
    assert main(["query", str(gen.store.root), sql]) == 0
    out = capsys.readouterr().out
    assert "SIEMENS" in out and "4 row(s)" in out
    assert main(["query", str(gen.store.root), sql, "--format", "csv"]) == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(csv.columns) == ["manufacturer", "n", "s"] and csv["n"].sum() == 3000
    out_file = tmp_path / "r.parquet"
    assert main(["query", str(gen.store.root), sql, "--out", str(out_file)]) == 0
    assert pq.read_table(out_file).column("n").to_pylist() == csv["n"].tolist()
    assert main(["query", str(gen.store.root), sql, "--out", str(tmp_path / "r.csv")]) == 0
    assert pd.read_csv(tmp_path / "r.csv")["n"].tolist() == csv["n"].tolist()
    capsys.readouterr()
    assert main(["query", str(gen.store.root), "SELECT * FROM nowhere"]) == 2
    assert "bad_query" in capsys.readouterr().err
    assert main(["query", str(gen.store.root), sql, "--format", "parquet"]) == 2


@pytest.mark.filterwarnings("ignore:The inplace keyword")
def test_dask_dataframe_agrees_with_duckdb(gen):
    ddf = findings_dataframe(gen.store.root)
    ok = ddf[ddf.status == "ok"]
    got = (
        ok.groupby("manufacturer")
        .agg(studies=("study_instance_uid", "count"), flag_rate=("pdac_flag", "mean"))
        .compute()
    )
    want = (
        query(gen.store.root, EXAMPLE_QUERIES["flag_rate_by_vendor"])
        .to_pandas()
        .set_index("manufacturer")
    )
    for vendor, row in want.iterrows():
        assert got.loc[vendor, "studies"] == row["studies"]
        assert float(got.loc[vendor, "flag_rate"]) == pytest.approx(row["flag_rate"], abs=1e-4)
    with pytest.raises(InputError):
        findings_dataframe(gen.store.root / "nope")
