"""Assertions on the Helm chart's rendered objects (what helm-unittest suites do, over real ``helm template`` output).

helm-unittest is a helm plugin with no package in the registries this project can use, so these tests render the chart
with the real helm binary and assert on the objects with pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"reward": 50051, "retriever": 50052, "simulator": 50053, "policy": 50054}
CI_VALUES = ["cpu-only-values.yaml", "gpu-values.yaml", "external-redis-values.yaml", "async-rollouts-values.yaml"]
REQUIRED_ALERTS = {
    "SearchRLTargetDown",
    "SearchRLServiceNotServing",
    "SearchRLHighP99Latency",
    "SearchRLHighErrorRate",
    "SearchRLLowCacheHitRatio",
    "SearchRLRewardCollapse",
    "SearchRLNoSearches",
    "SearchRLKLExplosion",
}


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = find(objs, kind, name)
    assert len(hits) == 1, f"expected one {kind}/{name}, found {[o['metadata']['name'] for o in find(objs, kind)]}"
    return hits[0]


def pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]


# ------------------------------------------------------------------------------------------------ every pod


@pytest.mark.parametrize("values", [(), *[(v,) for v in CI_VALUES]], ids=["default", *CI_VALUES])
def test_every_pod_is_locked_down(render, values):
    objs = render(*values)
    assert workloads(objs)
    for w in workloads(objs):
        spec = pod(w)
        name = f"{w['kind']}/{w['metadata']['name']}"
        assert spec["enableServiceLinks"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"
            assert "resources" in c and c["resources"].get("limits", {}).get("memory"), f"{name}/{c['name']}"


def test_no_secret_value_is_rendered_in_plain_text(render):
    objs = render("gpu-values.yaml") + render("external-redis-values.yaml") + render()
    for w in workloads(objs):
        for c in pod(w)["containers"]:
            env = env_of(c)
            for key, value in env.items():
                if ("PASSWORD" in key or "TOKEN" in key) and not key.endswith("_FILE"):
                    assert isinstance(value, dict) and "secretKeyRef" in value, f"{key} of {c['name']} is plain text"
            assert "requirepass" not in " ".join(c.get("command", [])), "password on a command line"
            if "SEARCHRL_REDIS_URL" in env:
                # #35: the password reaches the services as SEARCHRL_REDIS_PASSWORD (redis_password), never inside
                # the URL: unescaped URL-reserved characters would break it, and the services log the URL.
                url = env["SEARCHRL_REDIS_URL"]
                assert "@" not in url and "$(" not in url, url
                if "SEARCHRL_REDIS_PASSWORD" in env:
                    assert "secretKeyRef" in env["SEARCHRL_REDIS_PASSWORD"]


# ------------------------------------------------------------------------------------------------ services


def test_each_service_has_deployment_headless_service_and_grpc_probes(render):
    objs = render()
    for svc, port in SERVICES.items():
        dep = one(objs, "Deployment", f"searchrl-{svc}")
        c = pod(dep)["containers"][0]
        env = env_of(c)
        assert env["SEARCHRL_HOST"] == "0.0.0.0"
        assert env["SEARCHRL_GRPC_PORT"] == str(port)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, f"{svc} {probe}"
        assert c["image"] == f"ghcr.io/searchrl/searchrl-{svc}:0.1.0"
        service = one(objs, "Service", f"searchrl-{svc}")
        assert service["spec"]["clusterIP"] == "None", "gRPC needs a headless Service for per-call balancing"
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == port
        assert dep["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        pdb = one(objs, "PodDisruptionBudget", f"searchrl-{svc}")
        assert pdb["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        sm = one(objs, "ServiceMonitor", f"searchrl-{svc}")
        assert sm["spec"]["endpoints"][0]["port"] == "metrics"
        assert sm["spec"]["endpoints"][0]["honorLabels"] is True
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_cpu_services_autoscale_on_cpu(render):
    objs = render()
    hpa = one(objs, "HorizontalPodAutoscaler", "searchrl-reward")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(objs, "Deployment", "searchrl-reward")["spec"], "HPA owns replicas"
    assert not find(objs, "ScaledObject")
    # The default index volume is ReadWriteOnce: one retriever, replaced without a surge pod (#11).
    retriever = one(objs, "Deployment", "searchrl-retriever")
    assert retriever["spec"]["replicas"] == 1 and not find(objs, "HorizontalPodAutoscaler", "searchrl-retriever")
    assert retriever["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_gpu_values_request_gpus_and_target_the_gpu_pool(render):
    objs = render("gpu-values.yaml")
    for svc, count in (("simulator", 2), ("policy", 1), ("retriever", 1)):
        dep = one(objs, "Deployment", f"searchrl-{svc}")
        spec = pod(dep)
        c = spec["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == count
        assert c["image"].endswith(":0.1.0-gpu")
        assert spec["nodeSelector"] == {"searchrl.io/pool": "gpu"}
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    sim = pod(one(objs, "Deployment", "searchrl-simulator"))["containers"][0]
    assert "--engine=vllm" in sim["args"] and "--model=Qwen/Qwen2.5-14B-Instruct" in sim["args"]
    # #5: vLLM shards the model over every GPU of the pod, merged with simulator.vllmKwargs.
    (kw,) = [a.split("=", 1)[1] for a in sim["args"] if a.startswith("--vllm-kwargs=")]
    assert json.loads(kw) == {"max_model_len": 32768, "tensor_parallel_size": 2}
    # GPU services scale with KEDA on in-flight requests (#20: no prometheus-adapter needed), never on CPU.
    for svc in ("retriever", "simulator", "policy"):
        assert not find(objs, "HorizontalPodAutoscaler", f"searchrl-{svc}")
        so = one(objs, "ScaledObject", f"searchrl-{svc}")
        query = so["spec"]["triggers"][0]["metadata"]["query"]
        assert f'searchrl_grpc_in_flight_requests{{namespace="searchrl", service="{svc}"}}' in query
    so = one(objs, "ScaledObject", "searchrl-simulator")
    assert so["spec"]["minReplicaCount"] == 0
    assert so["spec"]["triggers"][1] == {
        "type": "kubernetes-workload",
        "metadata": {"podSelector": "searchrl.io/search-backend in (simulator,mixed)", "value": "1"},
    }
    # #21: most clusters run one KubeRay operator already; gpu-values does not add a second.
    assert not find(objs, "Deployment", "searchrl-kuberay-operator")


def test_tls_switches_probes_to_the_tls_health_check(render):
    objs = render("gpu-values.yaml")
    c = pod(one(objs, "Deployment", "searchrl-reward"))["containers"][0]
    env = env_of(c)
    assert env["SEARCHRL_TLS_CERT_FILE"] == "/etc/searchrl/tls/tls.crt"
    assert c["readinessProbe"]["exec"]["command"][:3] == ["python", "/usr/local/bin/searchrl-healthcheck", "--tls"]
    assert "grpc" not in c["readinessProbe"]
    vols = {v["name"]: v for v in pod(one(objs, "Deployment", "searchrl-reward"))["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "searchrl-tls"
    # auth on without existingSecret: the chart generates the token Secret and mounts it as a file.
    secret = one(objs, "Secret", "searchrl-auth")
    assert len(secret["data"]["token"]) > 40
    assert env["SEARCHRL_AUTH_TOKEN_FILE"] == "/etc/searchrl/auth/token"
    assert vols["auth"]["secret"]["secretName"] == "searchrl-auth"


def test_existing_secrets_are_used_and_not_generated(render):
    objs = render(global__auth={"enabled": True, "existingSecret": "team-token", "existingSecretKey": "tok"})
    assert not find(objs, "Secret", "searchrl-auth")
    vol = {v["name"]: v for v in pod(one(objs, "Deployment", "searchrl-policy"))["volumes"]}["auth"]
    assert vol["secret"]["secretName"] == "team-token"
    assert vol["secret"]["items"] == [{"key": "tok", "path": "token"}]
    objs = render(redis={"auth": {"existingSecret": "my-redis"}})
    assert not find(objs, "Secret", "searchrl-redis")
    c = pod(one(objs, "Deployment", "searchrl-retriever"))["containers"][0]
    assert env_of(c)["SEARCHRL_REDIS_PASSWORD"]["secretKeyRef"]["name"] == "my-redis"


def test_external_redis_and_mlflow(render):
    objs = render("external-redis-values.yaml")
    assert not find(objs, "StatefulSet", "searchrl-redis") and not find(objs, "StatefulSet", "searchrl-mlflow")
    env = env_of(pod(one(objs, "Deployment", "searchrl-reward"))["containers"][0])
    assert env["SEARCHRL_REDIS_URL"] == "rediss://redis.cache.internal.example.com:6380/2"
    assert env["SEARCHRL_REDIS_PASSWORD"]["secretKeyRef"] == {"name": "searchrl-redis", "key": "redis-password"}
    endpoints = one(objs, "ConfigMap", "searchrl-endpoints")["data"]
    assert endpoints["MLFLOW_TRACKING_URI"] == "https://mlflow.internal.example.com"
    # simulator disabled: no objects, no endpoint, no alert for it.
    assert not find(objs, "Deployment", "searchrl-simulator") and "SEARCHRL_SIMULATOR_TARGET" not in endpoints
    rules = one(objs, "PrometheusRule", "searchrl")["spec"]["groups"][0]["rules"]
    assert not any('service="simulator"' in r["expr"] for r in rules)


def test_bundled_redis_and_mlflow_are_statefulsets(render):
    objs = render()
    redis = one(objs, "StatefulSet", "searchrl-redis")
    c = pod(redis)["containers"][0]
    assert "$REDIS_PASSWORD" in c["args"][0] and env_of(c)["REDIS_PASSWORD"]["secretKeyRef"]["name"] == "searchrl-redis"
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    # #16: acknowledged rollout groups survive a restart (AOF on the volume) and memory pressure (only keys with a
    # TTL, the search cache, are evicted)
    assert "--appendonly yes --appendfsync everysec" in c["args"][0]
    assert "--maxmemory-policy volatile-lru" in c["args"][0]
    no_aof = pod(one(render(redis={"persistence": {"enabled": False}}), "StatefulSet", "searchrl-redis"))
    assert "--appendonly no" in no_aof["containers"][0]["args"][0]
    mlflow = one(objs, "StatefulSet", "searchrl-mlflow")
    args = pod(mlflow)["containers"][0]["args"][0]
    assert "--allowed-hosts" in args and "searchrl-mlflow.searchrl*" in args
    endpoints = one(objs, "ConfigMap", "searchrl-endpoints")["data"]
    assert endpoints["MLFLOW_TRACKING_URI"] == "http://searchrl-mlflow.searchrl.svc.cluster.local:5000"
    assert endpoints["SEARCHRL_RETRIEVER_TARGET"] == "dns:///searchrl-retriever.searchrl.svc.cluster.local:50052"


def test_network_policies_admit_only_declared_clients(render):
    objs = render("gpu-values.yaml")
    np = one(objs, "NetworkPolicy", "searchrl-services")
    peers = np["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"searchrl.io/client": "true"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "research-team"}}} in peers
    assert np["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert set(np["spec"]["podSelector"]["matchExpressions"][0]["values"]) == set(SERVICES)
    redis_np = one(objs, "NetworkPolicy", "searchrl-redis")
    assert redis_np["spec"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"searchrl.io/redis-client": "true"}}}
    ]
    for svc in SERVICES:
        labels = one(objs, "Deployment", f"searchrl-{svc}")["spec"]["template"]["metadata"]["labels"]
        assert labels["searchrl.io/redis-client"] == "true"


def test_retriever_index_volume_and_build_job(render):
    objs = render()
    dep = one(objs, "Deployment", "searchrl-retriever")
    spec = pod(dep)
    assert spec["initContainers"][0]["name"] == "wait-for-index"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["index"]["persistentVolumeClaim"] == {"claimName": "searchrl-index", "readOnly": True}
    (index_dir,) = [a.split("=", 1)[1] for a in spec["containers"][0]["args"] if a.startswith("--index-dir=")]
    assert re.fullmatch(r"/index/wiki-[0-9a-f]{8}", index_dir), index_dir
    assert spec["initContainers"][0]["args"][1] == index_dir
    pvc = one(objs, "PersistentVolumeClaim", "searchrl-index")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (job,) = find(objs, "Job")
    jspec = pod(job)
    assert jspec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "searchrl-index"
    assert "searchrl index build" in jspec["containers"][0]["args"][0]
    assert env_of(jspec["containers"][0])["INDEX_DIR"] == index_dir, "the Job builds what the retriever serves"
    # #23: new build settings -> a new Job (Jobs are immutable) writing a new directory, and the Deployment rolls to
    # it; nothing is replaced under a running retriever.
    other = render(retriever={"indexBuild": {"indexType": "ivfpq"}})
    (other_job,) = find(other, "Job")
    assert other_job["metadata"]["name"] != job["metadata"]["name"]
    other_args = pod(one(other, "Deployment", "searchrl-retriever"))["containers"][0]["args"]
    assert f"--index-dir={index_dir}" not in other_args
    assert env_of(pod(other_job)["containers"][0])["INDEX_DIR"] != index_dir
    # force rebuilds the same directory with a new Job.
    (forced,) = find(render(retriever={"indexBuild": {"force": True}}), "Job")
    assert forced["metadata"]["name"] != job["metadata"]["name"]
    assert env_of(pod(forced)["containers"][0])["INDEX_DIR"] == index_dir


def test_alerts_and_dashboards(render):
    objs = render()
    rule = one(objs, "PrometheusRule", "searchrl")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert REQUIRED_ALERTS <= alerts
    maps = [o for o in find(objs, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    assert {m["metadata"]["name"] for m in maps} == {"searchrl-services-dashboard", "searchrl-training-dashboard"}
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        (text,) = m["data"].values()
        model = json.loads(text)
        assert model["uid"] in ("searchrl-services", "searchrl-training")
    training = json.loads(one(objs, "ConfigMap", "searchrl-training-dashboard")["data"]["searchrl-training.json"])
    exprs = " ".join(t["expr"] for p in training["panels"] for t in p.get("targets", []))
    for metric in ("searchrl_train_reward_mean", "searchrl_train_f1_mean", "searchrl_train_searches_per_episode",
                   "searchrl_train_noisy_share", "searchrl_train_step_seconds"):  # fmt: skip
        assert metric in exprs
    assert not find(render(monitoring={"serviceMonitor": {"enabled": False}}), "ServiceMonitor")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"global": {"tls": {"enabled": True}}}, "existingSecret"),
        ({"simulator": {"engine": "vllm"}}, "gpu/enabled"),
        ({"policy": {"engine": "sglang"}}, "gpu/enabled"),
        ({"simulator": {"engine": "openai"}}, "openaiBaseUrls"),
        ({"reward": {"keda": {"enabled": True}}}, "not"),
        ({"retriever": {"autoscaling": {"metric": "memory"}}}, "metric"),
        ({"typo": 1}, "typo"),
        # #7: ReadWriteMany on the cluster's default StorageClass (block storage) stays Pending.
        ({"trainer": {"checkpoints": {"accessModes": ["ReadWriteMany"]}}}, "storageClass"),
        ({"retriever": {"index": {"persistence": {"accessModes": ["ReadWriteMany"]}}}}, "storageClass"),
        # #5: tensor parallelism needs a power-of-2 GPU count.
        ({"simulator": {"engine": "vllm", "gpu": {"enabled": True, "count": 3}}}, "count"),
        # #17: histogram_quantile cannot exceed the top finite bucket (600 s).
        ({"monitoring": {"prometheusRule": {"p99LatencySeconds": {"policy": 900}}}}, "600"),
    ],
)
def test_values_schema_rejects_broken_settings(render, sets, message):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(**sets)
    assert message in err.value.stderr


RAYJOB_FOLDERS = ["research", "zerosearch", "overlays/research-8gpu", "overlays/zerosearch-8gpu"]


def _rayjob_refs_are_provided(job: dict[str, Any], objs: list[dict[str, Any]], tls_secret: str) -> None:
    """Every object a RayJob pod names exists in the chart render (or is the chart's TLS Secret), with its labels."""
    provided = {(o["kind"], o["metadata"]["name"]) for o in objs}
    endpoints = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-endpoints"))
    np_labels = next(o for o in objs if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-services"))[
        "spec"
    ]["ingress"][0]["from"][1]["podSelector"]["matchLabels"]
    (podmon,) = find(objs, "PodMonitor")
    name = job["metadata"]["name"]
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        tmpl = group["template"]
        spec = tmpl["spec"]
        assert set(np_labels.items()) <= set(tmpl["metadata"]["labels"].items()), name
        assert set(podmon["spec"]["selector"]["matchLabels"].items()) <= set(tmpl["metadata"]["labels"].items()), name
        assert ("ServiceAccount", spec["serviceAccountName"]) in provided, name
        vols = {v["name"]: v for v in spec["volumes"]}
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in provided, name
        # #19: the token Secret is the one the release names, referenced without `optional` (a missing Secret must
        # stop the pod, not silently send no token).
        auth = vols["auth"]["secret"]
        assert auth["secretName"] == endpoints["data"]["SEARCHRL_AUTH_SECRET"], name
        assert auth["items"] == [{"key": endpoints["data"]["SEARCHRL_AUTH_SECRET_KEY"], "path": "token"}], name
        assert not auth.get("optional"), name
        assert ("Secret", auth["secretName"]) in provided or auth["secretName"] == endpoints["data"].get(
            "SEARCHRL_AUTH_SECRET"
        )
        assert vols["tls"]["secret"]["secretName"] == tls_secret, name
        for c in spec["containers"]:
            assert [src["configMapRef"]["name"] for src in c["envFrom"]] == [endpoints["metadata"]["name"]], name
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            # #9: the PodMonitor's port on every pod of the RayJob.
            assert ports.get(podmon["spec"]["podMetricsEndpoints"][0]["port"]) == 9095, (name, c["name"])
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts["tls"] == "/etc/searchrl/tls" and mounts["auth"] == "/etc/searchrl/auth", name
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in workers["tolerations"])


