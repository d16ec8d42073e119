# Landmark tagging: train -> export -> archive -> serve -> query, plus tests and benchmarks.
# Every path is overridable: make train-transfer DATA_DIR=../shared/data/indian_monuments49 OUT=artifacts/im49
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA_URL ?= https://udacity-dlnfd.s3-us-west-1.amazonaws.com/datasets/landmark_images.zip
DATA_DIR ?= data/landmark_images
# a recipe is recipes/<name>.yaml; a data set's recipe names its data folder and negatives, so DATA_DIR is
# passed to training only when given (on the command line or in the environment)
RECIPE ?= transfer
GIVEN_DATA = $(if $(filter command line environment,$(origin DATA_DIR)),--data-dir "$(DATA_DIR)")
OUT ?=
TRAIN_ARGS ?=
EXPORT_ARGS ?=
QUANT_ARGS ?=
MODEL_DIR ?= artifacts/$(RECIPE)
KNOWN ?=
UNKNOWN ?=
MODEL_NAME ?= landmark
MODEL_VERSION ?= 1.0
BACKEND ?= onnx
MODEL_STORE ?= model_store
# flags of `python -m handlers.server` before its command (SERVER_ARGS="--workdir /tmp/ts": another server's
# folder), and more flags of its start (SERVE_ARGS="--config my.properties": other ports)
SERVER_ARGS ?=
SERVE_ARGS ?=
IMG ?= ../shared/data/udacity_samples/16.Eiffel_Tower/3828627c8730f160.jpg
# make demo's refused photo: the first of IMG and these folders' photos that the model does not tag
DEMO_UNKNOWN ?= ../shared/data/everyday/test
# empty TOPK: the server's default k (5, or every class where the model has fewer)
TOPK ?=
APP_PORT ?= 8000
SRC ?=
DST ?=
TAG_ARGS ?=
# a place index of your own geotagged photos (make index): shipped in the archive where INDEX is given
INDEX ?=
INDEX_ARGS ?=
BENCH_INDEX_ARGS ?=
# exiftool (Debian's libimage-exiftool-perl, unpacked without installing) for the sidecar tests
TOOLS ?= .tools
EXIFTOOL_DIR := $(TOOLS)/exiftool
WORKERS ?= 2
RAY_ARGS ?=
RUNS ?=
# NPROC > 1: training under torchrun (DDP, gloo on CPU / NCCL on GPU), one node; TORCHRUN_ARGS for more
# (--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint host:29400 instead of --standalone)
NPROC ?= 1
TORCHRUN_ARGS ?= --standalone
TRAINER = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun $(TORCHRUN_ARGS) --nproc-per-node $(NPROC),$(PY))
SOAK_ARGS ?=
REPORT_ARGS ?=
# the venv TorchServe runs from: .venv, or `make serve-venv`'s with the CPU-only torch build on this
# machine's disk (2.13.0; the image takes 2.14.1 from PyTorch's CPU index, deploy/Dockerfile)
SERVE_VENV ?= $(VENV)
SERVE_STAMP := .venv-serve/.installed
SERVE_TORCH ?= 2.13.0
FAULT_ARGS ?=
SWEEP_ARGS ?=
PROXY_ARGS ?=
ARCHIVE_ARGS ?=
# the container image (deploy/Dockerfile): podman where installed, else docker
ENGINE ?= $(shell command -v podman || command -v docker || echo podman)
IMAGE ?= landmark:$(MODEL_VERSION)
MAR ?= $(MODEL_STORE)/$(MODEL_NAME).mar

.PHONY: help install data train train-scratch train-transfer ensemble export quantize eval-open-set archive serve ready bench-decode bench-proxy bench-open-set \
	predict stop serve-venv bench bench-index index exiftool gpu-pack gpu-check soak sweep faults app tag tag-distributed image browser-deps test lint demo \
	report clean

help:  ## list the targets
	@grep -E '^[a-z -]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(STAMP)  ## create .venv with the pinned dependencies

data: $(STAMP)  ## download + extract the Udacity landmark set into data/ (DATA_URL, DATA_DIR)
	$(PY) -m train.download --url "$(DATA_URL)" --dest "$(DATA_DIR)"

train: $(STAMP)  ## train + export a recipe: RECIPE=wh13 (recipes/*.yaml; DATA_DIR, OUT, TRAIN_ARGS; NPROC=2: torchrun DDP)
	$(TRAINER) -m train.train --recipe $(RECIPE) $(GIVEN_DATA) --out "$(or $(OUT),artifacts/$(RECIPE))" $(TRAIN_ARGS)
	$(PY) -m train.export --run-dir "$(or $(OUT),artifacts/$(RECIPE))" $(EXPORT_ARGS)

train-scratch train-transfer:  ## train + export the from-scratch CNN / the transfer network on DATA_DIR
	$(MAKE) train RECIPE=$(@:train-%=%) OUT="$(or $(OUT),artifacts/$(@:train-%=%))" DATA_DIR="$(DATA_DIR)" NPROC=$(NPROC)

ensemble: $(STAMP)  ## average finished runs into one model + export (RUNS="dir1 dir2 ...", OUT)
	$(PY) -m train.ensemble --runs $(RUNS) --out "$(or $(OUT),artifacts/ensemble)"
	$(PY) -m train.export --run-dir "$(or $(OUT),artifacts/ensemble)"

export: $(STAMP)  ## re-export a run folder: model.ts, model.onnx, open_set.npz, model_meta.json (OUT, EXPORT_ARGS)
	$(PY) -m train.export --run-dir "$(or $(OUT),$(MODEL_DIR))" $(EXPORT_ARGS)

quantize: $(STAMP)  ## static INT8 model.int8.onnx beside model.onnx; fails if test top-1 drops > 0.5 points (OUT, QUANT_ARGS)
	$(PY) -m train.quantize --run-dir "$(or $(OUT),$(MODEL_DIR))" $(QUANT_ARGS)

eval-open-set: $(STAMP)  ## known (also shrunk) vs each unknown set at the stored operating point (MODEL_DIR, UNKNOWN="<dir> ...", KNOWN)
	$(PY) -m train.eval_open_set --model-dir "$(MODEL_DIR)" $(if $(KNOWN),--known "$(KNOWN)") --unknown $(UNKNOWN)

archive: $(STAMP)  ## build model_store/landmark.mar from a run folder (MODEL_DIR, BACKEND=onnx|onnx-int8|torchscript, ...)
	$(PY) -m handlers.archive --model-dir "$(MODEL_DIR)" --backend $(BACKEND) --name $(MODEL_NAME) \
		--version $(MODEL_VERSION) --store "$(MODEL_STORE)" --force $(if $(INDEX),--index "$(INDEX)") $(ARCHIVE_ARGS)

serve: $(STAMP)  ## start TorchServe with the archive and wait until its worker is READY (SERVE_VENV=.venv-serve: lean)
	$(SERVE_VENV)/bin/python -m handlers.server $(SERVER_ARGS) start --store "$(MODEL_STORE)" --name $(MODEL_NAME) $(SERVE_ARGS)

serve-venv: $(SERVE_STAMP)  ## .venv-serve: TorchServe with a CPU-only torch, so each worker holds about half the memory

$(SERVE_STAMP): deploy/requirements.txt
	python3 -m venv .venv-serve
	.venv-serve/bin/pip install --quiet torch==$(SERVE_TORCH)
	grep -v -e '^torch==' -e '^#' deploy/requirements.txt | .venv-serve/bin/pip install --quiet -r /dev/stdin
	touch $@

ready: $(STAMP)  ## exit 0 while the served model has a READY worker, else 1 and why (/ping cannot tell)
	$(PY) -m handlers.server $(SERVER_ARGS) ready

predict: $(STAMP)  ## top-k landmarks for IMG from the running server
	$(PY) -m handlers.server $(SERVER_ARGS) predict "$(IMG)" $(if $(TOPK),--topk $(TOPK))

stop: $(STAMP)  ## stop the TorchServe started by make serve
	$(PY) -m handlers.server $(SERVER_ARGS) stop

bench: $(STAMP)  ## latency benchmarks: eager / TorchScript / ONNX Runtime CPU+CUDA, and the served endpoint
	$(PY) -m benchmarks.run $(BENCH_ARGS)

gpu-pack: $(STAMP)  ## .gpu-carry/ for a lent GPU machine: exported models + test crops, or GPU_PACK_ARGS=--served
	$(PY) -m benchmarks.gpu_pack $(GPU_PACK_ARGS)

gpu-check: $(STAMP)  ## on CUDA: ORT providers, CUDA=CPU outputs, bench's CUDA rows, GPU worker, NCCL (GPU_CHECK_ARGS)
	@PY=$(PY) bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

bench-proxy: $(STAMP)  ## the path users hit: TorchServe directly vs through the app at c=8/16/64, in-process ceiling (MODEL_DIR, PROXY_ARGS)
	$(PY) -m benchmarks.proxy --model-dir "$(MODEL_DIR)" --backend $(BACKEND) $(PROXY_ARGS)

bench-open-set: $(STAMP)  ## per-request cost of the open-set references + gate against the decision without them (MODEL_DIR)
	$(PY) -m benchmarks.open_set_cost --model-dir "$(MODEL_DIR)"

bench-decode: $(STAMP)  ## JPEG draft decoding vs full decode: time per photo and the answers, per model (DECODE_ARGS)
	$(PY) -m benchmarks.decode $(DECODE_ARGS)

soak: $(STAMP)  ## 10,000 requests at concurrency 8 through the app (Locust; 5% bad inputs): errors, p99 per window, worker PSS (MODEL_DIR, SOAK_ARGS)
	$(PY) -m benchmarks.soak --model-dir "$(MODEL_DIR)" --backend $(BACKEND) $(SOAK_ARGS)

