# Set-up and entry points. Every target installs what it needs into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
XLA_TEST_FLAGS := --xla_force_host_platform_device_count=8

.PHONY: install test bench-models demo

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 first: on the project's CPU machines pip takes that CPU build from the local disk, and the
# test extra's torch>=2.5 is then already met (a bare `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "dynamic-network-architectures==0.4.4"
	touch $@

install: $(VENV)/.installed

test: install
	XLA_FLAGS="$(XLA_TEST_FLAGS)" $(BIN)/python -m pytest -q tests

bench-models: install
	$(BIN)/python benchmarks/model_cpu.py --out benchmarks/results/model_cpu.json

demo: install
	$(BIN)/python -m jaxseg.launch demo --config configs/demo.yaml --workdir runs/demo
