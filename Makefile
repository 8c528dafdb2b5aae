# Two commands on a fresh machine: `make demo` and `make test`. Both create/update .venv themselves
# and skip the install when pyproject.toml has not changed since the last one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/shapes
RUN ?= runs/demo

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
	$(PY) tools/train.py --config configs/demo_shapes.yaml --output $(RUN) data.root=$(DATA)

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
