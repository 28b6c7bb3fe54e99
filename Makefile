# Two entry points for a fresh machine: `make run` (install, then the main job) and
# `make test` (install with test tools, then lint and the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export FLWR_TELEMETRY_ENABLED ?= 0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/fedtt run --overwrite

test: install
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(PY) -m pytest -q

.PHONY: install run test
