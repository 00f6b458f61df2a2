"""Per-patient timelines and longitudinal flags over a findings store (DuckDB views).

:func:`patient_timeline` returns one patient's studies in date order with the change since each
previous study per year (the ``patient_timeline`` view of :mod:`pdacscreen.flows.query`);
:func:`longitudinal_flags` the patients whose latest study shows a new lesion candidate or a change
beyond the thresholds (``LONGITUDINAL_THRESHOLDS``: pancreas volume loss > 10 %/year, muscle loss
> 5 %/year, lesion growth > 2 mm/year), ranked by ``change_score``, so a worklist can rank by change
as well as by probability.  Only pseudonymous keys appear; no identifier is read.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from pdacscreen.flows.query import LONGITUDINAL_THRESHOLDS, connect, timeline_views, to_arrow
from pdacscreen.io.errors import InputError, QueryError

__all__ = ["LONGITUDINAL_THRESHOLDS", "longitudinal_flags", "patient_timeline"]


def patient_timeline(store: Path | str, patient_key: str) -> pa.Table:
    """All assessed studies of ``patient_key`` in date order (columns of the ``patient_timeline``
    view).  Raises InputError for an empty key; an unknown key gives an empty table."""
    if not isinstance(patient_key, str) or not patient_key.strip():
        raise InputError(f"patient_key must be a non-empty pseudonymous key, got {patient_key!r}")
    con = connect(store)
    try:
        key = patient_key.strip().replace("'", "''")  # a literal: keys are hashes, quotes doubled
        return to_arrow(
            con.sql(
                f"SELECT * FROM patient_timeline WHERE patient_key = '{key}' ORDER BY study_number"
            )
        )
    except duckdb.Error as e:
        raise QueryError(f"timeline query failed: {e}") from e
    finally:
        con.close()


def longitudinal_flags(store: Path | str, thresholds: dict[str, float] | None = None) -> pa.Table:
    """Patients whose latest study changed beyond ``thresholds`` (defaults:
    :data:`LONGITUDINAL_THRESHOLDS`) or shows a new candidate, highest ``change_score`` first."""
    con = connect(store)
    try:
        if thresholds:
            timeline_views(con, thresholds)
        return to_arrow(con.sql("SELECT * FROM longitudinal_flags"))
    except duckdb.Error as e:
        raise QueryError(f"longitudinal flags query failed: {e}") from e
    finally:
        con.close()
