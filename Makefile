# Set-up and entry points. Every target installs what it needs into .venv first.
# jax >= 0.12 (oneDNN convolutions on CPU) needs Python >= 3.12: PY is the first of python3.12, python3.13,
# python3 and pyenv's installed 3.12+ versions that runs and is 3.12 or newer (pyenv's shims refuse to run
# a version pyenv has not selected, so they are skipped). Override with `make PY=/path/to/python test`.
PY ?= $(shell for p in python3.12 python3.13 python3 \
	  $$(ls -d "$$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -V); do \
	  "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
XLA_TEST_FLAGS := --xla_force_host_platform_device_count=8

.PHONY: install test test-fast bench-models demo

$(BIN)/activate:
	@test -n "$(PY)" || { echo "jaxseg needs Python >= 3.12 (jax >= 0.12); none found on PATH or under pyenv. Install one (e.g. 'pyenv install 3.12') or pass PY=/path/to/python3.12" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# jaxseg and its core packages: all the demo needs.
$(VENV)/.core: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

# The tests add torch, MONAI and nnU-Net's networks. On Python 3.12 the registry's torch is its CUDA build
# (about 50 s to install here); it runs the parity tests on the CPU. dynamic-network-architectures with
# --no-deps: its timm -> torchvision chain is not needed.
$(VENV)/.installed: $(VENV)/.core
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "dynamic-network-architectures==0.4.4"
	touch $@

install: $(VENV)/.installed

test: install
	XLA_FLAGS="$(XLA_TEST_FLAGS)" $(BIN)/python -m pytest -q tests

# For iteration: everything but the tests marked slow (pyproject's pytest markers); CI runs `make test`.
test-fast: install
	XLA_FLAGS="$(XLA_TEST_FLAGS)" $(BIN)/python -m pytest -q -m "not slow" tests

bench-models: install
	$(BIN)/python benchmarks/model_cpu.py --out benchmarks/results/model_cpu.json

demo: $(VENV)/.core
	$(BIN)/python -m jaxseg.launch demo --config configs/demo.yaml --workdir runs/demo
