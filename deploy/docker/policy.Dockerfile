# syntax=docker/dockerfile:1.7
# searchrl PolicyService: ReSearch agent-loop rollouts of the policy model (CPU image). Build from the repository root:
#   docker build -f deploy/docker/policy.Dockerfile -t searchrl/policy:0.1.0 .
# Every package comes from deploy/docker/locks/policy.lock, with the sha256 of each file (deploy/docker/lock.py: the
# versions CI tested, from constraints.txt; torch is the PyTorch CPU build, pinned by URL and sha256, because PyPI's Linux
# torch wheel is the CUDA build), then searchrl itself with --no-deps.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.14-slim-bookworm AS builder
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv
COPY deploy/docker/locks/policy.lock /tmp/locks/
# --build-constraints/--require-build-hashes: a package built from its sdist here builds with the lock's hashed
# setuptools and wheel, not with unpinned build tools.
RUN uv pip sync --require-hashes --build-constraints /tmp/locks/policy.lock --require-build-hashes /tmp/locks/policy.lock
COPY pyproject.toml README.md ./
COPY searchrl searchrl
COPY services services
COPY retriever retriever
COPY simulator simulator
COPY trainer trainer
COPY evaluator evaluator
RUN uv pip install --no-deps --no-build-isolation .
# The embedded SmolLM2-135M-Instruct GGUF is de-quantised once here, so a read-only container starts in seconds.
RUN mkdir -p /opt/searchrl/cache \
 && SEARCHRL_CACHE_DIR=/opt/searchrl/cache HF_HUB_OFFLINE=1 python -c "from searchrl.assets import policy_model_path; print(policy_model_path())"

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="searchrl-policy" \
      org.opencontainers.image.description="searchrl PolicyService: ReSearch agent-loop rollouts of the policy model (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# DL3064 is a false positive here: it flags the word TOKEN in TOKENIZERS_PARALLELISM, which holds no secret.
# hadolint ignore=DL3064
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/hf \
    SEARCHRL_CACHE_DIR=/opt/searchrl/cache SEARCHRL_HOST=0.0.0.0 SEARCHRL_GRPC_PORT=50054 SEARCHRL_METRICS_PORT=9094
RUN groupadd --system --gid 10001 searchrl && useradd --system --uid 10001 --gid 10001 --home-dir /home/searchrl --create-home searchrl
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/searchrl /opt/searchrl
COPY deploy/docker/healthcheck.py /usr/local/bin/searchrl-healthcheck
USER 10001:10001
WORKDIR /home/searchrl
EXPOSE 50054 9094
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/usr/local/bin/searchrl-healthcheck"]
ENTRYPOINT ["searchrl", "serve", "policy"]
CMD ["--engine", "transformers"]
