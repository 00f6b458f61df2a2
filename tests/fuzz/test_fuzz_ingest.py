"""A short seeded fuzz campaign (``make fuzz`` runs the long one): 500 mutated files and 30
mutated series through the indexer's header read, the decoder and load_series."""

from __future__ import annotations

from dicom_fuzz import FINDINGS, HANG, MEMORY_LIMIT_BYTES, run_campaign

from pdacscreen.io.errors import ErrorCode


def test_short_campaign_never_crashes_and_every_file_gets_a_code(tmp_path):
    from conftest import REAL_CT

    real = REAL_CT if REAL_CT.is_dir() else None  # absent in a plain clone: phantom seeds only
    rep = run_campaign(files=500, series=30, seed=13, workdir=tmp_path, real_ct=real, budget_s=10)
    assert rep.findings == [], rep.findings[:3]  # no crash, no dead worker, no MemoryError
    assert rep.files == 500 and rep.series == 30
    assert rep.controls_ok == rep.controls  # the intact seeds still read, decode and load
    allowed = {"ok", *ErrorCode._value2member_map_}
    codes = [outcome for _, _, outcome in rep.rows]
    assert not set(codes) & set(FINDINGS) and set(codes) <= allowed
    stages = {}
    for stage, item, _ in rep.rows:
        stages.setdefault(stage, set()).add(item)
    files = {i for i in stages["header"] if not i.startswith("control:")}
    assert len(files) == 500 and files == {i for i in stages["decode"] if i[0] == "f"}
    assert sum(not i.startswith("control:") for i in stages["series"]) == 30
    # the mutations bite: most mutated files are refused, with several distinct codes
    bad = [o for s, i, o in rep.rows if s == "header" and i[0] == "f" and o != "ok"]
    assert len(bad) > 150 and len(set(bad)) >= 5
    killed = sum(o == HANG for _, _, o in rep.rows)
    assert len(rep.hangs) <= killed  # a hung decoder was killed and the campaign went on
    assert MEMORY_LIMIT_BYTES == 3 * 1024**3