def test_rayjobs_match_what_the_chart_provides(render, kustomize):
    """The RayJob manifests name the ConfigMap, PVC, ServiceAccount, Secrets and labels the chart renders for the
    release "searchrl" (ci/gpu-values.yaml: TLS Secret searchrl-tls)."""
    objs = render("gpu-values.yaml")
    for folder in RAYJOB_FOLDERS:
        (job,) = kustomize(folder)
        _rayjob_refs_are_provided(job, objs, "searchrl-tls")


def test_release_component_points_the_rayjobs_at_another_release(tools, deploy_paths, kustomize, tmp_path):
    """#19/#25: deploy/k8s/components/release (+ image-pull-secret) adapt a preset to a release named team-a, its
    Secrets and a private registry; every name then matches what `helm install team-a` renders."""
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "global": {"tls": {"enabled": True, "existingSecret": "team-a-tls"},
                           "imagePullSecrets": ["registry-credentials"]},
                "trainer": {"checkpoints": {"storageClass": "efs-sc", "accessModes": ["ReadWriteMany"]}},
            }
        )
    )  # fmt: skip
    proc = subprocess.run(
        [tools["helm"], "template", "team-a", str(deploy_paths["chart"]), "-n", "team-a", "-f", str(values)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert find(objs, "ConfigMap", "team-a-searchrl-endpoints")
    (job,) = kustomize("overlays/example-release")
    _rayjob_refs_are_provided(job, objs, "team-a-tls")
    cluster = job["spec"]["rayClusterSpec"]
    for spec in (
        cluster["headGroupSpec"]["template"]["spec"],
        cluster["workerGroupSpecs"][0]["template"]["spec"],
        job["spec"]["submitterPodTemplate"]["spec"],
    ):
        assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    # The defaults of the presets are the names of release "searchrl": no leftover of them after the component.
    assert "searchrl-endpoints" not in yaml.safe_dump(job).replace("team-a-searchrl-endpoints", "")


# ------------------------------------------------------------------------------ deploy review, MED/LOW findings


def test_policy_dials_its_search_backends_with_tls_and_the_token(render):
    """#10: the policy is a client of the retriever/simulator; it gets the client env ChannelOptions.from_env reads."""
    spec = pod(one(render("gpu-values.yaml"), "Deployment", "searchrl-policy"))
    env = env_of(spec["containers"][0])
    assert env["SEARCHRL_TLS"] == "true"
    assert env["SEARCHRL_TLS_CA_FILE"] == "/etc/searchrl/tls/ca.crt"
    assert env["SEARCHRL_AUTH_TOKEN_FILE"] == "/etc/searchrl/auth/token"
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert {"/etc/searchrl/tls", "/etc/searchrl/auth"} <= mounts
    names = [e["name"] for e in spec["containers"][0]["env"]]
    assert len(names) == len(set(names)), "duplicate env entries"
    mtls = env_of(pod(one(render("gpu-values.yaml", global__tls__clientAuth=True), "Deployment", "searchrl-policy"))[
        "containers"][0])  # fmt: skip
    assert mtls["SEARCHRL_TLS_CLIENT_CERT_FILE"] == "/etc/searchrl/tls/tls.crt"
    assert mtls["SEARCHRL_TLS_CLIENT_KEY_FILE"] == "/etc/searchrl/tls/tls.key"
    plain = env_of(pod(one(render(), "Deployment", "searchrl-policy"))["containers"][0])
    assert plain["SEARCHRL_TLS"] == "false" and "SEARCHRL_AUTH_TOKEN_FILE" not in plain


def test_retriever_http_port_carries_the_services_auth(render, helm_notes):
    """#16: the Search-R1 HTTP port stays on with auth/TLS because the retriever enforces the same bearer token (and
    serves HTTPS with the same certificate) from the same settings; the loopback check is in test_offline_checks."""
    c = pod(one(render("gpu-values.yaml"), "Deployment", "searchrl-retriever"))["containers"][0]
    env = env_of(c)
    assert "--http-port=8000" in c["args"]
    assert env["SEARCHRL_AUTH_TOKEN_FILE"] == "/etc/searchrl/auth/token"
    assert env["SEARCHRL_TLS_CERT_FILE"] == "/etc/searchrl/tls/tls.crt"
    notes = helm_notes("gpu-values.yaml")
    assert "https://searchrl-retriever.searchrl.svc:8000/retrieve" in notes and "Bearer" in notes


def test_gpu_pods_keep_compiler_caches_on_writable_volumes(render):
    """#8 (chart side): with readOnlyRootFilesystem, Triton's ~/.triton and ~/.config must point at a volume."""
    for w in workloads(render("gpu-values.yaml")):
        for c in pod(w)["containers"]:
            if not c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") or w["kind"] != "Deployment":
                continue
            env = env_of(c)
            mounts = [m["mountPath"] for m in c["volumeMounts"]]
            for var in ("TRITON_HOME", "XDG_CONFIG_HOME"):
                assert any(env[var].startswith(m) for m in mounts), (w["metadata"]["name"], var, env.get(var))


def test_index_build_waits_for_its_corpus_and_the_retriever_for_the_index_with_deadlines(render):
    """#22: a missing corpus or index fails with a message after a deadline instead of waiting silently forever."""
    objs = render("gpu-values.yaml")
    (job,) = find(objs, "Job")
    c = pod(job)["containers"][0]
    assert int(env_of(c)["CORPUS_WAIT_SECONDS"]) > 0
    assert "waiting for the corpus" in c["args"][0] and "exit 3" in c["args"][0]
    init = pod(one(objs, "Deployment", "searchrl-retriever"))["initContainers"][0]
    assert "sys.exit(1)" in init["args"][0] and "deadline" in init["args"][0]
    assert int(init["args"][2]) >= job["spec"]["activeDeadlineSeconds"], "the retriever outwaits the build"


def test_kuberay_operator_watches_only_the_release_namespace(render):
    """#21: the bundled operator must not reconcile RayJobs of another operator's namespaces."""
    objs = render(**{"kuberay-operator": {"enabled": True}})
    args = pod(one(objs, "Deployment", "searchrl-kuberay-operator"))["containers"][0]["args"]
    assert "--watch-namespace=searchrl" in args
    wide = render(**{"kuberay-operator": {"enabled": True, "watchAllNamespaces": True}})
    assert not any(a.startswith("--watch-namespace") for a in pod(one(wide, "Deployment", "searchrl-kuberay-operator"))[
        "containers"][0]["args"])  # fmt: skip


def test_mlflow_admits_only_the_release_and_its_clients(render):
    """#26: MLflow has no auth; a NetworkPolicy limits who can read and write runs."""
    objs = render("gpu-values.yaml")
    np = one(objs, "NetworkPolicy", "searchrl-mlflow")
    mlflow_labels = pod(one(objs, "StatefulSet", "searchrl-mlflow"))
    assert np["spec"]["podSelector"]["matchLabels"].items() <= one(objs, "StatefulSet", "searchrl-mlflow")["spec"][
        "template"]["metadata"]["labels"].items()  # fmt: skip
    peers = np["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"searchrl.io/client": "true"}}} in peers
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "searchrl"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "research-team"}}} in peers
    assert len(peers) == 3 and mlflow_labels
    assert not find(render(networkPolicy={"enabled": False}), "NetworkPolicy", "searchrl-mlflow")


