# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
# torch is pinned to the CPU build 2.13.0 (a plain `torch` requirement can pull several GB of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-fast fuzz benchmark clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,mlflow,wandb,plots]" "$(TORCH)"
	touch $@

demo: venv
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

fuzz: venv
	$(PY) -m pytest -q tests/test_fuzz.py --fuzz-examples 200

benchmark: venv
	$(PY) tests/benchmarks/overhead.py

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache
