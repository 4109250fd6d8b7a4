"""Every metric the Grafana dashboards and the alert rules read is one the real services and trainer export.

Each service runs as a real ``searchrl serve <name>`` process (the CPU defaults: bundled SmolLM2-135M-Instruct,
all-MiniLM-L6-v2 over a small corpus); its ``/metrics`` endpoint is scraped over HTTP and parsed with
prometheus_client's parser. A metric family appears in the exposition (``# TYPE``) as soon as the process defines it,
even before its first observation, so no traffic is needed to compare names. The trainer's gauges are served by
``searchrl.trainer.telemetry.TrainerGauges`` on a port, as on the Ray head (9095).
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from searchrl.testing import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "scripts"))
import promql_refs  # noqa: E402

sys.path.pop(0)

DASHBOARDS = sorted((ROOT / "deploy" / "helm" / "searchrl" / "files" / "dashboards").glob("*.json"))
SERVER_MODULES = {
    "reward": "searchrl.services.reward.server",
    "retriever": "searchrl.retriever.server",
    "simulator": "searchrl.simulator.server",
    "policy": "searchrl.services.policy.server",
}
# Series every gRPC service exports (searchrl/serving/runtime.py).
COMMON = {"searchrl_grpc_requests_total", "searchrl_grpc_request_duration_seconds_bucket", "searchrl_grpc_in_flight_requests",
          "searchrl_grpc_max_in_flight_requests", "searchrl_service_serving"}  # fmt: skip
# Prefix -> who exports it. The search cache counter comes from the services that search (retriever, simulator).
OWNERS = {
    "searchrl_train_": "trainer",
    "searchrl_retriever_": "retriever",
    "searchrl_simulator_": "simulator",
    "searchrl_policy_": "policy",
    "searchrl_reward_": "reward",
    "searchrl_search_cache_": "retriever",
    "searchrl_worker_": "rollout-worker",
}
NOT_OURS = {"up"}  # Prometheus' own scrape series


def _rules(render) -> dict:
    (rule,) = [o for o in render() if o["kind"] == "PrometheusRule"]
    return rule


def referenced(render) -> set[str]:
    """Series names read by the dashboards and the rendered alert rules."""
    names: set[str] = set()
    for path in DASHBOARDS:
        for _title, expr in promql_refs.dashboard_queries(path):
            names |= promql_refs.metric_names(promql_refs.substitute_grafana_vars(expr))
    for group in _rules(render)["spec"]["groups"]:
        for rule in group["rules"]:
            names |= promql_refs.metric_names(str(rule["expr"]))
    return names - NOT_OURS


def owner(series: str) -> str:
    if series in COMMON:
        return "every service"
    for prefix, who in OWNERS.items():
        if series.startswith(prefix):
            return who
    return "unknown"


def exported_series(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names a /metrics exposition can carry (by family type), and label names seen per series."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}  # fmt: skip
    for fam in text_string_to_metric_families(text):
        names |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
        for sample in fam.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def service_metrics(tiny_index) -> Iterator[dict[str, tuple[set[str], dict[str, set[str]]] | str]]:
    """service -> (series, labels) from its live /metrics, or the reason it could not run."""
    out: dict[str, tuple[set[str], dict[str, set[str]]] | str] = {}
    todo: dict[str, list[str]] = {}
    for svc, module in SERVER_MODULES.items():
        if importlib.util.find_spec(module) is None:
            out[svc] = f"{module} does not exist yet"
        elif svc == "retriever":
            todo[svc] = ["--index-dir", str(tiny_index), "--http-port", "-1"]
        else:
            todo[svc] = []
    # Start them side by side: each spends most of its start-up loading a model.
    with ThreadPoolExecutor(max_workers=len(todo) or 1) as pool:
        futures = {svc: pool.submit(ServiceProcess, svc, args, None, 300) for svc, args in todo.items()}
        procs = {}
        errors = []
        for svc, fut in futures.items():
            try:
                procs[svc] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported below, after every process is accounted for
                errors.append(f"{svc}: {exc}")
    try:
        assert not errors, "\n".join(errors)
        for svc, proc in procs.items():
            out[svc] = exported_series(scrape(proc.metrics_port))
        yield out
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def trainer_exposition() -> str:
    if importlib.util.find_spec("searchrl.trainer.telemetry") is None:
        pytest.skip("searchrl.trainer.telemetry does not exist yet")
    from searchrl.trainer.telemetry import TrainerGauges

    gauges = TrainerGauges(port=free_port())
    try:
        return scrape(gauges.port)
    finally:
        gauges.close()


def test_every_referenced_metric_has_an_owner(render):
    refs = referenced(render)
    assert len(refs) >= 20
    unknown = sorted(r for r in refs if owner(r) == "unknown")
    assert not unknown, f"dashboards/alerts read metrics no searchrl component defines: {unknown}"


@pytest.mark.slow
@pytest.mark.parametrize("svc", list(SERVER_MODULES))
def test_service_exports_what_dashboards_and_alerts_read(render, service_metrics, svc):
    got = service_metrics[svc]
    if isinstance(got, str):
        pytest.skip(got)
    series, _labels = got
    wanted = {r for r in referenced(render) if owner(r) in (svc, "every service")}
    missing = sorted(wanted - series)
    assert not missing, (
        f"{svc} does not export {missing} (it exports {sorted(s for s in series if s.startswith('searchrl_'))})"
    )


def test_trainer_exports_what_dashboards_and_alerts_read(render, trainer_exposition):
    trainer_text = trainer_exposition
    series, labels = exported_series(trainer_text)
    wanted = {r for r in referenced(render) if owner(r) == "trainer"}
    assert wanted, "the training dashboard reads trainer metrics"
    missing = sorted(wanted - series)
    assert not missing, f"the trainer does not export {missing}"
    # The labels the panels and alerts select on exist on the trainer's series, with the guard names the alerts use.
    assert labels["searchrl_train_step_seconds"] == {"phase"}
    assert labels["searchrl_train_guard_tripped"] == {"guard"}
    exprs = " ".join(str(r["expr"]) for g in _rules(render)["spec"]["groups"] for r in g["rules"])
    for guard in ("reward_collapse", "no_search", "kl_explosion"):
        assert f'guard="{guard}"' in exprs
        assert f'guard="{guard}"' in trainer_text


def test_rollout_worker_exports_what_dashboards_read(render):
    """#16: the worker panels read the series a `searchrl rollout-worker` serves on --metrics-port."""
    from prometheus_client import generate_latest

    from searchrl.trainer.rollout_worker import WorkerMetrics

    series, _labels = exported_series(generate_latest(WorkerMetrics().registry).decode())
    wanted = {r for r in referenced(render) if owner(r) == "rollout-worker"}
    assert {"searchrl_worker_idle_share", "searchrl_worker_groups_total"} <= wanted
    missing = sorted(wanted - series)
    assert not missing, f"the rollout worker does not export {missing}"


def test_a_wrong_metric_name_would_be_caught(trainer_exposition):
    series, _ = exported_series(trainer_exposition)
    assert "searchrl_train_reward_mean" in series
    assert "searchrl_train_rewards_mean" not in series