sweep: $(STAMP)  ## serving settings by measurement: workers x batch x delay x threads, overload, slowest request (MODEL_DIR)
	$(PY) -m benchmarks.sweep --model-dir "$(MODEL_DIR)" --backend $(BACKEND) $(SWEEP_ARGS)

faults: $(STAMP)  ## SIGKILL workers under load through the app, SIGKILL the server and restart, read-only / full disk (MODEL_DIR)
	$(PY) -m benchmarks.faults --model-dir "$(MODEL_DIR)" --backend $(BACKEND) $(FAULT_ARGS)

app: $(STAMP)  ## the tagging web page on http://127.0.0.1:8000/ (APP_PORT), proxying to the `make serve` TorchServe
	$(PY) -m app.web --port $(APP_PORT)

index: $(STAMP)  ## place index of your geotagged photos in SRC, written to OUT (MODEL_DIR; INDEX_ARGS="--locations f.json")
	$(PY) -m app.index --src "$(SRC)" --out "$(OUT)" --model-dir "$(MODEL_DIR)" $(INDEX_ARGS)

bench-index: $(STAMP)  ## place index cost at 1k / 100k / 1M references: build, query, memory, recall (BENCH_INDEX_ARGS)
	$(PY) -m benchmarks.index $(BENCH_INDEX_ARGS)

exiftool:  ## exiftool into $(TOOLS)/exiftool (apt-get download + dpkg -x, no root): the sidecar tests read back with it
	@[ -x "$(EXIFTOOL_DIR)/usr/bin/exiftool" ] || { mkdir -p "$(EXIFTOOL_DIR)" && cd "$(EXIFTOOL_DIR)" && \
		apt-get download libimage-exiftool-perl && dpkg -x libimage-exiftool-perl_*.deb . && rm -f ./*.deb; }

tag: $(STAMP)  ## location EXIF into copies (or --sidecar XMP) of the photos in SRC, to DST (TAG_ARGS="--local M --index I")
	$(PY) -m app.tag --src "$(SRC)" --dst "$(DST)" $(TAG_ARGS)

image:  ## container image serving MAR as a non-root user, for deploy/k8s (ENGINE, IMAGE; docs/deploy.md)
	@[ -f "$(MAR)" ] || { echo "image: no $(MAR): run make archive first"; exit 1; }
	$(ENGINE) build $(if $(findstring podman,$(ENGINE)),--format docker) -f deploy/Dockerfile \
		--build-arg MAR="$(MAR)" -t $(IMAGE) .  # --format docker: OCI images drop the HEALTHCHECK

tag-distributed: $(STAMP)  ## make tag --local on Ray Data: WORKERS inference actors (MODEL_DIR; RAY_ADDRESS; RAY_ARGS="--gpus-per-worker 1")
	$(PY) -m app.tag_ray --src "$(SRC)" --dst "$(DST)" --model-dir "$(MODEL_DIR)" --workers $(WORKERS) $(RAY_ARGS)

browser-deps:  ## Debian's chromium for the browser tests (apt-get as root) when /usr/bin/chromium is missing
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else echo "browser-deps: not root, chromium not installed: the browser tests will skip"; fi; \
	fi

test: $(STAMP) browser-deps  ## the full test suite (what .ci/run runs)
	-$(MAKE) exiftool  # without it (no apt sources) the sidecar read-back tests skip and say why
	$(PY) -m pytest

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

report: $(STAMP)  ## rewrite README.md's generated tables from the committed results JSON they name (REPORT_ARGS=--check)
	$(PY) -m benchmarks.readme $(REPORT_ARGS)

# the generic recipes train on DATA_DIR (downloaded if missing); a data set's recipe names its own folder
GENERIC = $(filter scratch transfer,$(RECIPE))

demo: $(STAMP)  ## the main job: train + export RECIPE (if not done) -> archive -> serve -> predict
	[ -z "$(GENERIC)" ] || [ -d "$(DATA_DIR)/train" ] || $(MAKE) data
	[ -f "$(MODEL_DIR)/model_meta.json" ] || \
		$(MAKE) train OUT=$(MODEL_DIR) $(if $(GENERIC),DATA_DIR="$(DATA_DIR)")  # rm -r it to retrain
	$(MAKE) archive serve
	@echo "make demo: a test photo the model tags with its landmark and place, and a photo it refuses:"
	@picked="$$($(PY) -m train.demo_photos --model-dir "$(MODEL_DIR)" --unknown $(DEMO_UNKNOWN) -- "$(IMG)")"; \
		readarray -t photos <<< "$$picked"; $(PY) -m handlers.server $(SERVER_ARGS) predict "$${photos[@]}"
	@echo "TorchServe is running: make app for the web page, make stop to stop it"

clean:  ## remove built archives and server state (keeps .venv, data/ and artifacts/)
	rm -rf $(MODEL_STORE)/*.mar logs
