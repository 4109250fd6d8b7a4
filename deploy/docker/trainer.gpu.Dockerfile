# syntax=docker/dockerfile:1.7
# searchrl trainer: verl GRPO on Ray with vLLM rollouts (RayJob head and workers) (GPU image). Build from the repository root:
#   docker build -f deploy/docker/trainer.gpu.Dockerfile -t searchrl/trainer:0.1.0-gpu .
#   docker build -f deploy/docker/trainer.gpu.Dockerfile --target smoke -t searchrl/trainer:0.1.0-gpu-smoke .
# Every package comes from deploy/docker/locks/trainer-gpu.lock (with the sha256 of each file; deploy/docker/lock.py):
# verl[vllm,fsdp]==0.9.1 and ray[default]==2.60.0, which give vLLM 0.24.0, torch 2.11.0 and transformers 5.9.0 (verl's
# [sglang] extra cannot resolve: it pins transformers 5.9.0 and sglang 0.5.12, which pins transformers 5.6.0), then
# flash-attn built from its hashed sdist (below), then searchrl itself with --no-deps. Python 3.12 comes from uv's
# managed builds, so no stage needs apt.
# Node requirement: torch 2.11.0 (and verl's cupy-cuda13x) are CUDA 13.0 builds and need an NVIDIA driver >= 580 (the
# base image's NVIDIA_REQUIRE_CUDA makes the NVIDIA container runtime refuse an older driver at start). Both stages use
# the -devel image: nvcc builds flash-attn here, and Triton/FlashInfer compile kernels at run time with its compilers.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${CUDA_IMAGE} AS builder
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.12.16 && uv venv --python 3.12.16 /opt/venv
COPY deploy/docker/locks/trainer-gpu.lock deploy/docker/locks/trainer-gpu-flash-attn.lock /tmp/locks/
# --build-constraints/--require-build-hashes: a package built from its sdist here builds with the lock's hashed
# setuptools and wheel, not with unpinned build tools.
RUN uv pip sync --require-hashes --build-constraints /tmp/locks/trainer-gpu.lock --require-build-hashes /tmp/locks/trainer-gpu.lock
# flash-attn 2.8.3 (verl[fsdp]) has no wheel on PyPI: build its sdist, pinned by sha256, against the locked torch
# (--no-build-isolation; ninja, packaging, psutil, setuptools and wheel come from the lock). FLASH_ATTENTION_FORCE_BUILD
# keeps setup.py from downloading an unpinned prebuilt wheel. FLASH_ATTN_CUDA_ARCHS: 80 = A100, 90 = H100/H200 (add
# 100;120 for Blackwell); each nvcc job needs up to ~9 GB of memory, so size MAX_JOBS to the build machine.
ARG FLASH_ATTN_CUDA_ARCHS="80;90"
ARG MAX_JOBS=4
RUN FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS}" MAX_JOBS="${MAX_JOBS}" \
    uv pip install --require-hashes --no-deps --no-build-isolation -r /tmp/locks/trainer-gpu-flash-attn.lock
WORKDIR /src
COPY pyproject.toml README.md ./
COPY searchrl searchrl
COPY services services
COPY retriever retriever
COPY simulator simulator
COPY trainer trainer
COPY evaluator evaluator
RUN uv pip install --no-deps --no-build-isolation .

FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="searchrl-trainer" \
      org.opencontainers.image.description="searchrl trainer: verl GRPO on Ray with vLLM rollouts (RayJob head and workers) (GPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Every cache that Triton, FlashInfer, CuPy, the CUDA driver and XDG-aware libraries (vLLM, matplotlib) write goes
# under /tmp, so the image also runs with a read-only root and /tmp mounted. DL3064 is a false positive: it flags
# TOKEN in TOKENIZERS_PARALLELISM.
# hadolint ignore=DL3064
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/hf SEARCHRL_CACHE_DIR=/tmp/searchrl-cache \
    SEARCHRL_HOST=0.0.0.0 SEARCHRL_METRICS_PORT=9095 \
    TRITON_HOME=/tmp TRITON_CACHE_DIR=/tmp/triton XDG_CACHE_HOME=/tmp/.cache XDG_CONFIG_HOME=/tmp/.config \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache FLASHINFER_WORKSPACE_BASE=/tmp CUPY_CACHE_DIR=/tmp/.cupy
RUN groupadd --system --gid 10001 searchrl && useradd --system --uid 10001 --gid 10001 --home-dir /home/searchrl --create-home searchrl
# Fail the build, not the first rollout, when the base lacks the compilers that Triton and FlashInfer call.
RUN command -v cc && command -v nvcc
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/searchrl-healthcheck
USER 10001:10001
WORKDIR /home/searchrl
EXPOSE 6379 8265 10001 9095
# Ray head/worker image of the RayJob: KubeRay sets the command; no gRPC server, so no HEALTHCHECK.
COPY trainer/searchrl/trainer/config /app/trainer/config
ENTRYPOINT []
CMD ["python3", "-m", "verl.trainer.main_ppo", "--help"]

# `--target smoke`: the runtime image plus pytest, the test model/data packages and faiss-cpu + sentence-transformers
# (gpu_smoke.sh's verl stage serves a small retriever next to the trainer) from trainer-gpu-smoke.lock (hashed,
# --no-deps: resolved against the runtime lock), and the tests/ and scripts/ folders, for scripts/gpu_smoke.sh.
FROM runtime AS smoke
USER 0:0
COPY deploy/docker/locks/trainer-gpu-smoke.lock /tmp/locks/
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    UV_NO_CACHE=1 UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 uv pip install --require-hashes --no-deps -r /tmp/locks/trainer-gpu-smoke.lock \
 && rm -r /tmp/locks
WORKDIR /app
COPY pyproject.toml ./
COPY tests tests
COPY scripts scripts
USER 10001:10001
CMD ["bash", "scripts/gpu_smoke.sh", "--help"]

# The default target: the runtime image.
FROM runtime
