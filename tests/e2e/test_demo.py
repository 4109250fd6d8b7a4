"""The demo at its smallest size through the real stack: report numbers agree with MLflow; a rerun resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "searchrl", "demo", "--size", "tiny", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1500)


# Two demo runs; on a fresh machine the first also converts the policy model and builds the wiki index while the
# other xdist worker loads the cores, which took longer than the suite's 600 s default.
@pytest.mark.timeout(2400)
def test_tiny_demo_report_matches_mlflow_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _demo(out, "--steps", "1")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["final_step"] == 1
    # failed searches are counted per step; the run was not stopped by the search-failure guard (or any other)
    assert report["stopped_by"] is None and report["guard_events"] == [], report["guard_events"]
    assert all("rollout/search_failures" in h for h in report["training"])
    assert (out / "report" / "report.md").exists() and (out / "report" / "curves.png").stat().st_size > 0
    # #17: the report counts the supervisor's restarts of each service (none in a healthy run)
    assert set(report["service_restarts"]) >= {"retriever", "policy", "reward"}
    assert not any(report["service_restarts"].values()), report["service_restarts"]
    assert "Service restarts during the run" in (out / "report" / "report.md").read_text()

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=report["mlflow_tracking_uri"])
    run = client.get_run(report["train_run_id"])
    last = report["training"][-1]
    for key in ("reward/mean", "reward/f1", "rollout/searches_per_episode"):
        assert run.data.metrics[key] == pytest.approx(last[key]), key
    history = client.get_metric_history(report["train_run_id"], "reward/mean")
    assert [m.step for m in history] == [1]
    # the before/after table was computed from the eval runs logged in MLflow
    for side in ("before", "after"):
        eval_run = client.get_run(report[f"eval_{side}_run_id"])
        for row in report["before_after"]:
            logged = [v for k, v in eval_run.data.metrics.items() if row["method"] in k and k.endswith("f1")]
            assert logged, f"no f1 metric for {row['method']} in the {side} eval run: {sorted(eval_run.data.metrics)}"
            assert row[f"f1_{side}"] == pytest.approx(logged[0])
    # rewards came from real answers: every training episode in the rollout file was scored against gold answers
    traj = [
        json.loads(line) for line in (out / "train" / "trajectories.jsonl").read_text().splitlines() if line.strip()
    ]
    assert traj and all(t.get("golden_answers") for t in traj)

    # running again with more steps resumes from the step-1 checkpoint instead of starting over
    second = _demo(out, "--steps", "2")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    report2 = json.loads((out / "report" / "report.json").read_text())
    assert report2["final_step"] == 2
    assert report2["train_run_id"] == report["train_run_id"], "a resumed run continues the same MLflow run"
    steps = [int(h["step"]) for h in report2["training"]]
    assert steps == [1, 2]
    assert report2["training"][0]["reward/mean"] == pytest.approx(last["reward/mean"])


@pytest.mark.timeout(2400)
def test_tiny_demo_with_asynchronous_rollouts(tmp_path: Path) -> None:
    """--rollout-mode async: a rollout worker samples every group the trainer trains, through the stack's
    PolicyService, which serves each step's weights; the report says so."""
    out = tmp_path / "demo-async"
    run = _demo(out, "--steps", "2", "--rollout-mode", "async")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["final_step"] == 2 and report["settings"]["rollout_mode"] == "async"
    groups = [json.loads(line) for line in (out / "train" / "groups.jsonl").read_text().splitlines()]
    assert [g["step"] for g in groups] == [1, 1, 2, 2]  # tiny: 2 questions per step
    assert {g["worker"] for g in groups} == {"rollout-worker-0"}
    assert len({g["task_id"] for g in groups}) == 4
    for h in report["training"]:
        assert 0 <= h["stream/group_age_versions"] <= 1 and h["stream/stale_groups"] == 0
        assert h["rollout/episodes"] == 4 and "time/trainer_idle_share" in h
    assert "asynchronous rollouts (1 worker(s)" in (out / "report" / "report.md").read_text()
    assert (out / "stack" / "rollout-worker-0.log").exists()
