# The two commands of the README. Each sets up .venv on first use (CPU torch, then this repo's dependencies).
#   make quickstart   the embedded default: synthetic data, tiny bases, stage 1 + stage 2, held-out accuracy
#   make test         the test suite CI runs (slow tests excluded; browser tests need Debian's chromium, see .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) quickstart.py

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

.PHONY: install quickstart test lint
