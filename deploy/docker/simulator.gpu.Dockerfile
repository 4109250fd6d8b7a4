# syntax=docker/dockerfile:1.7
# searchrl SimulatedSearchService (ZeroSearch) on vLLM (GPU image). Build from the repository root:
#   docker build -f deploy/docker/simulator.gpu.Dockerfile -t searchrl/simulator:0.1.0-gpu .
#   docker build -f deploy/docker/simulator.gpu.Dockerfile --target smoke -t searchrl/simulator:0.1.0-gpu-smoke .
# Every package comes from deploy/docker/locks/simulator-gpu.lock (vllm 0.33.0 and all it pins, torch 2.14.0 included,
# with the sha256 of each file; deploy/docker/lock.py), then searchrl itself with --no-deps. Python 3.12 comes from
# uv's managed builds, so no stage needs apt.
# Node requirement: PyPI's torch wheels are CUDA 13.0 builds, which need an NVIDIA driver >= 580 (the base image's
# NVIDIA_REQUIRE_CUDA makes the NVIDIA container runtime refuse an older driver at start).
# The runtime stage is the -devel image: Triton (vLLM) and FlashInfer compile kernels at first use with its C compiler and nvcc.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${CUDA_IMAGE} AS builder
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install 3.12.16 && uv venv --python 3.12.16 /opt/venv
COPY deploy/docker/locks/simulator-gpu.lock /tmp/locks/
# --build-constraints/--require-build-hashes: a package built from its sdist here builds with the lock's hashed
# setuptools and wheel, not with unpinned build tools.
RUN uv pip sync --require-hashes --build-constraints /tmp/locks/simulator-gpu.lock --require-build-hashes /tmp/locks/simulator-gpu.lock
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
LABEL org.opencontainers.image.title="searchrl-simulator" \
      org.opencontainers.image.description="searchrl SimulatedSearchService (ZeroSearch) on vLLM (GPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Read-only root: every cache that Triton, FlashInfer, the CUDA driver and XDG-aware libraries write goes under /tmp,
# which the chart mounts as an emptyDir. DL3064 is a false positive: it flags TOKEN in TOKENIZERS_PARALLELISM.
# hadolint ignore=DL3064
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/hf SEARCHRL_CACHE_DIR=/tmp/searchrl-cache \
    SEARCHRL_HOST=0.0.0.0 SEARCHRL_GRPC_PORT=50053 SEARCHRL_METRICS_PORT=9093 \
    TRITON_HOME=/tmp TRITON_CACHE_DIR=/tmp/triton XDG_CACHE_HOME=/tmp/.cache XDG_CONFIG_HOME=/tmp/.config \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache FLASHINFER_WORKSPACE_BASE=/tmp
RUN groupadd --system --gid 10001 searchrl && useradd --system --uid 10001 --gid 10001 --home-dir /home/searchrl --create-home searchrl
# Fail the build, not the first request, when the base lacks the compilers that Triton and FlashInfer call.
RUN command -v cc && command -v nvcc
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/searchrl-healthcheck
USER 10001:10001
WORKDIR /home/searchrl
EXPOSE 50053 9093
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["python", "/usr/local/bin/searchrl-healthcheck"]
ENTRYPOINT ["searchrl", "serve", "simulator"]
CMD ["--engine", "vllm"]

# `--target smoke`: the runtime image plus pytest and the test model/data packages (simulator-gpu-smoke.lock, hashed,
# --no-deps: resolved against the runtime lock) and the tests/ and scripts/ folders, for scripts/gpu_smoke.sh.
FROM runtime AS smoke
USER 0:0
COPY deploy/docker/locks/simulator-gpu-smoke.lock /tmp/locks/
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    UV_NO_CACHE=1 UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 uv pip install --require-hashes --no-deps -r /tmp/locks/simulator-gpu-smoke.lock \
 && rm -r /tmp/locks
WORKDIR /app
COPY pyproject.toml ./
COPY tests tests
COPY scripts scripts
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["bash", "scripts/gpu_smoke.sh", "--help"]

# The default target: the runtime image.
FROM runtime
