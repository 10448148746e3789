# Every target installs what it needs first, so each works on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo bench deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

deps: $(STAMP)

test: deps
	$(PY) -m pytest -q

test-fast: deps
	$(PY) -m pytest -q -m "not slow"

demo: deps
	$(PY) -m orchestrator demo

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

include fixtures/fixtures.mk
