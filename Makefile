# Two commands on a fresh machine: `make demo` and `make test`. Both create/update .venv themselves
# and skip the install when pyproject.toml has not changed since the last one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/shapes
RUN ?= runs/demo
# `make demo` promises DEMO_MINUTES wall time from a bare checkout: training gets the config's
# train.max_minutes, or less when the install and the corpus took so long that the rest would not fit
# (EVAL_RESERVE_S covers the start-up and the evaluation, ~80 s). DEMO_START is read when make starts.
DEMO_MINUTES ?= 15
EVAL_RESERVE_S ?= 120
DEMO_START := $(shell date +%s)
DEMO_CONFIG := configs/demo_shapes.yaml

.PHONY: venv demo data test test-slow bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,serve]'
	touch $(STAMP)

venv: $(STAMP)

data: venv
	$(PY) tools/make_data.py shapes --out $(DATA) --if-missing

demo: data
	$(PY) tools/train.py --config $(DEMO_CONFIG) --output $(RUN) data.root=$(DATA) train.max_minutes=$$($(PY) -c \
	  "import time; from mmfm.config import load_config; left = ($(DEMO_START) + $(DEMO_MINUTES) * 60 \
	  - $(EVAL_RESERVE_S) - time.time()) / 60; print(round(max(1.0, min(load_config('$(DEMO_CONFIG)').train.max_minutes, left)), 2))")

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

bench: venv
	mkdir -p bench_out
	for b in data trunk packing video_memory train search; do $(PY) tools/bench.py $$b --json bench_out/$$b.json; done

lint: venv
	$(VENV)/bin/ruff check mmfm tools tests

clean:
	rm -rf $(RUN) bench_out
