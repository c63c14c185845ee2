# MindSemantix — the README's commands. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mindsemantix-installed
PYTEST_ARGS ?=

.PHONY: install test bench demo clean-demo

# (Re)install when pyproject.toml or the set-up script changes.
$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	@touch $@

install: $(STAMP)

# pytest exits 5 when it collects nothing: that is a failure here too.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@mkdir -p bench_results
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done
