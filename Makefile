# Two entry points: `make demo` (the synthetic end-to-end demo) and `make test`.
# Both build a local virtual environment first; torch is pinned to the CPU build that installs fast here.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# MONAI Label 0.8.5 (tools/monailabel_app) has its own environment: its dependencies conflict with the core
# (pydicom 2, jsonschema 3, monai 1.5; see tools/monailabel_app/requirements.txt). torchvision, which it
# imports, links PyTorch's CUDA libraries, so the CPU torch above cannot load it: this environment takes
# the torch/torchvision pair that installs together here (both from local files, CUDA build, runs on CPU).
ML_VENV ?= .venv-monailabel
ML_PY := $(ML_VENV)/bin/python
ML_TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-core test-monailabel monailabel-env lint install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/abdoreg demo

# the core suite (tests/monailabel skips itself there, with its reason), then the MONAI Label app's tests.
# The core suite runs in TEST_WORKERS pytest-xdist workers (one per core here; each test file on one worker,
# so that its module fixtures are built once) and lists its 25 slowest steps. For a quick loop while developing:
#   .venv/bin/python -m pytest -q -m "not slow" tests/<file>.py   (skips the few long end-to-end runs)
# The tests run each bundle command as a child of a server that imported torch and MONAI once
# (tests/bundle_server.py); ABDOREG_TEST_FRESH_INTERPRETER=1 starts a fresh interpreter for each instead.
test: test-core test-monailabel

TEST_WORKERS ?= 2

test-core: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# one command for the MONAI Label environment; abdoreg goes in without its dependencies (the tests use
# abdoreg.synth, whose needs are all there; the core pins would clash with MONAI Label's)
$(ML_VENV)/.installed: tools/monailabel_app/requirements.txt
	python3 -m venv $(ML_VENV)
	$(ML_PY) -m pip install -q --upgrade pip
	$(ML_PY) -m pip install -q $(ML_TORCH)
	$(ML_PY) -m pip install -q --no-deps "monailabel==0.8.5"
	$(ML_PY) -m pip install -q -r tools/monailabel_app/requirements.txt
	$(ML_PY) -m pip install -q --no-deps -e .
	touch $@

monailabel-env: $(ML_VENV)/.installed

test-monailabel: $(ML_VENV)/.installed
	$(ML_PY) -m pytest -q tests/monailabel

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(ML_VENV) runs
