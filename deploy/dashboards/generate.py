#!/usr/bin/env python3
"""Generates the searchrl Grafana dashboards with grafana-foundation-sdk (Grafana's typed dashboard builders).

Writes ``deploy/helm/searchrl/files/dashboards/searchrl-services.json`` (golden signals of every gRPC service plus the
search cache, retriever, simulator, policy and reward panels) and ``searchrl-training.json`` (reward, F1, searches per
episode, noisy-document share, KL, step time by phase, guard rails). The chart ships them as ConfigMaps labelled for
the Grafana sidecar. Every PromQL query uses only metrics the services and the trainer export; the deploy tests
check that against the real services' /metrics and ``promtool`` parses every query.

usage: python deploy/dashboards/generate.py [--out DIR] [--check]
  --check: exit 1 when the files on disk differ from what the code generates (CI drift check).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh, VariableSort

OUT = Path(__file__).resolve().parents[1] / "helm" / "searchrl" / "files" / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace="$namespace"'
RATE = "$__rate_interval"


def _ds_variable() -> dashboard.DatasourceVariable:
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def _query_variable(name: str, label: str, query: str, multi: bool = False) -> dashboard.QueryVariable:
    var = (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    if multi:
        var = var.multi(True).include_all(True)
    return var


def _q(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _ts(title: str, unit: str, *queries: prometheus.Dataquery, desc: str = "", span: int = 12) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .height(8)
        .span(span)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(
            common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if desc:
        panel = panel.description(desc)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def _stat(title: str, unit: str, query: prometheus.Dataquery, desc: str = "", span: int = 6) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .height(4)
        .span(span)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .with_target(query)
    )
    return panel.description(desc) if desc else panel


def services_dashboard() -> dashboard.Dashboard:
    """Golden signals (traffic, errors, latency, saturation) of the gRPC services and their own metrics."""
    svc = f'{NS}, service=~"$service"'
    d = (
        dashboard.Dashboard("searchrl / services")
        .uid("searchrl-services")
        .description("searchrl gRPC services: golden signals, search cache, retriever, simulator, policy, reward.")
        .tags(["searchrl"])
        .refresh("30s")
        .time("now-3h", "now")
        .timezone("browser")
        .with_variable(_ds_variable())
        .with_variable(_query_variable("namespace", "Namespace", "label_values(searchrl_service_serving, namespace)"))
        .with_variable(
            _query_variable(
                "service", "Service", 'label_values(searchrl_service_serving{namespace="$namespace"}, service)', True
            )
        )
    )
    d = d.with_row(dashboard.Row("Golden signals"))
    d = d.with_panel(
        _stat(
            "Serving pods",
            "none",
            _q(f"sum by (service) (searchrl_service_serving{{{svc}}})", "{{service}}"),
            "Pods whose health check reports SERVING.",
            span=12,
        )
    )
    d = d.with_panel(
        _stat(
            "In-flight requests",
            "none",
            _q(f"sum by (service) (searchrl_grpc_in_flight_requests{{{svc}}})", "{{service}}"),
            "Calls being served right now.",
            span=12,
        )
    )
    d = d.with_panel(
        _ts(
            "Requests / s by method",
            "reqps",
            _q(
                f"sum by (service, method) (rate(searchrl_grpc_requests_total{{{svc}}}[{RATE}]))",
                "{{service}} {{method}}",
            ),
            desc="Traffic: completed calls per second.",
        )
    )
    d = d.with_panel(
        _ts(
            "Error ratio",
            "percentunit",
            _q(
                f'sum by (service) (rate(searchrl_grpc_requests_total{{{svc}, code!="OK"}}[{RATE}]))'
                f" / sum by (service) (rate(searchrl_grpc_requests_total{{{svc}}}[{RATE}]))",
                "{{service}}",
            ),
            desc="Errors: share of calls that did not end with OK (all status codes).",
        )
    )
    d = d.with_panel(
        _ts(
            "Latency p50 / p99",
            "s",
            _q(
                f"histogram_quantile(0.5, sum by (service, le) (rate(searchrl_grpc_request_duration_seconds_bucket{{{svc}}}[{RATE}])))",
                "p50 {{service}}",
            ),
            _q(
                f"histogram_quantile(0.99, sum by (service, le) (rate(searchrl_grpc_request_duration_seconds_bucket{{{svc}}}[{RATE}])))",
                "p99 {{service}}",
                "B",
            ),
            desc="Latency of calls, from the server's histogram.",
        )
    )
    d = d.with_panel(
        _ts(
            "Calls by status code",
            "reqps",
            _q(
                f'sum by (service, code) (rate(searchrl_grpc_requests_total{{{svc}, code!="OK"}}[{RATE}]))',
                "{{service}} {{code}}",
            ),
            desc="Non-OK calls per second by gRPC status code.",
        )
    )
    d = d.with_row(dashboard.Row("Search cache (Redis)"))
    d = d.with_panel(
        _ts(
            "Cache hit ratio",
            "percentunit",
            _q(
                f'sum by (backend) (rate(searchrl_search_cache_requests_total{{{NS}, result="hit"}}[{RATE}]))'
                f" / sum by (backend) (rate(searchrl_search_cache_requests_total{{{NS}}}[{RATE}]))",
                "{{backend}}",
            ),
            desc="Share of searches answered from the Redis search cache.",
        )
    )
    d = d.with_panel(
        _ts(
            "Cache lookups / s",
            "ops",
            _q(
                f"sum by (backend, result) (rate(searchrl_search_cache_requests_total{{{NS}}}[{RATE}]))",
                "{{backend}} {{result}}",
            ),
        )
    )
    d = d.with_row(dashboard.Row("Retriever"))
    d = d.with_panel(
        _ts(
            "Micro-batch size p50 / p99",
            "none",
            _q(
                f"histogram_quantile(0.5, sum by (le) (rate(searchrl_retriever_batch_size_bucket{{{NS}}}[{RATE}])))",
                "p50",
            ),
            _q(
                f"histogram_quantile(0.99, sum by (le) (rate(searchrl_retriever_batch_size_bucket{{{NS}}}[{RATE}])))",
                "p99",
                "B",
            ),
            desc="Queries encoded and searched together.",
        )
    )
    d = d.with_panel(
        _ts(
            "Stage latency p99",
            "s",
            _q(
                f"histogram_quantile(0.99, sum by (stage, le) (rate(searchrl_retriever_stage_seconds_bucket{{{NS}}}[{RATE}])))",
                "{{stage}}",
            ),
            desc="Where retrieval time goes (embedding, FAISS search, ...).",
        )
    )
    d = d.with_row(dashboard.Row("Simulated search (ZeroSearch)"))
    d = d.with_panel(
        _ts(
            "Documents / s by quality",
            "ops",
            _q(f"sum by (quality) (rate(searchrl_simulator_documents_total{{{NS}}}[{RATE}]))", "{{quality}}"),
            desc="Useful vs noisy simulated documents.",
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Engine tokens / s",
            "none",
            _q(f"sum(rate(searchrl_simulator_engine_tokens_total{{{NS}}}[{RATE}]))", "tokens/s"),
            desc="Tokens the simulation LLM generates: its cost.",
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Noise probability",
            "percentunit",
            _q(f"max(searchrl_simulator_noise_probability{{{NS}}})", "p(noisy)"),
            desc="Curriculum: probability of a noisy document set at the current step.",
            span=8,
        )
    )
    d = d.with_row(dashboard.Row("Policy"))
    d = d.with_panel(
        _ts(
            "Generated tokens / s",
            "none",
            _q(f"sum(rate(searchrl_policy_generated_tokens_total{{{NS}}}[{RATE}]))", "tokens/s"),
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Searches / s",
            "ops",
            _q(
                f"sum by (backend, outcome) (rate(searchrl_policy_searches_total{{{NS}}}[{RATE}]))",
                "{{backend}} {{outcome}}",
            ),
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Episodes / s by finish reason",
            "ops",
            _q(f"sum by (finish_reason) (rate(searchrl_policy_episodes_total{{{NS}}}[{RATE}]))", "{{finish_reason}}"),
            span=8,
        )
    )
    d = d.with_row(dashboard.Row("Reward"))
    d = d.with_panel(
        _ts(
            "Scored / s",
            "ops",
            _q(
                f"sum by (scheme, format_ok) (rate(searchrl_reward_scored_total{{{NS}}}[{RATE}]))",
                "{{scheme}} format_ok={{format_ok}}",
            ),
            span=24,
        )
    )
    return d


def training_dashboard() -> dashboard.Dashboard:
    """GRPO training progress from the trainer's gauges (served on port 9095 of the trainer / Ray head)."""
    run = f'{NS}, pod=~"$pod"'
    d = (
        dashboard.Dashboard("searchrl / training")
        .uid("searchrl-training")
        .description(
            "GRPO training: reward, F1, searches per episode, noisy-document share, KL, step time, guard rails."
        )
        .tags(["searchrl"])
        .refresh("30s")
        .time("now-12h", "now")
        .timezone("browser")
        .with_variable(_ds_variable())
        .with_variable(_query_variable("namespace", "Namespace", "label_values(searchrl_train_step, namespace)"))
        .with_variable(
            _query_variable(
                "pod", "Trainer pod", 'label_values(searchrl_train_step{namespace="$namespace"}, pod)', True
            )
        )
    )
    d = d.with_row(dashboard.Row("Progress"))
    d = d.with_panel(_stat("Step", "none", _q(f"max by (pod) (searchrl_train_step{{{run}}})", "{{pod}}")))
    d = d.with_panel(
        _stat("Reward (mean)", "none", _q(f"avg by (pod) (searchrl_train_reward_mean{{{run}}})", "{{pod}}"))
    )
    d = d.with_panel(
        _stat("F1 (mean)", "percentunit", _q(f"avg by (pod) (searchrl_train_f1_mean{{{run}}})", "{{pod}}"))
    )
    d = d.with_panel(
        _stat(
            "Guards tripped",
            "none",
            _q(f"sum by (guard) (searchrl_train_guard_tripped{{{run}}})", "{{guard}}"),
            "reward_collapse, no_search, kl_explosion and search_failure: 1 when tripped on the last step.",
        )
    )
    d = d.with_row(dashboard.Row("Learning"))
    d = d.with_panel(
        _ts(
            "Reward and F1",
            "none",
            _q(f"searchrl_train_reward_mean{{{run}}}", "reward {{pod}}"),
            _q(f"searchrl_train_f1_mean{{{run}}}", "F1 {{pod}}", "B"),
            desc="Mean episode reward (F1 + format rules) and answer F1 of each step.",
        )
    )
    d = d.with_panel(
        _ts(
            "Searches per episode",
            "none",
            _q(f"searchrl_train_searches_per_episode{{{run}}}", "{{pod}}"),
            desc="0 for long: the tool-call parser or the search backend is broken (alert SearchRLNoSearches).",
        )
    )
    d = d.with_panel(
        _ts(
            "Failed searches",
            "percentunit",
            _q(f"searchrl_train_search_failure_ratio{{{run}}}", "{{pod}}"),
            desc="Share of the last step's searches that failed or timed out (alert SearchRLSearchFailures; the "
            "trainer stops past SEARCHRL_MAX_SEARCH_FAILURE_RATIO).",
        )
    )
    d = d.with_panel(
        _ts(
            "Noisy-document share",
            "percentunit",
            _q(f"searchrl_train_noisy_share{{{run}}}", "{{pod}}"),
            desc="Share of searches answered with noisy simulated documents (ZeroSearch curriculum).",
        )
    )
    d = d.with_panel(
        _ts(
            "KL to the reference",
            "none",
            _q(f"searchrl_train_kl{{{run}}}", "{{pod}}"),
            desc="Mean per-token KL (nats); alert SearchRLKLExplosion above the threshold.",
        )
    )
    d = d.with_row(dashboard.Row("Time"))
    d = d.with_panel(
        _ts(
            "Step time by phase",
            "s",
            _q(f"searchrl_train_step_seconds{{{run}}}", "{{phase}} {{pod}}"),
            desc="Seconds of the last step in rollout, reward, update and in total.",
        )
    )
    d = d.with_panel(
        _ts(
            "Trainer idle share and episodes per second",
            "none",
            _q(f"searchrl_train_idle_share{{{run}}}", "idle share {{pod}}"),
            _q(f"searchrl_train_episodes_per_second{{{run}}}", "episodes/s {{pod}}", "B"),
            desc="Share of a step the trainer did not spend updating (sampling, waiting for rollout groups, pushing "
            "weights), and episodes trained per second.",
        )
    )
    d = d.with_row(dashboard.Row("Asynchronous rollouts (rollout.mode=async)"))
    d = d.with_panel(
        _ts(
            "Stream lag",
            "none",
            _q(f"searchrl_train_stream_lag{{{run}}}", "{{pod}}"),
            desc="Tasks not started + tasks being sampled + groups not yet read by the trainer.",
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Group age",
            "s",
            _q(f"searchrl_train_group_age_seconds{{{run}}}", "{{pod}}"),
            desc="Seconds from a task's creation to the update that trained its group; growing: the workers fall "
            "behind (alert SearchRLRolloutLagGrowing).",
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Policy lag and stale groups",
            "none",
            _q(f"searchrl_train_group_age_versions{{{run}}}", "versions {{pod}}"),
            _q(f"searchrl_train_stale_groups{{{run}}}", "stale groups {{pod}}", "B"),
            desc="Mean versions between the sampling weights and the trained weights (at most rollout.max_staleness), "
            "and groups skipped as too stale so far.",
            span=8,
        )
    )
    # The rollout workers (chart: rolloutWorker) are scraped by the trainer PodMonitor; not filtered by $pod, which
    # lists the trainer's pods.
    d = d.with_panel(
        _ts(
            "Rollout workers: idle share",
            "percentunit",
            _q(f"searchrl_worker_idle_share{{{NS}}}", "{{pod}}"),
            desc="Share of each rollout worker's life with no task in hand. High on every worker: the trainer feeds "
            "fewer tasks than the workers could sample (more workers than it needs).",
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Rollout workers: groups and episodes per second",
            "reqps",
            _q(f"sum(rate(searchrl_worker_groups_total{{{NS}}}[5m]))", "groups/s"),
            _q(f"sum(rate(searchrl_worker_episodes_total{{{NS}}}[5m]))", "episodes/s", "B"),
            _q(f"sum(rate(searchrl_worker_regenerated_groups_total{{{NS}}}[5m]))", "regenerated groups/s", "C"),
            desc="Summed over the workers. Regenerated: groups sampled again because the weights changed in the "
            "middle of the group (a group never mixes two policy versions).",
            span=8,
        )
    )
    d = d.with_panel(
        _ts(
            "Rollout workers: tasks in flight",
            "none",
            _q(f"searchrl_worker_tasks_in_flight{{{NS}}}", "{{pod}}"),
            desc="Tasks each worker is sampling now (at most rollout.queue.groups_in_flight).",
            span=8,
        )
    )
    return d


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    out = {}
    for name, builder in (
        ("searchrl-services.json", services_dashboard()),
        ("searchrl-training.json", training_dashboard()),
    ):
        model = builder.build()
        out[name] = json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print("stale dashboards (run python deploy/dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
