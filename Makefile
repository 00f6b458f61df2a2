# pdacscreen: every target sets itself up first, so a fresh clone needs only `make demo` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdacscreen-setup
WORK := $(CURDIR)/work

# Offline, quiet, state kept inside ./work (see README "Offline settings").
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_HOME ?= $(WORK)/prefect
export RAY_TMPDIR ?= $(WORK)/ray
export PDACSCREEN_WORK ?= $(WORK)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test demo bench lint clean gpu-check fuzz soak pacs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, from the CPU build this machine holds; a plain `torch` would pull CUDA wheels.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@bash infra/setup-browser || true
	@bash infra/setup-orthanc || true
	@mkdir -p $(WORK)
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not bench" --durations=20

demo: setup
	bash infra/demo.sh

bench: setup
	$(PY) -m pytest -q -s -m bench tests/bench

# Long seeded fuzz campaign against the ingest (tests/fuzz); prints counts by error code.
FUZZ_FILES ?= 10000
FUZZ_SERIES ?= 300
FUZZ_SEED ?= 1
fuzz: setup
	nice $(PY) tests/fuzz/campaign.py --files $(FUZZ_FILES) --series $(FUZZ_SERIES) --seed $(FUZZ_SEED)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A local PACS for trials: Orthanc + DICOMweb with infra/orthanc, the demo archive uploaded by STOW-RS.
pacs: setup
	bash infra/pacs

gpu-check:
	bash infra/gpu-check

# A week of nights (not in CI): 7 sweeps of a growing, damaged archive; prints a table.
soak: setup
	nice $(PY) infra/soak.py --work $(WORK)/soak --nights 7 --initial 40 --new 15

clean:
	rm -rf $(WORK) .pytest_cache .ruff_cache
