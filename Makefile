# `make test` and `make demo` build .venv from the pins when it is missing or older than them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv lint test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,dev]"
	@touch $(STAMP)

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check coap_plugins tests benchmarks
	$(PY) -m ruff format --check coap_plugins tests benchmarks

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m coap_plugins.demo

# the whole evidence suite (3 seeds, full sweep, one run at a time: about 4 hours on 2 CPU cores);
# docs/RESULTS.md quotes a shorter run of it
bench: $(STAMP)
	$(PY) benchmarks/optimizer_step.py --out docs/results/optimizer_step.md
	$(PY) benchmarks/quality.py --out docs/results/quality
	$(PY) benchmarks/overhead.py --out docs/results

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
