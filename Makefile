# `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; the library itself
# accepts a broad range.
TORCH_DEV := torch==2.13.0

.PHONY: demo test bench lint typecheck unit clean

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_DEV)
	$(PY) -m pip install --quiet -e '.[dev,examples]' $(TORCH_DEV)
	touch $@

demo: $(VENV)/.ready
	$(PY) examples/demo.py

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check torchmemguard tests examples benchmarks
	$(VENV)/bin/ruff format --check torchmemguard tests examples benchmarks

typecheck: $(VENV)/.ready
	$(VENV)/bin/mypy torchmemguard tests/typing_usage.py

unit: $(VENV)/.ready
	$(PY) -m pytest

test: lint typecheck unit

bench: $(VENV)/.ready
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
