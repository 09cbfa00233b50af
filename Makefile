# `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; the library itself
# accepts a broad range.
TORCH_DEV := torch==2.13.0

.PHONY: demo test bench gpu-check lint typecheck prometheus-tools unit clean

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_DEV)
	$(PY) -m pip install --quiet -e '.[dev,examples]' $(TORCH_DEV)
	@# Ray Serve, for its example's test: where it cannot be installed that test
	@# skips, except in CI (CI=true), where a skipped check proves nothing.
	$(PY) -m pip install --quiet -e '.[ray]' $(TORCH_DEV) || { \
		if [ "$${CI:-}" = true ]; then echo "error: ray could not be installed" >&2; exit 1; fi; \
		echo "ray could not be installed: tests/test_ray_serve.py will skip"; }
	touch $@

demo: $(VENV)/.ready
	$(PY) examples/demo.py

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check torchmemguard tests examples benchmarks
	$(VENV)/bin/ruff format --check torchmemguard tests examples benchmarks

typecheck: $(VENV)/.ready
	$(VENV)/bin/mypy torchmemguard tests/typing_usage.py

# promtool and prometheus come from Debian's prometheus package. Root installs
# it when a tool is missing; anyone else is told why, and the tests that need
# them skip. In CI (CI=true) a missing tool fails the run: a check that CI
# skips proves nothing.
prometheus-tools:
	@missing=; for tool in promtool prometheus; do \
		command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then reason="only root may install them (apt-get install prometheus)"; \
	elif ! command -v apt-get >/dev/null; then reason="there is no apt-get to install them with"; \
	else \
		echo "Missing:$$missing. Installing Debian's prometheus package."; \
		apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && \
		command -v promtool >/dev/null && command -v prometheus >/dev/null && exit 0; \
		reason="installing Debian's prometheus package did not provide them"; fi; \
	if [ "$${CI:-}" = true ]; then \
		echo "error: missing:$$missing; $$reason. CI=true: failing the run." >&2; exit 1; fi; \
	echo "Not installed:$$missing; $$reason."

unit: $(VENV)/.ready prometheus-tools
	$(PY) -m pytest

test: lint typecheck unit

# The benchmarks' peers and tools (the bench extra: accelerate, toma, torch-max-mem,
# matplotlib, tqdm), with the same torch pin, so that they never replace the CPU build.
$(VENV)/.bench-ready: $(VENV)/.ready pyproject.toml
	$(PY) -m pip install --quiet -e '.[bench]' $(TORCH_DEV)
	touch $@

# Each benchmark writes benchmarks/results/<name>.json; the report draws their
# plots beside them and writes docs/benchmarks.md from them.
bench: $(VENV)/.bench-ready
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.scrape
	$(PY) -m benchmarks.recovery
	$(PY) -m benchmarks.recovery --tuned
	$(PY) -m benchmarks.training
	$(PY) -m benchmarks.lifetimes
	$(PY) -m benchmarks.lifetimes --tuned
	$(PY) -m benchmarks.batching
	$(PY) -m benchmarks.report

# The GPU suite and the benchmarks' GPU paths, on a machine that has torch,
# wrapt and prometheus_client already and may have no network: no venv, the
# package from this working tree (the project's venv where there is one).
# Reports go to $TORCHMEMGUARD_REPORT_DIR.
GPU_PYTHON := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) tests/gpu/check.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
