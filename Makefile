# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(PY) -m fslsage.demo  # a Ray Tune sweep: configs/demo_sweep.yaml

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/overhead.py
	$(PY) bench/server_batching.py

lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) results/*/ .pytest_cache