def test_policy_can_mount_the_checkpoints_read_only(render, helm_notes):
    """#27: LoadWeights needs the RayJob checkpoints; NOTES give the FSDP merge step."""
    spec = pod(one(render("gpu-values.yaml"), "Deployment", "searchrl-policy"))
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"] == {"claimName": "searchrl-checkpoints", "readOnly": True}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["checkpoints"] == {"name": "checkpoints", "mountPath": "/checkpoints", "readOnly": True}
    assert "python -m verl.model_merger merge --backend fsdp" in helm_notes("gpu-values.yaml")
    assert "checkpoints" not in {v["name"] for v in pod(one(render(), "Deployment", "searchrl-policy"))["volumes"]}
    # #17: LoadWeights loads from the mounted claim only, and from nowhere without it (PolicyConfig.weights_roots)
    from searchrl.services.policy.server import PolicyConfig
    from searchrl.serving.config import from_sources

    def roots(objs: list[dict[str, Any]]) -> str:
        args = pod(one(objs, "Deployment", "searchrl-policy"))["containers"][0]["args"]
        return from_sources(PolicyConfig, args, {}).weights_roots

    assert roots(render("gpu-values.yaml")) == mounts["checkpoints"]["mountPath"]
    assert roots(render()) == ""
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(policy={"checkpoints": {"enabled": True}})  # the default claim is ReadWriteOnce
    assert "ReadWriteMany" in err.value.stderr


