"""The evaluation driver: datasets x methods (:mod:`searchrl.evaluator.methods`) over a policy and a search
backend, with bounded concurrency.

Every finished example is appended to ``records.jsonl`` at once (see :mod:`searchrl.evaluator.records`), so a run
that dies (policy server gone, Ctrl-C) keeps its finished examples and the same command resumes where it stopped.
At the end the driver writes ``summary.md`` / ``summary.csv``, the plots, ``eval.json`` and logs it all to MLflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.data.datasets import Dataset, Example, load_dataset
from searchrl.errors import FailedPrecondition, InvalidRequest, Unavailable
from searchrl.evaluator.methods import EvalConfig, Evaluator, resolve_methods
from searchrl.evaluator.metrics import (
    SUMMARY_FIELDS,
    SummaryRow,
    pivot_table_markdown,
    summarize,
    summary_csv,
    summary_table_markdown,
)
from searchrl.evaluator.records import RecordStore, record_key

log = logging.getLogger("searchrl.evaluator")

EVAL_META_FILE = "eval.json"


class EvalAborted(Unavailable):
    """The evaluation stopped before finishing (a dependency failed); finished records are kept and a rerun resumes.

    Attributes:
        done: examples finished in this invocation.
        remaining: examples still to do.
        records_path: the ``records.jsonl`` that holds every finished example.
    """

    def __init__(self, message: str, *, done: int, remaining: int, records_path: Path) -> None:
        super().__init__(message)
        self.done = done
        self.remaining = remaining
        self.records_path = records_path


@dataclass
class EvalResult:
    """What an evaluation produced.

    Attributes:
        rows: one summary row per (dataset, method).
        out_dir: the output directory.
        records: every per-example record of this evaluation (resumed ones included).
        run_id: the MLflow run id (``None`` when MLflow logging was off).
        tracking_uri: where the run was logged.
        new_examples: examples computed in this invocation.
        resumed_examples: examples taken from an earlier, interrupted invocation.
        files: name -> path of the written tables, plots and records.
    """

    rows: list[SummaryRow]
    out_dir: Path
    records: list[dict[str, Any]]
    run_id: str | None = None
    tracking_uri: str | None = None
    new_examples: int = 0
    resumed_examples: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    def markdown(self) -> str:
        """The summary table in markdown."""
        return str(summary_table_markdown(self.rows))


def _check_resume(out: Path, fingerprint: Mapping[str, Any], store: RecordStore) -> None:
    meta_path = out / EVAL_META_FILE
    if not len(store) or not meta_path.exists():
        return
    try:
        old = json.loads(meta_path.read_text()).get("fingerprint", {})
    except json.JSONDecodeError:
        return
    diff = {k: (old.get(k), v) for k, v in fingerprint.items() if k in old and old.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise FailedPrecondition(
            f"{out} holds {len(store)} records of an evaluation with other settings ({what}); "
            "use another --out directory, or --restart to discard them"
        )


def write_reports(out_dir: Path, records: Sequence[Mapping[str, Any]]) -> tuple[list[SummaryRow], dict[str, Path]]:
    """Writes ``summary.md``, ``summary.csv`` and the PNG plots for ``records``; returns the rows and the files."""
    from searchrl.evaluator.plots import plot_metrics, plot_searches

    rows = summarize(records)
    files: dict[str, Path] = {}
    md = "## Summary\n\n" + summary_table_markdown(rows)
    if rows:
        md += (
            "\n## EM (%)\n\n" + pivot_table_markdown(rows, "em") + "\n## F1 (%)\n\n" + pivot_table_markdown(rows, "f1")
        )
    files["summary.md"] = out_dir / "summary.md"
    files["summary.md"].write_text(md, encoding="utf-8")
    files["summary.csv"] = out_dir / "summary.csv"
    files["summary.csv"].write_text(summary_csv(rows), encoding="utf-8")
    if rows:
        files["metrics_by_dataset.png"] = plot_metrics(rows, out_dir / "metrics_by_dataset.png")
        files["searches_per_question.png"] = plot_searches(records, out_dir / "searches_per_question.png")
    return rows, files


async def evaluate(
    policy_backend: Any,
    search_backend: Any | None,
    datasets: Sequence[Dataset | str],
    methods: Sequence[str] | str,
    out_dir: str | Path,
    *,
    config: EvalConfig | None = None,
    model: str = "",
    search_name: str = "",
    limit: int | None = None,
    sample_seed: int | None = None,
    skip_invalid: bool = False,
    restart: bool = False,
    mlflow: bool = True,
    mlflow_uri: str | None = None,
    experiment: str = "searchrl-eval",
    run_name: str | None = None,
    progress: bool = False,
    extra_params: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluates ``methods`` on ``datasets`` and writes records, tables, plots and an MLflow run.

    Args:
        policy_backend: a ``GenerationBackend`` with a ``tokenizer`` (in-process engine or ``RemotePolicyBackend``).
        search_backend: a ``SearchBackend`` for ``rag``/``agent``, or ``None`` for no search.
        datasets: :class:`Dataset` objects or dataset specs (``bench:bamboogle``, ``fanoutqa``, a jsonl path).
        methods: any of ``direct``, ``rag``, ``agent``, or ``all`` (``rag`` is left out of ``all`` without search).
        out_dir: output directory; when it already holds ``records.jsonl`` the run resumes from it.
        config: generation settings (default :class:`EvalConfig`).
        model: model / checkpoint label for records and MLflow.
        search_name: search backend label (``retriever``, ``simulator``, ``none``).
        limit, sample_seed, skip_invalid: slicing and validation of dataset specs (see
            :func:`searchrl.data.datasets.load_dataset`).
        restart: discard the records already in ``out_dir`` instead of resuming.
        mlflow: log the finished run to MLflow.
        mlflow_uri: tracking URI (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<out_dir>/mlflow.db``).
        experiment, run_name: MLflow experiment and run names.
        progress: show a rich progress bar.
        extra_params: more MLflow params (e.g. the training step of a checkpoint).

    Returns:
        The :class:`EvalResult`.

    Raises:
        InvalidRequest: bad dataset, method or config (nothing is run).
        FailedPrecondition: ``out_dir`` holds records made with other settings (use ``restart``).
        EvalAborted: the policy or search backend failed mid-run; finished records are kept; rerun to resume.
    """
    cfg = config or EvalConfig()
    evaluator = Evaluator(policy_backend, search_backend, cfg, search_name=search_name)
    dsets = [
        d
        if isinstance(d, Dataset)
        else load_dataset(d, limit=limit, sample_seed=sample_seed, skip_invalid=skip_invalid)
        for d in datasets
    ]
    names = [d.name for d in dsets]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"two datasets share a name ({names}); name files as name=path.jsonl")
    if not dsets:
        raise InvalidRequest("no dataset given")
    meths = resolve_methods(methods, search_backend is not None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if restart:
        (out / "records.jsonl").unlink(missing_ok=True)
    model_label = model or str(getattr(policy_backend, "model_name", "") or type(policy_backend).__name__)
    settings = cfg.model_dump()
    fp = {"model": model_label, "search": evaluator.search_name, **settings}
    del fp["concurrency"]  # does not change results

    store = RecordStore(out)
    try:
        _check_resume(out, fp, store)
        meta: dict[str, Any] = {
            "fingerprint": fp,
            "datasets": [
                {"name": d.name, "source": d.source, "version": d.version, "n": len(d), "skipped": d.skipped}
                for d in dsets
            ],
            "methods": meths,
        }
        (out / EVAL_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        plan = [(d, m, ex) for d in dsets for m in meths for ex in d]
        plan_keys = {(d.name, m, ex.id) for d, m, ex in plan}
        done = store.done_keys()
        todo = [(d, m, ex) for d, m, ex in plan if (d.name, m, ex.id) not in done]
        resumed = len(plan) - len(todo)
        if resumed:
            log.info("resuming: %d of %d examples already in %s", resumed, len(plan), store.path)
        n_new = await _run_plan(evaluator, todo, store, cfg.concurrency, progress, len(plan), resumed)
        records = [r for r in store.records() if record_key(r) in plan_keys]
    finally:
        store.close()

    rows, files = write_reports(out, records)
    files["records.jsonl"] = store.path
    result = EvalResult(
        rows=rows, out_dir=out, records=records, new_examples=n_new, resumed_examples=resumed, files=files
    )
    if mlflow:
        params: dict[str, Any] = {
            "model": model_label,
            "search_backend": evaluator.search_name,
            "methods": ",".join(meths),
            "datasets": ",".join(names),
            **settings,
        }
        for d in dsets:
            params[f"dataset.{d.name}.version"] = d.version
            params[f"dataset.{d.name}.n"] = len(d)
            params[f"dataset.{d.name}.source"] = d.source
        params.update(extra_params or {})
        metrics = {f"{r.dataset}/{r.method}/{k}": float(getattr(r, k)) for r in rows for k in SUMMARY_FIELDS[3:]}
        for m in meths:
            mrows = [r for r in rows if r.method == m]
            if mrows:
                for k in ("em", "f1", "accuracy"):
                    metrics[f"avg/{m}/{k}"] = float(np.mean([getattr(r, k) for r in mrows]))
        run_id, uri = log_evaluation(
            out_dir=out,
            params=params,
            metrics=metrics,
            artifacts=[files[k] for k in sorted(files)] + [out / EVAL_META_FILE],
            datasets=[(d.name, d.version, d.source) for d in dsets],
            tracking_uri=mlflow_uri,
            experiment=experiment,
            run_name=run_name or f"{Path(model_label).name}-{'+'.join(names)}",
        )
        result.run_id, result.tracking_uri = run_id, uri
        meta["mlflow"] = {"run_id": run_id, "tracking_uri": uri, "experiment": experiment}
        (out / EVAL_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return result


def log_evaluation(
    *,
    out_dir: str | Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    artifacts: Sequence[str | Path],
    datasets: Sequence[tuple[str, str, str]] = (),
    tracking_uri: str | None = None,
    experiment: str = "searchrl-eval",
    run_name: str | None = None,
) -> tuple[str, str]:
    """Logs one finished evaluation as an MLflow run (tagged ``searchrl.kind=eval``).

    Args:
        out_dir: the evaluation's output directory (hosts the default store, see
            :func:`searchrl.tracking.resolve_tracking_uri`).
        params: run parameters (model, datasets and their versions, method, search backend, sampling ...); values
            are stringified and cut to MLflow's 6000-character limit.
        metrics: metric name -> value, e.g. ``bamboogle/agent/em``.
        artifacts: files logged at the artifact root (records, tables, plots).
        datasets: ``(name, digest, source)`` of every dataset, logged as MLflow dataset inputs.
        tracking_uri: overrides ``MLFLOW_TRACKING_URI`` and the default store.
        experiment: experiment name (created when missing).
        run_name: display name of the run.

    Returns:
        ``(run_id, tracking_uri)``.
    """
    from searchrl.tracking import MlflowRun, resolve_tracking_uri

    uri = resolve_tracking_uri(out_dir, tracking_uri)
    with MlflowRun(uri, experiment, run_name=run_name, tags={"searchrl.kind": "eval"}) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        run.log_datasets(datasets)
        for a in artifacts:
            if Path(a).is_file():
                run.log_artifact(a)
    return run.run_id, uri


async def _run_plan(
    evaluator: Evaluator,
    todo: list[tuple[Dataset, str, Example]],
    store: RecordStore,
    concurrency: int,
    progress: bool,
    total: int,
    resumed: int,
) -> int:
    """Runs ``todo`` with at most ``concurrency`` examples in flight; appends each record as it finishes.

    After the first failure no new example starts (those in flight finish) and :class:`EvalAborted` is raised.
    """
    if not todo:
        return 0
    sem = asyncio.Semaphore(concurrency)
    finished = 0
    failure: list[tuple[tuple[str, str, str], BaseException]] = []

    prog_cm: Any = contextlib.nullcontext(None)
    if progress:
        from rich import progress as rp

        prog_cm = rp.Progress(
            rp.TextColumn("[bold]eval[/bold] {task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TimeElapsedColumn(),
            rp.TimeRemainingColumn(),
        )

    with prog_cm as prog:
        bar = prog.add_task("", total=total, completed=resumed) if prog is not None else None

        async def one(d: Dataset, m: str, ex: Example) -> None:
            nonlocal finished
            async with sem:
                if failure:
                    return
                try:
                    rec = await evaluator.run_example(m, ex, d.name)
                except Exception as exc:  # noqa: BLE001 - every failure stops the run with a clear message
                    failure.append(((d.name, m, ex.id), exc))
                    return
                store.append(rec)
                finished += 1
                if prog is not None:
                    prog.update(bar, advance=1, description=f"{d.name}/{m}")

        # After the first failure no new example starts; those in flight finish (and are kept if they succeed).
        await asyncio.gather(*(one(d, m, ex) for d, m, ex in todo))

    if failure:
        (ds, m, ex_id), exc = failure[0]
        remaining = len(todo) - finished
        raise EvalAborted(
            f"evaluation stopped at {ds}/{m}/{ex_id}: {_describe(exc)}. {finished} examples finished in this run and "
            f"{resumed + finished} of {total} are saved in {store.path}; {remaining} remain. Fix the cause and rerun "
            "the same command to resume.",
            done=finished,
            remaining=remaining,
            records_path=store.path,
        ) from exc
    return finished


def _describe(exc: BaseException) -> str:
    """A one-line reason for a failure (gRPC status and details when it is an RPC error)."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        with contextlib.suppress(Exception):
            return f"policy/search RPC failed with {code().name}: {details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
