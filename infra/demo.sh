#!/usr/bin/env bash
# `make demo`: a synthetic archive, a real nightly sweep (Prefect + Ray, locally), and a query.
# Running it again is incremental: the archive is kept, the sweep finds nothing new, adds no rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PDAC=.venv/bin/pdacscreen
WORK=${PDACSCREEN_WORK:-$PWD/work}
ARCHIVE=$WORK/demo/archive
STORE=$WORK/demo/store
STUDIES=${DEMO_STUDIES:-40}

if [ ! -f "$ARCHIVE/truth.parquet" ]; then
  echo "== 1/3 writing a synthetic CT archive: $STUDIES studies, matrix 256, mixed compression"
  $PDAC phantom --out "$ARCHIVE" --studies "$STUDIES" --seed 2026 --matrix 256 --compress mixed
else
  echo "== 1/3 synthetic archive already at $ARCHIVE (delete it to regenerate)"
fi

echo "== 2/3 nightly sweep (Prefect flow, local Ray) -> $STORE"
$PDAC sweep "$ARCHIVE/dicom" --store "$STORE" --demo-key   # public demo key: synthetic data only

echo "== 3/3 query the findings (DuckDB over Parquet)"
Q="SELECT accession_key, study_date, round(pdac_probability, 3) AS p, lesion_location AS location, round(lesion_diameter_mm, 1) AS diam_mm, qc_flags FROM latest_findings WHERE pdac_flag ORDER BY pdac_probability DESC LIMIT 10"
echo "\$ $PDAC query $STORE \"$Q\""
$PDAC query "$STORE" "$Q"
cat <<TXT

Findings (Parquet, partitioned by sweep date): $STORE/findings/
Failures: $STORE/failures/    Evidence (masks, key images): $STORE/evidence/
Ground truth of the synthetic archive: $ARCHIVE/truth.parquet
Try:
  $PDAC query $STORE "SELECT manufacturer, count(*) n, avg(pdac_flag::int) flag_rate FROM latest_findings GROUP BY 1"
  $PDAC evaluate $STORE --labels $ARCHIVE/truth.parquet --out $WORK/demo/eval
  $PDAC worklist $STORE --out $WORK/demo/worklist   # open worklist.html in a browser
  .venv/bin/python -c "import duckdb; print(duckdb.sql(\"SELECT status, count(*) FROM read_parquet('$STORE/findings/**/*.parquet', hive_partitioning=true) GROUP BY 1\"))"
The shipped model is a reference model trained on synthetic phantoms: not a clinical device.
TXT
