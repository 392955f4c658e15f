# tiltflow: `make demo` runs the main job on the embedded default, `make test` runs the whole suite.
# Both bootstrap .venv on a fresh machine. torch==2.13.0 is installed first: pip takes the CPU build
# from this machine's local disk (a loose `torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-fast lint clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/tiltflow demo --out runs/demo

# pytest exits 5 when it collected no tests: say so, and do not fail on it (a real failure still fails).
test: $(VENV)/.test
	$(VENV)/bin/ruff check tiltflow tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

test-fast: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check tiltflow tests
	$(VENV)/bin/mypy --ignore-missing-imports tiltflow/flow tiltflow/sampling/cps.py tiltflow/sampling/noise.py \
		tiltflow/sampling/sampler.py tiltflow/losses

clean:
	rm -rf runs .pytest_cache
