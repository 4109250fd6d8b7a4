"""Offline checks C1-C14 of the deploy review (../shared/reviews/deploy-review.md, last table): each CRIT/HIGH
finding becomes a check over the real ``helm template`` / ``kubectl kustomize`` renders, and, where the review names
a stronger form, a run of the real code those objects start (the rendered probe command, the RayJob entrypoint, the
trainer's search tool and the policy's search channels against a loopback TLS + token retriever, the index Job's
script). No cluster and no GPU.

Every check failed on the reviewed commit (a4ff7a2). To run them against another copy of ``deploy/``::

    git archive a4ff7a2 deploy | tar -x -C /tmp/headchart
    SEARCHRL_DEPLOY_ROOT=/tmp/headchart pytest tests/deploy/test_offline_checks.py

The checks of code (C6 reachability, C9, C11, C14) read the searchrl namespace that is imported: put the folders of
the old code that hold it first on ``PYTHONPATH`` and run pytest from outside the checkout.

| check | finding | guards against |
|---|---|---|
| C1 | #1 | RayJobs bypassing the pre-flight entrypoint; tool/agent-loop config paths that do not resolve from the
|    |    | workers' working directory |
| C2 | #4 | RayJob pods without the CA/token of a TLS+auth release; the trainer's search tool dialling plaintext |
| C3 | #2 | a TLS Secret without a key the pods read (kubectl create secret tls has no ca.crt); a TLS probe that cannot
|    |    | pass with the Secret users create |
| C4 | #3 | an encoder the retriever cannot load offline; an index Job that cannot download a non-bundled encoder |
| C5 | #5 | vLLM using fewer GPUs than the pod holds; a model that does not fit the GPUs the selector admits |
| C6 | #6, #9 | KEDA/alerts/dashboards reading trainer metrics nothing on the RayJob path exports; a PodMonitor that
|    |    | misses the pod serving them; a scale-to-zero service nothing wakes |
| C7 | #7 | ReadWriteMany claims on the cluster's default (ReadWriteOnce) StorageClass |
| C8 | #11 | a ReadWriteOnce claim mounted by a Deployment that scales past one pod |
| C9 | #12 | servers that never recycle connections (scale-out never reaches a running job) |
| C10 | #13 | an index Job that throws away its resumable build on a retry |
| C11 | #14 | the Redis password in the services' start-up log |
| C12 | #15 | evictable Ray heads/workers and index builds (consolidation, scale-down) |
| C13 | #10 | policy searches without the release's TLS/token |
| C14 | #17 | p99 alert thresholds above the histogram's highest finite bucket (can never fire) |
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from searchrl.testing import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
# The source tree of the searchrl code these tests import (this checkout, or another one first on PYTHONPATH).
# The folders holding the searchrl namespace that is imported (the core's and each application's portion).
SOURCE_ROOTS = [Path(p).resolve().parent for p in importlib.import_module("searchrl").__path__]
CI_VALUES = ["cpu-only-values.yaml", "gpu-values.yaml", "external-redis-values.yaml"]
ALL_VALUES = [(), *[(v,) for v in CI_VALUES]]
VALUES_IDS = ["default", *CI_VALUES]
RAYJOB_FOLDERS = ["research", "zerosearch", "overlays/research-8gpu", "overlays/zerosearch-8gpu"]
ENTRYPOINT = ["python3", "-m", "searchrl.trainer.rayjob_entrypoint"]
BUNDLED_ENCODERS = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
TLS_MOUNT = "/etc/searchrl/tls"
AUTH_MOUNT = "/etc/searchrl/auth"


# ------------------------------------------------------------------------------------------------ helpers


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, pod template)`` of a workload or RayJob (head, worker groups, submitter)."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        out = [(f"{name} head", cluster["headGroupSpec"]["template"])]
        out += [(f"{name} {g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]]
        if obj["spec"].get("submitterPodTemplate"):
            out.append((f"{name} submitter", obj["spec"]["submitterPodTemplate"]))
        return out
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [(name, obj["spec"]["template"])]
    return []


def container_env(c: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> dict[str, Any]:
    """A container's environment: envFrom ConfigMaps first, then env (values, or the valueFrom dict)."""
    env: dict[str, Any] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps.get(src["configMapRef"]["name"], {}))
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def configmaps_of(objs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data") or {} for o in objs if o["kind"] == "ConfigMap"}


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (hit,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return hit


def remap(value: str, mounts: dict[str, Path]) -> str:
    """A path inside the pod -> the folder standing in for its volume here."""
    for prefix, local in mounts.items():
        if value == prefix or value.startswith(prefix + "/"):
            return str(local) + value[len(prefix) :]
    return value


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector syntax (``k=v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``)."""
    terms = re.findall(r"[^,()]+(?:\([^)]*\))?", selector)
    for term in (t.strip() for t in terms):
        if not term:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            ok = (labels.get(key) in vals) if op == "in" else (labels.get(key) not in vals)
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", term):
            key, op, val = m.groups()
            ok = (labels.get(key) == val) if op in ("=", "==") else (labels.get(key) != val)
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def test_label_selector_parser():
    labels = {"searchrl.io/search-backend": "simulator", "ray.io/node-type": "head"}
    assert label_selector_matches("searchrl.io/search-backend in (simulator,mixed)", labels)
    assert label_selector_matches("ray.io/node-type=head,searchrl.io/search-backend in (simulator, mixed)", labels)
    assert not label_selector_matches("searchrl.io/search-backend in (retriever)", labels)
    assert not label_selector_matches("ray.io/node-type!=head", labels)
    assert label_selector_matches("!app", labels) and not label_selector_matches("app", labels)


@pytest.fixture(scope="module")
def rayjobs(kustomize) -> dict[str, dict[str, Any]]:
    out = {}
    for folder in RAYJOB_FOLDERS:
        (job,) = kustomize(folder)
        out[folder] = job
    return out


# ============================================================================ C1 (#1): the RayJob entrypoint


def test_c1_rayjobs_pass_the_preflight_check_from_another_working_directory(rayjobs, tmp_path):
    """Each RayJob runs ``searchrl.trainer.rayjob_entrypoint``; its ``--check-only`` passes with the manifest's own
    overrides from a working directory that is not the repository (the image's WORKDIR), and the composed tool and
    agent-loop config paths are absolute files there (verl resolves relative ones against each worker's cwd)."""
    argvs = {}
    for folder, job in rayjobs.items():
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[:3] == ENTRYPOINT, (
            f"{folder}: the RayJob runs {' '.join(words[:3])}, not the pre-flight entrypoint"
        )
        assert not any(w.startswith("--config-path") for w in words), folder
        argvs[folder] = [*words[3:], "--check-only", "--skip-data-check"]
    pytest.importorskip("verl")
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os, runpy, sys\n"
        "out = {}\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    sys.argv = ['rayjob_entrypoint', *argv]\n"
        "    try:\n"
        "        runpy.run_module('searchrl.trainer.rayjob_entrypoint', run_name='__main__', alter_sys=True)\n"
        "        rc = 0\n"
        "    except SystemExit as exc:\n"
        "        rc = exc.code\n"
        "    from searchrl.trainer.rayjob_entrypoint import compose\n"
        "    name_arg = next(a.split('=', 1)[1] for a in argv if a.startswith('--config-name='))\n"
        "    cfg = compose(name_arg, [a for a in argv if not a.startswith('--')])\n"
        "    r = cfg.actor_rollout_ref.rollout\n"
        "    paths = [str(r.multi_turn.tool_config_path), str(r.agent.agent_loop_config_path)]\n"
        "    out[name] = {'rc': rc, 'paths': paths, 'exist': [os.path.isabs(p) and os.path.isfile(p) for p in paths]}\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    workdir = tmp_path / "home-searchrl"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SEARCHRL_CONFIG_DIR"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(driver), json.dumps(argvs)], cwd=workdir, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    bad = {k: v for k, v in result.items() if v["rc"] != 0 or not all(v["exist"])}
    assert not bad, f"{bad}\n{proc.stderr[-4000:]}"


# ============================================================== C2 (#4), C13 (#10), #16: TLS + token on loopback


@pytest.fixture(scope="module")
def pki(tmp_path_factory, certs) -> dict[str, Any]:
    """A CA and a server certificate for the cluster names and 127.0.0.1, laid out as a cert-manager Secret
    (ca.crt, tls.crt, tls.key), plus the bearer token as the chart's auth Secret holds it."""
    ca = certs()
    crt, key = ca.issue(["*.searchrl.svc", "*.searchrl.svc.cluster.local", "localhost", "127.0.0.1"])
    folder = tmp_path_factory.mktemp("pki")
    tls = folder / "tls"
    tls.mkdir()
    (tls / "ca.crt").write_bytes(ca.pem)
    (tls / "tls.crt").write_bytes(crt)
    (tls / "tls.key").write_bytes(key)
    token = base64.b64encode(os.urandom(24)).decode()
    return {"ca": ca, "tls": tls, "token": token, "folder": folder}


def _tiny_corpus(path: Path) -> Path:
    rows = [
        {"id": str(i), "contents": f'"Topic {i}"\nA short passage number {i} about the river Danube and city {i}.'}
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def secure_retriever(pki, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """``searchrl serve retriever`` with TLS and a bearer token (the settings the chart gives it), over an index built
    with an encoder that is deleted before the retriever starts (it must load the copy in the index directory)."""
    from searchrl.assets import embedding_model_path

    work = tmp_path_factory.mktemp("retriever")
    model = work / "encoder-copy"
    shutil.copytree(embedding_model_path(), model)
    index = work / "index"
    proc = subprocess.run(
        [sys.executable, "-m", "searchrl", "index", "build", "--corpus", str(_tiny_corpus(work / "corpus.jsonl")),
         "--model", str(model), "--index-type", "flat", "--out", str(index), "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    shutil.rmtree(model)
    auth = work / "auth"
    auth.mkdir()
    (auth / "token").write_text(pki["token"])
    http_port = free_port()
    env = {
        "SEARCHRL_TLS_CERT_FILE": str(pki["tls"] / "tls.crt"),
        "SEARCHRL_TLS_KEY_FILE": str(pki["tls"] / "tls.key"),
        "SEARCHRL_AUTH_TOKEN_FILE": str(auth / "token"),
        "HF_HOME": str(work / "empty-hf-home"),
        "HF_HUB_OFFLINE": "1",
    }
    svc = ServiceProcess(
        "retriever", ["--index-dir", str(index), "--http-port", str(http_port)], env, 300, root_ca=pki["ca"].pem
    )
    try:
        yield {"target": svc.target, "http_port": http_port, "index": index, "proc": svc}
    finally:
        svc.stop()


def test_c4_the_retriever_loads_the_encoder_stored_in_its_index_offline(secure_retriever, render):
    """C4, stronger form: the encoder the index was built with is gone and the Hub is offline; the retriever started
    with the chart's arguments (index dir only) loads the copy inside the index directory and serves (see the
    retriever_c4 test below for the rendered arguments)."""
    assert secure_retriever["proc"].proc.poll() is None
    assert (secure_retriever["index"] / "model").is_dir(), "the index directory holds the encoder"


def _rayjob_pod_env(job: dict[str, Any], objs: list[dict[str, Any]], mounts: dict[str, Path]) -> dict[str, str]:
    """The environment of the RayJob head's ray container (endpoints ConfigMap, env, runtime env), paths remapped."""
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = container_env(head["containers"][0], configmaps_of(objs))
    env.update(yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}").get("env_vars", {}))
    return {k: remap(str(v), mounts) for k, v in env.items() if isinstance(v, str)}


def _project_rayjob_volumes(job: dict[str, Any], secrets: dict[str, dict[str, Any]], folder: Path,
                            project_secret: Any) -> dict[str, Path]:  # fmt: skip
    """Project the head's secret volumes as kubelet would (from ``secrets``, by name); returns mountPath -> folder."""
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    vols = {v["name"]: v for v in head["volumes"]}
    mounts = {}
    for m in head["containers"][0]["volumeMounts"]:
        src = vols[m["name"]].get("secret")
        if not src:
            continue
        secret = secrets.get(src["secretName"])
        if secret is None:
            assert src.get("optional"), f"{job['metadata']['name']}: Secret {src['secretName']} does not exist"
            continue
        mounts[m["mountPath"]] = project_secret(secret, folder / m["name"], src.get("items"))
    return mounts


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "searchrl"},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}  # fmt: skip


async def test_c2_the_rayjob_search_tool_reaches_a_tls_and_token_retriever(
    rayjobs, render, pki, secure_retriever, tmp_path, monkeypatch, projected
):
    """C2: with ci/gpu-values (TLS and auth on), every RayJob pod mounts the CA and the token and gets the client env
    from the endpoints ConfigMap; the trainer's search tool, built by verl from the preset's tool config in exactly
    that environment, returns documents from a TLS + token retriever, not "Search error"."""
    objs = render("gpu-values.yaml")
    endpoints = one(objs, "ConfigMap", "searchrl-endpoints")["data"]
    assert endpoints["SEARCHRL_TLS"] == "true"
    for job in rayjobs.values():
        for label, tmpl in pod_templates(job)[:-1]:  # head and workers (not the submitter)
            spec = tmpl["spec"]
            vols = {v["name"]: v for v in spec["volumes"]}
            for c in spec["containers"]:
                env = container_env(c, configmaps_of(objs))
                mounts = {m["mountPath"]: vols[m["name"]] for m in c.get("volumeMounts", [])}
                for var in ("SEARCHRL_TLS_CA_FILE", "SEARCHRL_AUTH_TOKEN_FILE"):
                    assert var in env, f"{label}: no {var}"
                    mount = os.path.dirname(env[var])
                    assert mount in mounts and "secret" in mounts[mount], f"{label}: {env[var]} is not on a Secret"
    # The loopback run, with the research preset's head environment.
    job = rayjobs["research"]
    auth = one(objs, "Secret", "searchrl-auth")
    tls_secret = _secret("searchrl-tls", {n: (pki["tls"] / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key")})
    auth = {**auth, "data": {"token": base64.b64encode(pki["token"].encode()).decode()}}
    mounts = _project_rayjob_volumes(job, {"searchrl-tls": tls_secret, "searchrl-auth": auth}, tmp_path, projected)
    env = _rayjob_pod_env(job, objs, mounts)
    env["SEARCHRL_RETRIEVER_TARGET"] = secure_retriever["target"]  # the cluster DNS name does not resolve here
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    pytest.importorskip("verl")
    from verl.tools.tool_registry import initialize_tools_from_config

    from searchrl.trainer.rayjob_entrypoint import compose

    config_name = shlex.split(job["spec"]["entrypoint"])[3].split("=", 1)[1]
    cfg = compose(config_name, [])
    (tool,) = initialize_tools_from_config(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    iid, _ = await tool.create(create_kwargs={"question": "Where does the Danube flow?"})
    response, _reward, metrics = await tool.execute(iid, {"query": "river Danube"})
    assert metrics.get("num_documents", 0) > 0 and "Search error" not in (response.text or ""), (response, metrics)


async def test_c13_policy_searches_reach_a_tls_and_token_retriever(
    render, pki, secure_retriever, tmp_path, monkeypatch, projected
):
    """C13: the policy pod's rendered environment (ci/gpu-values: TLS and auth on) gives its search channels the CA
    and the token: ``build_searches`` over that environment returns documents from a TLS + token retriever."""
    objs = render("gpu-values.yaml")
    dep = one(objs, "Deployment", "searchrl-policy")
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    c = spec["containers"][0]
    tls_secret = _secret("searchrl-tls", {n: (pki["tls"] / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key")})
    auth_secret = _secret("searchrl-auth", {"token": pki["token"].encode()})
    mounts = {}
    for m in c["volumeMounts"]:
        src = vols[m["name"]].get("secret")
        if src:
            secret = {"searchrl-tls": tls_secret, "searchrl-auth": auth_secret}[src["secretName"]]
            mounts[m["mountPath"]] = projected(
                secret, tmp_path / m["name"], src.get("items"), src.get("optional", False)
            )
    env = {k: remap(v, mounts) for k, v in container_env(c, {}).items() if isinstance(v, str)}
    env["SEARCHRL_POLICY_RETRIEVER_TARGET"] = secure_retriever["target"]
    env.pop("SEARCHRL_POLICY_SIMULATOR_TARGET", None)
    env.pop("SEARCHRL_REDIS_URL", None)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from searchrl.agent.loop import SearchContext
    from searchrl.services.policy.server import PolicyConfig, build_searches
    from searchrl.serving import config as cfgmod

    cfg = cfgmod.from_sources(PolicyConfig, {}, os.environ)
    backends = build_searches(cfg)
    try:
        outcome = await backends["retriever"].search(
            "river Danube", top_k=3, context=SearchContext(question="", golden_answers=[])
        )
    finally:
        closer = getattr(backends, "close", None)
        if closer is not None:
            await closer()
        else:
            for b in backends.values():
                if hasattr(b, "close"):
                    await b.close()
    assert outcome.documents and not outcome.error, outcome


def test_retriever_http_api_requires_the_token(secure_retriever, pki):
    """#16: the Search-R1 HTTP port the chart keeps open with auth on enforces the same bearer token (and TLS)."""
    ctx = ssl.create_default_context(cadata=pki["ca"].pem.decode())
    url = f"https://127.0.0.1:{secure_retriever['http_port']}/retrieve"
    body = json.dumps({"queries": ["river Danube"], "topk": 2}).encode()

    def post(headers: dict[str, str]) -> int:
        req = urllib.request.Request(url, body, {"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    assert post({}) == 401
    assert post({"Authorization": "Bearer wrong"}) == 401
    assert post({"Authorization": f"Bearer {pki['token']}"}) == 200


# ======================================================================= C3 (#2): the TLS Secret and the probes


def _tls_key_reads(objs: list[dict[str, Any]], secret_name: str) -> dict[str, set[str]]:
    """Pod label -> keys of Secret ``secret_name`` its containers name in env vars (by path under the mount)."""
    cms = configmaps_of(objs)
    out: dict[str, set[str]] = {}
    for obj in objs:
        for label, tmpl in pod_templates(obj):
            spec = tmpl["spec"]
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                env = container_env(c, cms)
                for m in c.get("volumeMounts", []):
                    src = vols.get(m["name"], {}).get("secret")
                    if not src or src["secretName"] != secret_name:
                        continue
                    by_path = {i["path"]: i["key"] for i in src.get("items", [])}
                    for value in env.values():
                        if isinstance(value, str) and value.startswith(m["mountPath"] + "/"):
                            rel = value[len(m["mountPath"]) + 1 :]
                            out.setdefault(label, set()).add(by_path.get(rel, rel))
    return out


@pytest.fixture(scope="module")
def self_signed_pair(certs) -> tuple[bytes, bytes]:
    return certs.self_signed(["*.searchrl.svc", "*.searchrl.svc.cluster.local", "127.0.0.1"])


def test_c3_every_tls_key_the_pods_read_is_in_the_secret_or_the_install_refuses_it(
    render, kustomize, kubectl_secret, install_render, self_signed_pair
):
    """C3: ``kubectl create secret tls`` writes tls.crt and tls.key only. Every key of the TLS Secret that a pod of
    the release or a RayJob names must be in it, or `helm install` must refuse that Secret with a message naming the
    missing key (the chart's install-time lookup; exercised with ``helm template --dry-run=server``)."""
    crt, key = self_signed_pair
    secret = kubectl_secret("tls", "searchrl-tls", "--cert=tls.crt", "--key=tls.key",
                            files={"tls.crt": crt, "tls.key": key})  # fmt: skip
    objs = render("gpu-values.yaml")
    jobs = [kustomize(f)[0] for f in RAYJOB_FOLDERS]
    reads = _tls_key_reads(objs + jobs, "searchrl-tls")
    assert reads, "no pod reads the TLS Secret"
    missing = {label: sorted(keys - set(secret["data"])) for label, keys in reads.items() if keys - set(secret["data"])}
    if missing:
        proc = install_render([secret], "gpu-values.yaml")
        needed = sorted({k for keys in missing.values() for k in keys})
        assert proc.returncode != 0, (
            f"pods read {needed} from the TLS Secret, which `kubectl create secret tls` does not write, and the "
            f"install accepts such a Secret: {missing}"
        )
        assert all(k in proc.stderr for k in needed), proc.stderr
    # The documented Secret (cert-manager keys, or `kubectl create secret generic --type=kubernetes.io/tls` with
    # ca.crt) installs and has every key.
    full = kubectl_secret("generic", "searchrl-tls", "--type=kubernetes.io/tls", "--from-file=tls.crt",
                          "--from-file=tls.key", "--from-file=ca.crt",
                          files={"tls.crt": crt, "tls.key": key, "ca.crt": crt})  # fmt: skip
    assert all(keys <= set(full["data"]) for keys in reads.values())
    proc = install_render([full], "gpu-values.yaml")
    assert proc.returncode == 0, proc.stderr


def test_c3_the_certificate_names_cover_the_probes_and_the_clients(render, deploy_paths):
    """C3: the documented certificate DNS names (values.yaml, global.tls) cover the name each TLS probe checks and
    the host of every client target in the endpoints ConfigMap."""
    values = (deploy_paths["chart"] / "values.yaml").read_text()
    m = re.search(r"dnsNames:\s*\[([^\]]*)\]", values)
    assert m, "values.yaml documents no certificate dnsNames for global.tls"
    patterns = [n.strip().strip("\"'").replace("<namespace>", "searchrl") for n in m.group(1).split(",")]

    def covered(host: str) -> bool:
        for p in patterns:
            if p.startswith("*.") and "." in host and host.split(".", 1)[1] == p[2:]:
                return True
            if p == host:
                return True
        return False

    objs = render("gpu-values.yaml")
    names = [
        e["value"]
        for o in objs
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if e["name"] == "SEARCHRL_PROBE_SERVER_NAME"
    ]
    targets = [v for k, v in one(objs, "ConfigMap", "searchrl-endpoints")["data"].items() if k.endswith("_TARGET")]
    hosts = names + [t.removeprefix("dns:///").rsplit(":", 1)[0] for t in targets]
    assert names and targets
    assert [h for h in hosts if not covered(h)] == [], patterns


@pytest.mark.parametrize("layout", ["kubectl-create-secret-tls", "cert-manager", "ca-issued-without-ca.crt"])
def test_c3_the_rendered_tls_probe_against_a_tls_server(layout, render, deploy_paths, kubectl_secret, tmp_path,
                                                        self_signed_pair, certs, projected):  # fmt: skip
    """C3, stronger form: the reward Deployment's rendered exec probe, with its rendered environment, run against a
    loopback TLS ``searchrl serve reward`` whose files are laid out as the Secret would be projected: a self-signed
    ``kubectl create secret tls`` Secret (no ca.crt) and a cert-manager Secret pass; a CA-issued certificate without
    its ca.crt fails with a message, not a traceback."""
    names = ["*.searchrl.svc", "*.searchrl.svc.cluster.local", "127.0.0.1"]
    if layout == "kubectl-create-secret-tls":
        crt, key = self_signed_pair
        trust = crt
        secret = kubectl_secret("tls", "searchrl-tls", "--cert=tls.crt", "--key=tls.key",
                                files={"tls.crt": crt, "tls.key": key})  # fmt: skip
    else:
        ca = certs()
        crt, key = ca.issue(names)
        trust = ca.pem
        files = {"tls.crt": crt, "tls.key": key}
        if layout == "cert-manager":
            files["ca.crt"] = ca.pem
        secret = kubectl_secret("generic", "searchrl-tls", "--type=kubernetes.io/tls",
                                *[f"--from-file={n}" for n in files], files=files)  # fmt: skip
    objs = render("gpu-values.yaml")
    spec = one(objs, "Deployment", "searchrl-reward")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    vols = {v["name"]: v for v in spec["volumes"]}
    (tls_mount,) = [
        m for m in c["volumeMounts"] if vols[m["name"]].get("secret", {}).get("secretName") == "searchrl-tls"
    ]
    mounts = {
        tls_mount["mountPath"]: projected(secret, tmp_path / "tls", vols[tls_mount["name"]]["secret"].get("items"))
    }
    env = {e["name"]: remap(e["value"], mounts) for e in c["env"] if "value" in e}
    server_env = {k: v for k, v in env.items() if k.startswith("SEARCHRL_TLS_")}
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "/usr/local/bin/searchrl-healthcheck"], probe
    with ServiceProcess("reward", [], server_env, 120, root_ca=trust) as svc:
        args = [a if a != f"127.0.0.1:{env['SEARCHRL_GRPC_PORT']}" else svc.target for a in probe[2:]]
        run_env = {**os.environ, **env, "SEARCHRL_GRPC_PORT": str(svc.port)}
        proc = subprocess.run([sys.executable, str(deploy_paths["healthcheck"]), *args], env=run_env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    if layout == "ca-issued-without-ca.crt":
        assert proc.returncode == 2, proc.stderr
        assert "ca.crt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


# ================================================================================ C4 (#3): the encoder offline


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_c4_the_retriever_and_the_index_job_can_load_their_encoder(render, values):
    """C4: the retriever pods run offline (HF_HUB_OFFLINE=1) and get no ``--embedding-model`` that is neither bundled
    nor an absolute path (a chart-built index carries its encoder in <index-dir>/model, loaded from there); the
    index-build Job gets ``--allow-download`` and no forced offline mode when its model is not bundled."""
    objs = render(*values)
    dep = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "searchrl-retriever"]
    for d in dep:
        c = d["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("HF_HUB_OFFLINE") == "1", "the retriever must never try the Hub from the pod"
        for a in c["args"]:
            if a.startswith("--embedding-model="):
                model = a.split("=", 1)[1]
                assert model.lower() in BUNDLED_ENCODERS or model.startswith("/"), f"retriever cannot load {model}"
    for job in (o for o in objs if o["kind"] == "Job"):
        c = job["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        model = env["EMBEDDING_MODEL"]
        if model.lower() in BUNDLED_ENCODERS or model.startswith("/"):
            continue
        assert "--allow-download" in c["args"], f"the index Job cannot download {model}"
        assert env.get("HF_HUB_OFFLINE") != "1", f"the index Job forces offline mode for {model}"


# =============================================================================== C5 (#5): simulator GPUs

# GPU memory (MiB) per accelerator the node selectors can name.
GKE_ACCELERATOR_MIB = {
    "nvidia-l4": 23034, "nvidia-tesla-t4": 15360, "nvidia-tesla-a100": 40960, "nvidia-a100-80gb": 81920,
    "nvidia-h100-80gb": 81920, "nvidia-h100-mega-80gb": 81920, "nvidia-h200-141gb": 144384,
}  # fmt: skip
KARPENTER_FAMILY_MIB = {"g5": 24576, "g6": 23034, "g6e": 46068, "p4d": 40960, "p4de": 81920, "p5": 81920,
                        "p5e": 144384, "p5en": 144384}  # fmt: skip
# bf16 parameters of the models the values files name.
MODEL_PARAMS = {
    "Qwen/Qwen2.5-14B-Instruct": 14.77e9, "Qwen/Qwen2.5-7B-Instruct": 7.62e9, "Qwen/Qwen2.5-3B-Instruct": 3.09e9,
    "Qwen/Qwen2.5-32B-Instruct": 32.76e9,
}  # fmt: skip


def min_gpu_memory_mib(spec: dict[str, Any]) -> float | None:
    """Smallest per-GPU memory the pod's node affinity admits (None: nothing limits it)."""
    terms = (((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []  # fmt: skip
    if not terms:
        return None
    worst = float("inf")
    for term in terms:
        bound = None
        for e in term.get("matchExpressions", []):
            if e["key"] == "karpenter.k8s.aws/instance-gpu-memory" and e["operator"] == "Gt":
                bound = max(bound or 0, float(e["values"][0]) + 1)
            elif e["key"] == "cloud.google.com/gke-accelerator" and e["operator"] == "In":
                bound = max(bound or 0, min(GKE_ACCELERATOR_MIB[v] for v in e["values"]))
            elif e["key"] == "karpenter.k8s.aws/instance-family" and e["operator"] == "In":
                bound = max(bound or 0, min(KARPENTER_FAMILY_MIB[v] for v in e["values"]))
        if bound is None:
            return None
        worst = min(worst, bound)
    return worst


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_c5_vllm_uses_every_gpu_of_the_pod_and_the_model_fits(render, values):
    """C5: for ``--engine=vllm`` the tensor-parallel size in ``--vllm-kwargs`` equals the pod's GPU count, and the
    bf16 weights fit 90% of the GPU memory the node selector guarantees."""
    for d in (o for o in render(*values) if o["kind"] == "Deployment"):
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        if "--engine=vllm" not in (c.get("args") or []):
            continue
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        kwargs = [json.loads(a.split("=", 1)[1]) for a in c["args"] if a.startswith("--vllm-kwargs=")]
        env_kw = next((e.get("value") for e in c.get("env", []) if e["name"] == "SEARCHRL_SIMULATOR_VLLM_KWARGS"), None)
        tp = (kwargs[-1] if kwargs else json.loads(env_kw or "{}")).get("tensor_parallel_size", 1)
        assert tp == gpus, f"{d['metadata']['name']}: vLLM tensor_parallel_size {tp} on a pod with {gpus} GPUs"
        model = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--model="))
        assert model in MODEL_PARAMS, f"add {model} to MODEL_PARAMS"
        mib = min_gpu_memory_mib(spec)
        assert mib is not None, f"{d['metadata']['name']}: no GPU-memory node selector for {model}"
        need_gb, have_gb = MODEL_PARAMS[model] * 2 / 1e9, 0.9 * tp * mib * 2**20 / 1e9
        assert need_gb <= have_gb, f"{model}: {need_gb:.1f} GB of weights on {tp} x {mib:.0f} MiB"


def test_c5_simulator_parses_the_rendered_vllm_kwargs(render):
    """The simulator's own config parser reads the rendered flag (a JSON object with tensor_parallel_size)."""
    from searchrl.serving import config as cfgmod
    from searchrl.simulator.server import SimulatorConfig

    c = one(render("gpu-values.yaml"), "Deployment", "searchrl-simulator")["spec"]["template"]["spec"]["containers"][0]
    cfg = cfgmod.from_sources(SimulatorConfig, c["args"], {})
    assert json.loads(cfg.vllm_kwargs)["tensor_parallel_size"] == 2


# ============================================================ C6 (#6, #9): trainer metrics on the RayJob path


def module_file(name: str) -> Path | None:
    """The file of module ``name`` in the imported searchrl namespace (its path is the module name)."""
    for root in SOURCE_ROOTS:
        base = root / name.replace(".", "/")
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def package_dir(name: str) -> Path:
    init = module_file(name)
    assert init is not None and init.name == "__init__.py", f"{name} is not a package of the imported searchrl"
    return init.parent


def _imports(name: str, tree: ast.AST) -> set[str]:
    """Modules a module imports (anywhere, lazy imports included) or names as a string (dynamic imports)."""
    out: set[str] = set()
    pkg = name if module_file(name) and module_file(name).name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("searchrl."):
            out.add(node.value)
    return {m for m in out if m.startswith("searchrl")}


def reachable_modules(roots: set[str]) -> dict[str, ast.AST]:
    seen: dict[str, ast.AST] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            # "pkg.mod.Class" -> "pkg.mod"
            if "." in name and module_file(name.rsplit(".", 1)[0]) is not None:
                todo.append(name.rsplit(".", 1)[0])
            continue
        tree = ast.parse(path.read_text())
        seen[name] = tree
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += list(_imports(name, tree))
    return seen


def config_roots() -> set[str]:
    """Modules the RayJob presets name: tool classes, agent-loop targets, the reward function (pkg://)."""
    out = {"searchrl.trainer.rayjob_entrypoint"}
    for path in (package_dir("searchrl.trainer") / "config").rglob("*.yaml"):
        text = path.read_text()
        out |= set(re.findall(r"(?:class_name|_target_):\s*(searchrl\.[\w.]+)", text))
        out |= set(re.findall(r"pkg://(searchrl\.[\w.]+)", text))
    return out


def exporter_calls(metrics: set[str]) -> tuple[set[str], set[str]]:
    """``(definers, modules calling one)``: top-level classes/functions of the repository that start a Prometheus
    HTTP server (``start_http_server``) in a module declaring all of ``metrics`` (in the class or in a module-level
    table it reads), and the reachable modules that call one of them (outside the definition itself)."""
    definers: set[str] = set()
    for path in list(package_dir("searchrl.trainer").rglob("*.py")) + list(
        package_dir("searchrl.services").rglob("*.py")
    ):
        tree = ast.parse(path.read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        for node in tree.body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            calls = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
                     for n in ast.walk(node) if isinstance(n, ast.Call)}  # fmt: skip
            if "start_http_server" in calls and metrics <= literals:
                definers.add(node.name)
    callers: set[str] = set()
    for name, tree in reachable_modules(config_roots()).items():
        for node in tree.body if isinstance(tree, ast.Module) else []:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in definers:
                continue
            for n in ast.walk(node):
                if isinstance(n, ast.Call):
                    fn = n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
                    if fn in definers:
                        callers.add(name)
    return definers, callers


def _referenced_train_metrics(objs: list[dict[str, Any]], deploy_paths: dict[str, Path]) -> dict[str, set[str]]:
    sys.path.insert(0, str(ROOT / "deploy" / "scripts"))
    try:
        import promql_refs
    finally:
        sys.path.pop(0)
    refs: dict[str, set[str]] = {}
    for o in objs:
        if o["kind"] == "PrometheusRule":
            for g in o["spec"]["groups"]:
                for r in g["rules"]:
                    refs.setdefault("alerts", set()).update(promql_refs.metric_names(str(r["expr"])))
        if o["kind"] == "ScaledObject":
            for t in o["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    refs.setdefault(f"KEDA {o['metadata']['name']}", set()).update(
                        promql_refs.metric_names(t["metadata"]["query"])
                    )
    for path in (deploy_paths["chart"] / "files" / "dashboards").glob("*.json"):
        for _title, expr in promql_refs.dashboard_queries(path):
            refs.setdefault(path.name, set()).update(
                promql_refs.metric_names(promql_refs.substitute_grafana_vars(expr))
            )
    return {k: {promql_refs.family(m) for m in v if m.startswith("searchrl_train_")} for k, v in refs.items()}


def test_c6_trainer_metrics_read_by_keda_alerts_and_dashboards_are_exported_on_the_rayjob_path(render, deploy_paths):
    """C6: every ``searchrl_train_*`` family a KEDA trigger, an alert or a dashboard reads is declared by an exporter
    (a class/function starting a Prometheus HTTP server) that code reachable from the RayJob entrypoint and the
    modules its presets name actually starts."""
    objs = render("gpu-values.yaml") + render()
    refs = _referenced_train_metrics(objs, deploy_paths)
    wanted = set().union(*refs.values())
    assert wanted, refs
    definers, callers = exporter_calls(wanted)
    assert definers, f"no exporter declares {sorted(wanted)}"
    assert callers, (
        f"nothing reachable from searchrl.trainer.rayjob_entrypoint starts {sorted(definers)}: {refs} stay empty on "
        "the RayJob path"
    )


def test_c6_the_podmonitor_scrapes_every_rayjob_pod_on_its_metrics_port(render, rayjobs):
    """#9: verl's driver and TaskRunner may run on the head or a worker: the PodMonitor selects every RayJob pod,
    and each declares the port it scrapes (9095, SEARCHRL_METRICS_PORT)."""
    (podmon,) = [o for o in render("gpu-values.yaml") if o["kind"] == "PodMonitor"]
    selector = podmon["spec"]["selector"]["matchLabels"]
    port = podmon["spec"]["podMetricsEndpoints"][0]["port"]
    for job in rayjobs.values():
        for label, tmpl in pod_templates(job)[:-1]:
            labels = tmpl["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{label}: the PodMonitor ({selector}) does not select it"
            c = tmpl["spec"]["containers"][0]
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert port in ports, f"{label}: no port {port!r}"
            assert str(ports[port]) == env.get("SEARCHRL_METRICS_PORT"), label


def test_c6_a_service_scaled_to_zero_is_woken_by_its_clients(render, rayjobs):
    """#6: a ScaledObject with minReplicaCount 0 needs a trigger that fires while a client runs and the service has
    no pod: a kubernetes-workload trigger selecting the RayJob heads (or policy pods) that search it. Prometheus
    triggers on the services' own metrics cannot wake them (no pod, no series)."""
    objs = render("gpu-values.yaml")
    backends = {"searchrl-simulator": "simulator", "searchrl-retriever": "retriever"}
    for so in (o for o in objs if o["kind"] == "ScaledObject" and o["spec"]["minReplicaCount"] == 0):
        target = so["spec"]["scaleTargetRef"]["name"]
        clients = [
            (label, tmpl["metadata"]["labels"])
            for job in rayjobs.values()
            for label, tmpl in pod_templates(job)
            if yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"].get("SEARCHRL_SEARCH_BACKEND")
            == backends.get(target)
        ]
        assert clients, f"no RayJob searches {target}"
        woken = [
            t
            for t in so["spec"]["triggers"]
            if t["type"] == "kubernetes-workload"
            and any(label_selector_matches(t["metadata"]["podSelector"], labels) for _label, labels in clients)
        ]
        assert woken, f"{target} scales to zero and no trigger selects the RayJob pods that search it"


# ============================================================================ C7 (#7), C8 (#11): volumes


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_c7_no_readwritemany_claim_on_the_default_storage_class(render, values):
    """C7: a ReadWriteMany claim without storageClassName stays Pending on EKS/GKE/AKS defaults (block storage)."""
    bad = [
        o["metadata"]["name"]
        for o in render(*values)
        if o["kind"] == "PersistentVolumeClaim"
        and "ReadWriteMany" in o["spec"]["accessModes"]
        and not o["spec"].get("storageClassName")
    ]
    assert not bad, f"ReadWriteMany on the default StorageClass: {bad}"


def test_c7_the_chart_refuses_readwritemany_without_a_class(render):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(trainer={"checkpoints": {"accessModes": ["ReadWriteMany"], "storageClass": ""}})
    assert "storageClass" in err.value.stderr


def max_replicas(objs: list[dict[str, Any]], dep: dict[str, Any]) -> int:
    name = dep["metadata"]["name"]
    n = int(dep["spec"].get("replicas", 1))
    for o in objs:
        if o["kind"] == "HorizontalPodAutoscaler" and o["spec"]["scaleTargetRef"]["name"] == name:
            n = max(n, int(o["spec"]["maxReplicas"]))
        if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == name:
            n = max(n, int(o["spec"].get("maxReplicaCount", 100)))
    return n


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_c8_no_readwriteonce_claim_is_shared_by_scaled_replicas(render, values):
    """C8: a Deployment mounting a ReadWriteOnce claim must not run more than one pod (Multi-Attach on other nodes)."""
    objs = render(*values)
    claims = {o["metadata"]["name"]: o["spec"]["accessModes"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    bad = []
    for dep in (o for o in objs if o["kind"] == "Deployment"):
        for v in dep["spec"]["template"]["spec"].get("volumes", []):
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            modes = claims.get(claim or "", [])
            if modes and not {"ReadWriteMany", "ReadOnlyMany"} & set(modes) and max_replicas(objs, dep) > 1:
                bad.append((dep["metadata"]["name"], claim, modes, max_replicas(objs, dep)))
    assert not bad, f"ReadWriteOnce claims on Deployments that scale past one pod: {bad}"


def test_c8_the_chart_refuses_a_scaled_readwriteonce_cache(render):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render("gpu-values.yaml", simulator__modelCache__persistence__accessModes=["ReadWriteOnce"])
    assert "Multi-Attach" in err.value.stderr


# ================================================================================ C9 (#12): connection age


def test_c9_servers_recycle_connections_so_scale_out_reaches_running_clients(render):
    """C9: with the environment the chart renders, every service's gRPC server options set a finite maximum
    connection age (clients then re-resolve the headless Service and reach pods added by HPA/KEDA)."""
    from searchrl.serving import config as cfgmod
    from searchrl.serving import runtime

    for dep in (o for o in render("gpu-values.yaml") if o["kind"] == "Deployment"):
        name = dep["metadata"]["name"]
        if dep["metadata"]["labels"].get("app.kubernetes.io/component") not in ("reward", "retriever", "simulator",
                                                                                 "policy"):  # fmt: skip
            continue
        env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
        cfg = cfgmod.from_sources(runtime.ServerConfig, {}, env)
        options = dict(runtime.server_options(cfg))
        age = options.get("grpc.max_connection_age_ms")
        assert age and 0 < age <= 600_000, f"{name}: grpc.max_connection_age_ms = {age}"
        assert options.get("grpc.max_connection_age_grace_ms", 0) > 0, name


# ========================================================================= C10 (#13): resumable index builds


FAKE_SEARCHRL = """#!/bin/sh
# Stands in for `searchrl index build` in the Job's script: records whether a shard from an earlier attempt is
# there, writes one, and fails on the first attempt (an OOM kill, an eviction).
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--out" ]; then out="$2"; shift; fi
  shift
done
mkdir -p "$out/embeddings"
if [ -f "$out/embeddings/shard-00000.npy" ]; then echo resumed >> "$LOG"; else echo fresh >> "$LOG"; fi
echo data > "$out/embeddings/shard-00000.npy"
if [ ! -f "$STATE/failed-once" ]; then touch "$STATE/failed-once"; exit 137; fi
echo '{"ok": true}' > "$out/manifest.json"
"""


def _run_index_job(job: dict[str, Any], index_root: Path, bin_dir: Path, state: Path) -> subprocess.CompletedProcess:
    c = job["spec"]["template"]["spec"]["containers"][0]
    (mount,) = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "index"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for k, v in env.items():
        if v == mount or v.startswith(mount + "/"):
            env[k] = str(index_root) + v[len(mount) :]
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(state / "log"), "STATE": str(state)})
    assert c["command"][:2] == ["sh", "-ec"]
    # The index volume is mounted at `mount` in the pod; here its stand-in folder takes that place in the script too.
    script = re.sub(rf"(?<![\w/]){re.escape(mount)}(?=[/\"\s]|$)", str(index_root), c["args"][0])
    assert mount not in script.replace(str(index_root), ""), "the script still names the pod's mount path"
    return subprocess.run(["sh", "-ec", script, *c["args"][1:]], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("force", [False, True], ids=["default", "force"])
def test_c10_a_retried_index_job_resumes_its_build(render, tmp_path, force):
    """C10: the rendered Job script, run twice (a failed attempt, then the retry kubelet makes), with a stand-in
    ``searchrl`` that fails midway on the first attempt: the retry finds the first attempt's shards (even with
    force, which starts over once per Job, not on every retry) and finishes into the directory the retriever
    serves."""
    (job,) = [o for o in render(retriever={"indexBuild": {"force": force}}) if o["kind"] == "Job"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "searchrl").write_text(FAKE_SEARCHRL)
    (bin_dir / "searchrl").chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    index_root = tmp_path / "index"
    index_root.mkdir()
    first = _run_index_job(job, index_root, bin_dir, state)
    assert first.returncode != 0, "the stand-in fails the first attempt"
    second = _run_index_job(job, index_root, bin_dir, state)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (state / "log").read_text().split() == ["fresh", "resumed"], "the retry started the build over"
    dep = next(o for o in render(retriever={"indexBuild": {"force": force}}) if o["kind"] == "Deployment"
               and o["metadata"]["name"] == "searchrl-retriever")  # fmt: skip
    (served,) = [a.split("=", 1)[1] for a in dep["spec"]["template"]["spec"]["containers"][0]["args"]
                 if a.startswith("--index-dir=")]  # fmt: skip
    assert (index_root / served.removeprefix("/index/") / "manifest.json").is_file()


# ===================================================================== C11 (#14): no password in the start-up log


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


@pytest.mark.parametrize("values", [(), ("external-redis-values.yaml",)], ids=["bundled-redis", "external-redis"])
def test_c11_the_redis_password_never_reaches_the_startup_log(render, values):
    """C11: with the rendered environment (the password from its Secret, a canary with URL-reserved characters),
    ``redacted(config)`` (what every service logs at start-up) does not contain it, and the service still gets it."""
    from searchrl.serving import config as cfgmod
    from searchrl.serving import runtime

    canary = "Canary#p%w?d/42"
    dep = one(render(*values), "Deployment", "searchrl-reward")
    env: dict[str, str] = {}
    for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            env[e["name"]] = _expand(e["value"], env)
        elif "secretKeyRef" in e.get("valueFrom", {}) and "REDIS" in e["name"]:
            env[e["name"]] = canary
    assert "SEARCHRL_REDIS_URL" in env
    cfg = cfgmod.from_sources(runtime.ServerConfig, {}, env)
    logged = json.dumps(cfgmod.redacted(cfg), default=str)
    assert canary not in logged and "Canary" not in logged, logged
    assert getattr(cfg, "redis_password", None) == canary or canary in cfg.redis_url, "the password is lost"


# ============================================================================ C12 (#15): no eviction mid-run

DO_NOT_DISRUPT = {"karpenter.sh/do-not-disrupt": "true", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_c12_ray_pods_and_batch_pods_are_not_evicted_by_consolidation(render, rayjobs, values):
    """C12: Ray head/worker (and submitter) pod templates and Job pod templates carry both annotations."""
    bad = []
    for obj in list(rayjobs.values()) + [o for o in render(*values) if o["kind"] == "Job"]:
        for label, tmpl in pod_templates(obj):
            ann = (tmpl.get("metadata") or {}).get("annotations") or {}
            if not DO_NOT_DISRUPT.items() <= ann.items():
                bad.append(label)
    assert not bad, f"evictable by Karpenter consolidation / cluster-autoscaler scale-down: {bad}"


# ============================================================================ C14 (#17): alert thresholds


def latency_buckets() -> tuple[float, ...]:
    """``searchrl.serving.runtime.LATENCY_BUCKETS_S``, or the buckets= literal of the histogram in its source."""
    try:
        from searchrl.serving.runtime import LATENCY_BUCKETS_S

        return tuple(float(b) for b in LATENCY_BUCKETS_S)
    except ImportError:
        src = (module_file("searchrl.serving.runtime") or Path("missing")).read_text()
        m = re.search(r'"searchrl_grpc_request_duration_seconds".*?buckets=\(([^)]*)\)', src, re.S)
        if not m:
            pytest.fail(
                "cannot find the buckets of searchrl_grpc_request_duration_seconds in searchrl/serving/runtime.py"
            )
        return tuple(float(x) for x in m.group(1).split(",") if x.strip())


@pytest.mark.parametrize("values", ALL_VALUES, ids=VALUES_IDS)
def test_c14_p99_thresholds_are_below_the_highest_finite_bucket(render, values):
    """C14: histogram_quantile never returns more than the highest finite bucket, so a threshold at or above it can
    never fire."""
    top = max(b for b in latency_buckets() if b != float("inf"))
    (rule,) = [o for o in render(*values) if o["kind"] == "PrometheusRule"]
    bad = []
    for g in rule["spec"]["groups"]:
        for r in g["rules"]:
            if r.get("alert") == "SearchRLHighP99Latency":
                threshold = float(str(r["expr"]).rsplit(">", 1)[1])
                if threshold >= top:
                    bad.append((r["labels"].get("service"), threshold))
    assert not bad, f"p99 thresholds at or above the top finite bucket ({top} s): {bad}"
