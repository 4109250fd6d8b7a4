"""The RayJob presets in deploy/k8s: kustomize overlays, GPU arithmetic, the entrypoint and its Hydra overrides, and
the kustomize components that adapt them to another release (name, Secrets, registry).

The entrypoint overrides are composed with the trainer's Hydra config exactly as ``python3 -m
searchrl.trainer.rayjob_entrypoint --config-name=...`` does (verl's struct config rejects a key that does not exist),
so a typo in a manifest fails here, not on a GPU cluster. The entrypoint's own pre-flight check run from another
working directory is offline check C1 (test_offline_checks.py).
"""

from __future__ import annotations

import shlex

import pytest
import yaml

PRESETS = {
    "research-small": "research",
    "zerosearch-small": "zerosearch",
    "research-8gpu": "overlays/research-8gpu",
    "zerosearch-8gpu": "overlays/zerosearch-8gpu",
}
ENTRYPOINT = ["python3", "-m", "searchrl.trainer.rayjob_entrypoint"]


@pytest.fixture(scope="module")
def rayjobs(kustomize) -> dict[str, dict]:
    out = {}
    for name, folder in PRESETS.items():
        (doc,) = kustomize(folder)
        out[name] = doc
    return out


def entry(job: dict) -> tuple[str, list[str]]:
    """``(config name, Hydra overrides)`` of a RayJob's entrypoint."""
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ENTRYPOINT, f"the RayJob runs {words[:3]}, not the pre-flight entrypoint"
    assert not any(w.startswith("--config-path") for w in words), "the entrypoint finds its own config directory"
    config = next(w.split("=", 1)[1] for w in words if w.startswith("--config-name="))
    return config, [w for w in words[3:] if not w.startswith("--")]


def pod_templates(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_presets_pick_the_right_method_and_backend(rayjobs):
    for name, job in rayjobs.items():
        config, overrides = entry(job)
        method = name.split("-")[0]
        assert config == f"{method}_grpo"
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
        backend = "retriever" if method == "research" else "simulator"
        assert env["SEARCHRL_SEARCH_BACKEND"] == backend
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        assert head["metadata"]["labels"]["searchrl.io/search-backend"] == backend
        assert job["metadata"]["labels"]["searchrl.io/preset"] == name
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["submissionMode"] == "K8sJobMode"
        assert job["spec"]["backoffLimit"] >= 0 and job["spec"]["activeDeadlineSeconds"] > 0
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
        kv = dict(o.split("=", 1) for o in overrides)
        assert kv["trainer.default_local_dir"].startswith("/checkpoints/runs/" + name)
        assert kv["data.train_files"] == f"/checkpoints/data/{name}/train.parquet"
        # verl's MLflow logger uses trainer.project_name as the experiment (MLFLOW_EXPERIMENT_NAME is ignored).
        assert kv["trainer.project_name"] == f"searchrl-{method}"
        assert "MLFLOW_EXPERIMENT_NAME" not in env
        init = head["spec"]["initContainers"][0]
        assert f"--out /checkpoints/data/{name}" in init["args"][0], "data prep writes what the entrypoint reads"


def test_a_stuck_cluster_fails_early(rayjobs):
    """#24: a failing prepare-data step (or an unschedulable worker) fails the job within the pre-running deadline
    instead of holding the GPU worker until activeDeadlineSeconds (up to 7 days)."""
    for name, job in rayjobs.items():
        assert 0 < job["spec"]["preRunningDeadlineSeconds"] <= 3600, name
        assert job["spec"]["preRunningDeadlineSeconds"] < job["spec"]["activeDeadlineSeconds"], name


def test_gpu_counts_agree_with_the_trainer_settings(rayjobs):
    for name, job in rayjobs.items():
        _config, overrides = entry(job)
        kv = dict(o.split("=", 1) for o in overrides)
        workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        total = sum(
            int(w["replicas"]) * int(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for w in workers
        )
        assert int(kv["trainer.nnodes"]) * int(kv["trainer.n_gpus_per_node"]) == total, name
        tp = int(kv["actor_rollout_ref.rollout.tensor_model_parallel_size"])
        assert int(kv["trainer.n_gpus_per_node"]) % tp == 0, name
        assert (total == 8) == name.endswith("8gpu")


def test_8gpu_workers_select_a100_or_h100_class_machines(rayjobs):
    """#37: without an instance-family selector Karpenter's cheapest fit for 8 GPUs + 800 Gi is 8 x L40S (PCIe)."""
    for name in ("research-8gpu", "zerosearch-8gpu"):
        worker = rayjobs[name]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        terms = worker["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        by_key = {e["key"]: e for t in terms for e in t["matchExpressions"]}
        families = set(by_key["karpenter.k8s.aws/instance-family"]["values"])
        assert families and families <= {"p4d", "p4de", "p5", "p5e", "p5en"}, families
        assert not families & {"g5", "g6e"}
        assert all(v.startswith("nvidia-") for v in by_key["cloud.google.com/gke-accelerator"]["values"])


def test_head_shared_memory_holds_rays_object_store(rayjobs):
    """#33: Ray's object store defaults to 30% of the head's memory limit and lives in /dev/shm."""

    def gib(q: str) -> float:
        return float(q.removesuffix("Gi"))

    for name, job in rayjobs.items():
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        shm = next(v for v in head["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        limit = head["containers"][0]["resources"]["limits"]["memory"]
        assert gib(shm) >= 0.3 * gib(limit), (name, shm, limit)


def test_submitter_uses_a_slim_ray_image(rayjobs):
    """#38: KubeRay's default submitter runs the head's image (the multi-GB CUDA trainer) just for `ray job submit`."""
    for job in rayjobs.values():
        (c,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
        ray_version = job["spec"]["rayClusterSpec"]["rayVersion"]
        assert c["image"].startswith(f"rayproject/ray:{ray_version}-") and c["image"].endswith("-cpu"), c["image"]
        assert not c.get("command"), "KubeRay fills in the ray job submit command only when none is set"
        assert job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_images_can_be_retargeted_with_kustomize(kustomize):
    """#34: an `images:` entry (kustomize edit set image) reaches every trainer container of the RayJob."""
    (job,) = kustomize("overlays/example-release")
    images = [
        c["image"] for t in pod_templates(job) for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])
    ]
    assert images and all(i == "registry.example.com/ml/searchrl-trainer:0.1.0-gpu" for i in images), images


@pytest.mark.parametrize("name", list(PRESETS))
def test_entrypoint_overrides_compose_with_the_trainer_config(rayjobs, name):
    config, overrides = entry(rayjobs[name])
    pytest.importorskip("verl")
    from omegaconf import OmegaConf

    from searchrl.trainer.rayjob_entrypoint import compose

    cfg = compose(config, overrides)
    for item in overrides:
        key, value = item.split("=", 1)
        assert str(OmegaConf.select(cfg, key)) == value, key
    assert cfg.algorithm.adv_estimator == "grpo"
