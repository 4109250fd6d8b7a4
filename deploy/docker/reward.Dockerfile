# syntax=docker/dockerfile:1.7
# searchrl RewardService (CPU; the reward library needs no model). Build from the repository root:
#   docker build -f deploy/docker/reward.Dockerfile -t searchrl/reward:0.1.0 .
# Every package comes from deploy/docker/locks/reward.lock, with the sha256 of each file (deploy/docker/lock.py: the
# versions CI tested, from constraints.txt), then searchrl itself with --no-deps.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.14-slim-bookworm AS builder
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv
COPY deploy/docker/locks/reward.lock /tmp/locks/
# --build-constraints/--require-build-hashes: a package built from its sdist here builds with the lock's hashed
# setuptools and wheel, not with unpinned build tools.
RUN uv pip sync --require-hashes --build-constraints /tmp/locks/reward.lock --require-build-hashes /tmp/locks/reward.lock
COPY pyproject.toml README.md ./
COPY searchrl searchrl
COPY services services
COPY retriever retriever
COPY simulator simulator
COPY trainer trainer
COPY evaluator evaluator
RUN uv pip install --no-deps --no-build-isolation .

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="searchrl-reward" \
      org.opencontainers.image.description="searchrl RewardService: F1 + ReSearch format rules over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SEARCHRL_HOST=0.0.0.0 SEARCHRL_GRPC_PORT=50051 SEARCHRL_METRICS_PORT=9091
RUN groupadd --system --gid 10001 searchrl && useradd --system --uid 10001 --gid 10001 --home-dir /home/searchrl --create-home searchrl
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/searchrl-healthcheck
USER 10001:10001
WORKDIR /home/searchrl
EXPOSE 50051 9091
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["python", "/usr/local/bin/searchrl-healthcheck"]
ENTRYPOINT ["searchrl", "serve", "reward"]