def _quantity(q: Any) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_cpu_only_values_fit_a_small_node(render):
    """#28: "fits a laptop-sized cluster": every pod that starts on install (at its minimum replica count, the index
    Job included) fits a 4-CPU / 8-GiB node."""
    objs = render("cpu-only-values.yaml")
    hpa_min = {
        o["spec"]["scaleTargetRef"]["name"]: o["spec"]["minReplicas"] for o in find(objs, "HorizontalPodAutoscaler")
    }
    cpu = mem = 0.0
    for w in workloads(objs):
        n = hpa_min.get(w["metadata"]["name"], w["spec"].get("replicas", 1))
        for c in pod(w)["containers"]:
            req = c["resources"].get("requests", {})
            cpu += n * _quantity(req.get("cpu", 0))
            mem += n * _quantity(req.get("memory", 0))
    assert cpu <= 3.5 and mem <= 7 * 2**30, f"requests {cpu:.2f} CPU, {mem / 2**30:.2f} GiB"


def test_gpu_engines_have_a_startup_budget_for_a_cold_cache(render):
    """#30: a 14B/7B engine downloads 15-30 GB into an empty cache, then captures CUDA graphs: 30 minutes."""
    for svc in ("simulator", "policy"):
        c = pod(one(render("gpu-values.yaml"), "Deployment", f"searchrl-{svc}"))["containers"][0]
        budget = c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"]
        assert budget >= 1800, (svc, budget)


