# MindSemantix — the README's commands. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mindsemantix-installed
PYTEST_ARGS ?=
# make demo [SCALE=default|tiny] [SEED=0] [SUBJECTS=4] [RUN=name] [DEMO_ROOT=dir];  make eval [RUN=name]
SCALE ?= default
SEED ?= 0
SUBJECTS ?=
RUN ?=
DEMO_ROOT ?=
DEMO_ARGS = $(if $(SUBJECTS),--subjects $(SUBJECTS)) $(if $(RUN),--run $(RUN)) $(if $(DEMO_ROOT),--root $(DEMO_ROOT))

.PHONY: install test bench demo eval

# (Re)install when pyproject.toml or the set-up script changes.
$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	@touch $@

install: $(STAMP)

# pytest exits 5 when it collects nothing: that is a failure here too.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Stage 1 against the MinD-Vis graph at its published config (bf16), then the scaling table
# (bench_results/scaling.md = docs/performance.md's tables). ~10 min on 2 cores; run on a quiet machine.
bench: $(STAMP)
	@mkdir -p bench_results
	$(PY) benchmarks/bench_brain_encoder.py --configs mindvis --precisions bf16 --steps 5 --warmup 1 \
	    --variants ours,ours-dist,ours-cross-dist,ours-sdpa-dist
	$(PY) benchmarks/bench_scaling.py

# The whole job on a simulated study; finished steps are reused (see mindsemantix/demo.py).
demo: $(STAMP)
	$(PY) -m mindsemantix.demo --scale $(SCALE) --seed $(SEED) $(DEMO_ARGS)

# Baselines + report (reports/<run>/eval.md) of the most recent run, or of RUN.
eval: $(STAMP)
	$(PY) -m mindsemantix.demo --eval-only $(DEMO_ARGS)
