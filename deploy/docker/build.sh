#!/usr/bin/env bash
# Builds the searchrl container images (`make images`): one per service, CPU and GPU variants.
#
#   deploy/docker/build.sh [--gpu|--cpu-only] [--smoke] [--test] [--push] [--only NAME[,NAME]] [--registry REG] [--tag TAG] [--dry-run]
#
# Images: REG/searchrl-<name>:TAG (CPU) and REG/searchrl-<name>:TAG-gpu (GPU) for name in reward, retriever, simulator,
# policy, trainer (reward has no GPU variant). These are the names the Helm chart's values use by default.
# --smoke also builds each GPU image's `smoke` target as REG/searchrl-<name>:TAG-gpu-smoke (pytest and the test
# model/data packages on top of the runtime image, for scripts/gpu_smoke.sh). --test runs deploy/docker/image_check.py
# in every image built, as the chart runs it (read-only root, user 10001, /tmp and ~/.cache writable; no GPU needed).
# Environment: REGISTRY (default ghcr.io/searchrl), TAG (default: the version in pyproject.toml), DOCKER (default
# docker; podman works), PLATFORM (e.g. linux/amd64), BUILD_ARGS (extra flags for `docker build`).
set -euo pipefail
cd "$(dirname "$0")/../.."

REGISTRY="${REGISTRY:-ghcr.io/searchrl}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}"
DOCKER="${DOCKER:-docker}"
VARIANTS="cpu gpu"
ONLY=""
PUSH=0
DRY=0
SMOKE=0
TEST=0

usage() { sed -n '2,/^set /p' "$0" | sed -n '/^#/p' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) VARIANTS="gpu" ;;
    --cpu-only) VARIANTS="cpu" ;;
    --push) PUSH=1 ;;
    --smoke) SMOKE=1 ;;
    --test) TEST=1 ;;
    --only) ONLY="${2:?--only needs a name}"; shift ;;
    --registry) REGISTRY="${2:?}"; shift ;;
    --tag) TAG="${2:?}"; shift ;;
    --dry-run) DRY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown flag $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[ -n "$TAG" ] || { echo "could not read the version from pyproject.toml; pass --tag" >&2; exit 2; }

run() {
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}

if [ "$DRY" = 0 ] && ! "$DOCKER" info >/dev/null 2>&1; then
  echo "error: no container engine answers ('$DOCKER info' failed); start Docker or set DOCKER=podman" >&2
  exit 1
fi

# What image_check.py verifies in each image: the modules that must import, and --compiler for the images whose
# engines compile kernels at run time (Triton, FlashInfer) with the -devel base's C compiler and nvcc.
check_args() { # NAME VARIANT
  case "$1:$2" in
    reward:*) echo "grpc" ;;
    retriever:cpu) echo "torch faiss sentence_transformers" ;;
    retriever:gpu) echo "torch faiss sentence_transformers" ;;
    simulator:cpu | policy:cpu) echo "torch transformers" ;;
    simulator:gpu) echo "--compiler vllm" ;;
    policy:gpu) echo "--compiler sglang" ;;
    trainer:cpu) echo "verl ray mlflow" ;;
    trainer:gpu) echo "--compiler verl vllm ray flash_attn" ;;
  esac
}

image_test() { # REF NAME VARIANT
  # shellcheck disable=SC2046 # check_args is a list of words
  run "$DOCKER" run --rm --read-only --user 10001:10001 --tmpfs /tmp --tmpfs /home/searchrl/.cache \
    -v "$PWD/deploy/docker/image_check.py:/image_check.py:ro" --entrypoint python "$1" /image_check.py $(check_args "$2" "$3")
}

built=()
for name in reward retriever simulator policy trainer; do
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  for variant in $VARIANTS; do
    if [ "$variant" = gpu ]; then
      file="deploy/docker/$name.gpu.Dockerfile"
      ref="$REGISTRY/searchrl-$name:$TAG-gpu"
    else
      file="deploy/docker/$name.Dockerfile"
      ref="$REGISTRY/searchrl-$name:$TAG"
    fi
    [ -f "$file" ] || continue # reward has no GPU variant
    targets=("$ref")
    [ "$SMOKE" = 0 ] || [ "$variant" != gpu ] || targets+=("$ref-smoke")
    for target_ref in "${targets[@]}"; do
      target=()
      [ "$target_ref" = "$ref" ] || target=(--target smoke)
      # shellcheck disable=SC2086 # BUILD_ARGS is a list of flags
      run "$DOCKER" build ${PLATFORM:+--platform "$PLATFORM"} ${BUILD_ARGS:-} "${target[@]}" \
        --label "org.opencontainers.image.version=$TAG" \
        --label "org.opencontainers.image.revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        -f "$file" -t "$target_ref" .
      [ "$TEST" = 0 ] || image_test "$target_ref" "$name" "$variant"
      [ "$PUSH" = 0 ] || run "$DOCKER" push "$target_ref"
      built+=("$target_ref")
    done
  done
done
[ "${#built[@]}" -gt 0 ] || { echo "no image matched --only $ONLY" >&2; exit 2; }
printf 'built %s\n' "${built[@]}"
