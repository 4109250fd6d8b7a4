# syntax=docker/dockerfile:1.7
# searchrl RetrievalService: FAISS dense retrieval over gRPC and the Search-R1 HTTP /retrieve (CPU image). Build from the repository root:
#   docker build -f deploy/docker/retriever.Dockerfile -t searchrl/retriever:0.1.0 .
# Every package comes from deploy/docker/locks/retriever.lock, with the sha256 of each file (deploy/docker/lock.py: the
# versions CI tested, from constraints.txt; torch is the PyTorch CPU build, pinned by URL and sha256, because PyPI's Linux
# torch wheel is the CUDA build), then searchrl itself with --no-deps.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.14-slim-bookworm AS builder
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv
COPY deploy/docker/locks/retriever.lock /tmp/locks/
# --build-constraints/--require-build-hashes: a package built from its sdist here builds with the lock's hashed
# setuptools and wheel, not with unpinned build tools.
RUN uv pip sync --require-hashes --build-constraints /tmp/locks/retriever.lock --require-build-hashes /tmp/locks/retriever.lock
COPY pyproject.toml README.md ./
COPY searchrl searchrl
COPY services services
COPY retriever retriever
COPY simulator simulator
COPY trainer trainer
COPY evaluator evaluator
RUN uv pip install --no-deps --no-build-isolation . \
 && mkdir -p /opt/searchrl/cache

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="searchrl-retriever" \
      org.opencontainers.image.description="searchrl RetrievalService: FAISS dense retrieval over gRPC and the Search-R1 HTTP /retrieve (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# DL3064 is a false positive here: it flags the word TOKEN in TOKENIZERS_PARALLELISM, which holds no secret.
# hadolint ignore=DL3064
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HOME=/tmp/hf \
    SEARCHRL_CACHE_DIR=/opt/searchrl/cache SEARCHRL_HOST=0.0.0.0 SEARCHRL_GRPC_PORT=50052 SEARCHRL_METRICS_PORT=9092
RUN groupadd --system --gid 10001 searchrl && useradd --system --uid 10001 --gid 10001 --home-dir /home/searchrl --create-home searchrl
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/searchrl /opt/searchrl
COPY deploy/docker/healthcheck.py /usr/local/bin/searchrl-healthcheck
USER 10001:10001
WORKDIR /home/searchrl
EXPOSE 50052 9092 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/usr/local/bin/searchrl-healthcheck"]
# The index comes from a volume: docker run -v idx:/index searchrl/retriever:0.1.0 --index-dir /index/wiki
ENTRYPOINT ["searchrl", "serve", "retriever"]
