# Every target installs what it needs first, so each works on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast lint demo demo-linux bench plots deps clean qemu-10

# QEMU 10.0 from bookworm-backports, unpacked beside the system's 7.2 (never over it).
QEMU10 := build/qemu-10.0/qemu-system-x86_64

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

deps: $(STAMP)

$(QEMU10): tools/fetch-qemu-10.sh
	tools/fetch-qemu-10.sh $(@D)

qemu-10: $(QEMU10)

# Lint, format and types first; then everything against the system's QEMU, the real-QEMU
# (slow) tests again against 10.0, and the real-kernel lab (fixtures/realkernel/realkernel.mk)
# in its nested Linux.
test: lint deps fixtures $(QEMU10) realkernel-lab
	$(PY) -m pytest -q
	ORCHESTRATOR_QEMU=$(abspath $(QEMU10)) $(PY) -m pytest -q -m slow
	$(MAKE) --no-print-directory realkernel

LINTED := orchestrator tests bench tools examples fixtures

lint: deps
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	$(PY) tools/import_graph.py --check

test-fast: deps fixtures
	$(PY) -m pytest -q -m "not slow"

demo: deps fixtures
	$(PY) -m orchestrator demo

demo-linux: deps fixtures linux-guest
	$(PY) -m orchestrator demo --workload linux --mem 512M

bench: deps fixtures $(QEMU10) linux-guest
	$(PY) -m bench --qemu qemu-system-x86_64 --qemu $(abspath $(QEMU10))

# One plot of each kind from real runs here: a report, a trace's W(t), a sweep (docs/plots/).
plots: deps fixtures
	$(PY) tools/example_plots.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

include fixtures/fixtures.mk
