#!/usr/bin/env bash
# GKE GPU node pool for searchrl that scales to zero (cluster autoscaler): nodes labelled searchrl.io/pool=gpu and
# tainted nvidia.com/gpu (GKE adds that taint to GPU nodes itself; the chart's GPU pods and RayJob workers tolerate it).
# GKE installs the NVIDIA driver (gpu-driver-version=latest) and exposes nvidia.com/gpu.
#
# Pools: a100 (default; a2-highgpu-2g, 2 x A100 40 GB: the ci/gpu-values.yaml simulator, Qwen2.5-14B over TP=2,
# selects GPUs with >= 40 GB), h100 (a3-highgpu-8g, 8 x H100 80 GB: the 8-GPU RayJob overlays), l4 (g2-standard-24,
# 2 x L4 24 GB: the policy, the retriever and the 1-GPU RayJobs; too small for the 14B simulator).
#
# usage: CLUSTER=my-cluster REGION=us-central1 deploy/k8s/nodepools/gke-gpu-nodepool.sh [a100|h100|l4]
set -euo pipefail
CLUSTER="${CLUSTER:?set CLUSTER}"
REGION="${REGION:?set REGION}"
POOL="${1:-a100}"
case "$POOL" in
  a100) MACHINE=a2-highgpu-2g; ACCEL="type=nvidia-tesla-a100,count=2,gpu-driver-version=latest" ;;
  h100) MACHINE=a3-highgpu-8g; ACCEL="type=nvidia-h100-80gb,count=8,gpu-driver-version=latest" ;;
  l4) MACHINE=g2-standard-24; ACCEL="type=nvidia-l4,count=2,gpu-driver-version=latest" ;;
  *) echo "usage: $0 [a100|h100|l4]" >&2; exit 2 ;;
esac
gcloud container node-pools create "searchrl-gpu-$POOL" \
  --cluster "$CLUSTER" --region "$REGION" \
  --machine-type "$MACHINE" --accelerator "$ACCEL" \
  --enable-autoscaling --min-nodes 0 --max-nodes 4 --num-nodes 0 \
  --node-labels searchrl.io/pool=gpu \
  --disk-type pd-ssd --disk-size 500 \
  --enable-image-streaming