def test_volume_ownership_is_documented_and_cheap(render, deploy_paths):
    """#29: fsGroupChangePolicy OnRootMismatch (no recursive chown of a big index), and the NFS caveat documented."""
    for w in workloads(render("gpu-values.yaml")):
        if w["metadata"]["name"].startswith("searchrl-") and "redis" not in w["metadata"]["name"] \
                and "mlflow" not in w["metadata"]["name"]:  # fmt: skip
            assert pod(w)["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", w["metadata"]["name"]
    values = (deploy_paths["chart"] / "values.yaml").read_text()
    assert "ignore fsGroup" in values and "access point" in values


def test_dashboard_folder_needs_the_sidecar_setting(helm_notes, deploy_paths):
    """#36: the grafana_folder annotation only works with sidecar.dashboards.folderAnnotation set."""
    assert "folderAnnotation=grafana_folder" in helm_notes()
    assert "folderAnnotation=grafana_folder" in (deploy_paths["chart"] / "values.yaml").read_text()


def test_file_paths_in_notes_and_comments_exist(helm_notes, deploy_paths):
    """#31: every repository path that NOTES.txt, the trainer presets' and tool configs' comments, the RayJob and
    overlay comments point to exists."""
    root = deploy_paths["root"]
    texts = {"NOTES.txt": helm_notes() + helm_notes("gpu-values.yaml")}
    for pattern in ("trainer/searchrl/trainer/config/*.yaml", "trainer/searchrl/trainer/config/tools/*.yaml"):
        for path in root.glob(pattern):
            texts[str(path.relative_to(root))] = "\n".join(
                line for line in path.read_text().splitlines() if line.lstrip().startswith("#")
            )
    for path in list(deploy_paths["k8s"].rglob("*.yaml")) + [deploy_paths["chart"] / "values.yaml"]:
        texts[str(path)] = path.read_text()
    missing = []
    for where, text in texts.items():
        for ref in re.findall(r"(?<![\w/.-])((?:deploy|trainer|tests)/[\w./*-]+[\w*])", text):
            if "*" in ref or "<" in ref:
                if not list(root.glob(ref)):
                    missing.append((where, ref))
            elif not (root / ref).exists():
                missing.append((where, ref))
    assert not missing, missing


# ------------------------------------------------------------------------------------------------ rollout workers


def test_rollout_workers_are_off_by_default(render):
    objs = render()
    assert not find(objs, "Deployment", "searchrl-rollout-worker")
    assert not find(objs, "ScaledObject", "searchrl-rollout-worker")


def test_rollout_worker_pods_compose_a_worker_config_for_this_release(render, tmp_path):
    """#16: the worker Deployment's command line, with the kubelet's $(VAR) expansion and its ConfigMap, is a valid
    `searchrl rollout-worker` invocation whose composed config reaches this release's policy service and Redis, on
    the streams KEDA scales on; the pods are admitted by the services' and Redis's NetworkPolicies and scraped."""
    from searchrl.services.rollouts.queue import WORKERS_GROUP, RolloutQueue
    from searchrl.trainer.rollout_worker import build_parser, load_worker_config

    objs = render("async-rollouts-values.yaml")
    dep = one(objs, "Deployment", "searchrl-rollout-worker")
    spec = pod(dep)
    (c,) = spec["containers"]
    env = env_of(c)
    assert c["image"] == "ghcr.io/searchrl/searchrl-trainer:0.1.0"  # entrypoint `searchrl`
    assert c["args"][0] == "rollout-worker"
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"][1:]]
    assert not any("$(" in a for a in args)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cm = one(objs, "ConfigMap", "searchrl-rollout-worker")
    assert {"name": "config", "configMap": {"name": "searchrl-rollout-worker"}} in spec["volumes"]
    config_path = f"{mounts['config']}/config.yaml"
    assert f"--config={config_path}" in args
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])
    ns = build_parser().parse_args([a.replace(config_path, str(tmp_path / "config.yaml")) for a in args])
    cfg = load_worker_config(ns)

    policy = one(objs, "Service", "searchrl-policy")
    policy_port = {p["name"]: p["port"] for p in policy["spec"]["ports"]}["grpc"]
    assert cfg.rollout.engine == "remote"
    assert cfg.rollout.policy_target == f"dns:///searchrl-policy.searchrl.svc.cluster.local:{policy_port}"
    assert cfg.rollout.search.backend == "retriever"
    assert cfg.rollout.search.retriever_target.startswith("dns:///searchrl-retriever.searchrl.svc.cluster.local:")
    assert cfg.model.path == "smollm2-135m-instruct"  # the policy's model: the same tokenizer
    # the ConfigMap's keys (shared with the trainer) survive the chart's wiring
    assert cfg.seed == 1 and cfg.rollout.agent.max_turns == 2 and cfg.rollout.agent.max_new_tokens_per_turn == 24
    assert cfg.rollout.queue.prefix == "searchrl:run-1"
    assert cfg.rollout.queue.redis_url == "redis://searchrl-redis.searchrl.svc.cluster.local:6379/0"
    assert env["SEARCHRL_REDIS_PASSWORD"]["secretKeyRef"]["name"] == "searchrl-redis"
    # client auth from the environment (ChannelOptions.from_env), the token file mounted from the Secret
    assert env["SEARCHRL_AUTH_TOKEN_FILE"].startswith(mounts["auth"] + "/")
    # metrics: the trainer PodMonitor scrapes port "metrics" of pods with the client labels
    assert ns.metrics_host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == ns.metrics_port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    monitor = one(objs, "PodMonitor", "searchrl-trainer")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    services_np = one(objs, "NetworkPolicy", "searchrl-services")
    assert any(
        f.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items() and f.get("podSelector")
        for f in services_np["spec"]["ingress"][0]["from"]
    )
    redis_np = one(objs, "NetworkPolicy", "searchrl-redis")
    redis_from = redis_np["spec"]["ingress"][0]["from"]
    assert any(f.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items() for f in redis_from)

    # KEDA: the lag of the workers' consumer group on the task stream the workers read
    assert "replicas" not in dep["spec"]
    so = one(objs, "ScaledObject", "searchrl-rollout-worker")
    assert so["spec"]["scaleTargetRef"]["name"] == "searchrl-rollout-worker"
    (trigger,) = so["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert meta["stream"] == RolloutQueue(cfg.rollout.queue.redis_url, cfg.rollout.queue.prefix).task_stream
    assert meta["consumerGroup"] == WORKERS_GROUP
    assert int(meta["lagCount"]) >= 1 and "pendingEntriesCount" not in meta
    assert meta["address"] == "searchrl-redis.searchrl.svc.cluster.local:6379"
    assert "secretKeyRef" in env[meta["passwordFromEnv"]]  # KEDA reads the password the pod reads; none in values
    # KEDA's operator reaches Redis
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in redis_from


def test_rollout_workers_need_the_policy_service(render):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(rolloutWorker={"enabled": True, "queuePrefix": "p", "image": {"repository": "searchrl-trainer"},
                              "keda": {"enabled": False}}, policy={"enabled": False})  # fmt: skip
    assert "rolloutWorker.enabled samples through this release's policy service" in err.value.stderr


def test_every_service_gets_its_admission_bound(render):
    """#17: each service's service.maxConcurrentRpcs reaches its server config through the environment the chart sets
    (the same variable the server reads), and 0 (unbounded) passes through."""
    from searchrl.services.reward.server import RewardConfig
    from searchrl.serving.config import from_sources

    objs = render(policy={"service": {"maxConcurrentRpcs": 7}}, reward={"service": {"maxConcurrentRpcs": 0}})
    bounds = {}
    for name in ("retriever", "simulator", "policy", "reward"):
        env = {
            e["name"]: e.get("value") for e in pod(one(objs, "Deployment", f"searchrl-{name}"))["containers"][0]["env"]
        }
        bounds[name] = from_sources(
            RewardConfig, [], {k: v for k, v in env.items() if v is not None}
        ).max_concurrent_rpcs
    assert bounds == {"retriever": 1024, "simulator": 1024, "policy": 7, "reward": 0}
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(retriever={"service": {"maxConcurrentRpcs": -1}})
    assert "maxConcurrentRpcs" in err.value.stderr


def test_only_the_policy_gets_the_admin_token_and_it_comes_from_the_auth_secret(render):
    """#17: with auth on, LoadWeights needs the admin token: the generated auth Secret holds it next to the bearer
    token, the policy (only) reads it from an optional key of that Secret, and the server config reads that file."""
    from searchrl.services.policy.server import PolicyConfig
    from searchrl.serving.config import from_sources

    objs = render("gpu-values.yaml")
    secret = one(objs, "Secret", "searchrl-auth")
    assert set(secret["data"]) == {"token", "admin-token"} and secret["data"]["token"] != secret["data"]["admin-token"]
    for name in ("retriever", "simulator", "reward"):
        c = pod(one(objs, "Deployment", f"searchrl-{name}"))["containers"][0]
        assert "SEARCHRL_ADMIN_TOKEN_FILE" not in {e["name"] for e in c["env"]}, name
    spec = pod(one(objs, "Deployment", "searchrl-policy"))
    c = spec["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    cfg = from_sources(PolicyConfig, c["args"], env)
    assert cfg.admin_token_file == env["SEARCHRL_ADMIN_TOKEN_FILE"] != cfg.auth_token_file
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vol = {v["name"]: v for v in spec["volumes"]}[mounts[os.path.dirname(cfg.admin_token_file)]]
    assert vol["secret"]["secretName"] == "searchrl-auth" and vol["secret"]["optional"] is True
    assert vol["secret"]["items"] == [{"key": "admin-token", "path": os.path.basename(cfg.admin_token_file)}]
    off = pod(one(render(), "Deployment", "searchrl-policy"))["containers"][0]
    assert "SEARCHRL_ADMIN_TOKEN_FILE" not in {e["name"] for e in off["env"]}
