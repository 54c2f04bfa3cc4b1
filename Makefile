# Two promises: `make demo` runs a real sweep on generated data, `make test` runs the
# test suite. Both build .venv from nothing first. torch/torchvision are installed with
# pip on their own first so pip picks the pinned pair (constraints.txt, kept for the rest). `make soak` is the realistic
# tier: the real-timing tests (pytest -m realistic), then both shipped search spaces
# through `covid-tune sweep` at a realistic size (`covid-tune bench --real`, figures in
# soak.json; about 14 minutes on 2 CPU cores, measured in docs/benchmarks.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-backbones soak venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/covid-tune demo

# Two test processes (pytest-xdist), each with its own two-node Ray cluster, started
# once by the first test that needs it (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# The tests that need no Ray cluster and take under a few seconds each (markers cluster,
# slow): under a minute here.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not cluster and not slow and not soak and not realistic"

# Every registered backbone built, trained a step at 32 px, loaded from a test-made
# state dict, exported (ONNX, .pt2), predicted and explained (marker backbones; make
# test leaves them out): about a minute on 2 CPU cores (docs/benchmarks.md).
test-backbones: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m backbones

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m realistic
	$(BIN)/covid-tune bench --real --json soak.json

clean:
	rm -rf $(VENV) runs demo-out soak-out
