"""The evaluation runner: datasets x methods over a policy and a search backend, with bounded concurrency.

Methods (the rows of the ZeroSearch / Search-R1 / ReSearch result tables):

* ``direct`` - answer with no search;
* ``rag`` - retrieve once with the question (top-k documents from the search backend), then answer;
* ``agent`` - the multi-turn ReSearch agent loop (:class:`searchrl.agent.loop.AgentLoop`).

Every finished example is appended to ``records.jsonl`` at once (see :mod:`searchrl.evaluator.records`), so a run
that dies (policy server gone, Ctrl-C) keeps its finished examples and the same command resumes where it stopped.
At the end the runner writes ``summary.md`` / ``summary.csv``, the plots, ``eval.json`` and logs it all to MLflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.data.datasets import Dataset, Example, load_dataset
from searchrl.errors import FailedPrecondition, InvalidRequest, SearchRLError, Unavailable
from searchrl.evaluator.metrics import (
    SummaryRow,
    answer_scores,
    pivot_table_markdown,
    summarize,
    summary_csv,
    summary_table_markdown,
)
from searchrl.evaluator.records import RecordKey, RecordStore, record_key

log = logging.getLogger("searchrl.evaluator")

METHODS = ("direct", "rag", "agent")
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
class EvalConfig:
    """Generation and search settings shared by every method.

    Attributes:
        template: ``research_instruct`` (chat template) or ``research_base``.
        protocol: ``research`` (``<result>``) or ``search_r1`` (``<information>``) observation tags (agent).
        max_turns: assistant turns per agent episode.
        max_new_tokens: tokens per generation call (per agent turn; the whole answer of ``direct``/``rag``).
        max_response_tokens: response budget of an agent episode (generated plus inserted tokens).
        top_k: documents per search (``rag`` and ``agent``).
        max_doc_chars: cut each shown document to this many characters (0: no limit).
        temperature: 0 is greedy decoding (the default for evaluation).
        top_p: nucleus mass.
        seed: base seed; example ``i`` of a dataset is sampled with a seed derived from it and the example id.
        concurrency: examples in flight at once (an asyncio semaphore).
        scheme: reward-library scheme that decides format validity (``research``, ``search_r1_em`` ...).
        agent_response_prefix: text the agent's responses start with (``None``: the agent loop's default
            ``<think>``); evaluate a policy with the prefix it was trained with. Baselines keep ``<think>``.
    """

    template: str = "research_instruct"
    protocol: str = "research"
    max_turns: int = 4
    max_new_tokens: int = 256
    max_response_tokens: int = 1024
    top_k: int = 3
    max_doc_chars: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    concurrency: int = 8
    scheme: str = "research"
    agent_response_prefix: str | None = None

    def validate(self) -> None:
        """Raises :class:`InvalidRequest` on values no engine accepts."""
        if self.template not in ("research_instruct", "research_base"):
            raise InvalidRequest(f"unknown template {self.template!r}; expected research_instruct or research_base")
        if self.protocol not in ("research", "search_r1"):
            raise InvalidRequest(f"unknown protocol {self.protocol!r}; expected research or search_r1")
        if self.max_doc_chars < 0:
            raise InvalidRequest(f"max_doc_chars must be >= 0, got {self.max_doc_chars}")
        for name in ("max_turns", "max_new_tokens", "max_response_tokens", "top_k", "concurrency"):
            if int(getattr(self, name)) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")


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


def _example_seed(base: int, dataset: str, example_id: str) -> int:
    """A per-example seed that does not depend on concurrency or order (so resumed runs sample alike)."""
    h = hashlib.sha256(f"{base}:{dataset}:{example_id}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _score_response(response: str, golds: Sequence[str], *, ended_with_eos: bool, scheme: str) -> dict[str, Any]:
    """Format validity (reward-library ``scheme``) and EM/F1/accuracy of the answer the scheme extracts."""
    from searchrl.reward.scoring import score

    res = score(response, list(golds), scheme=scheme, ended_with_eos=ended_with_eos)
    extracted = res.answer
    out: dict[str, Any] = {
        "answer": extracted or "",
        "reward": float(res.reward),
        "format_valid": bool(res.format_ok),
        "format_error": str(res.format_error or ""),
    }
    out.update(answer_scores(extracted or "", golds))
    return out


def _search_entry(s: Any) -> dict[str, Any]:
    docs = list(getattr(s, "documents", []) or [])
    return {
        "query": str(getattr(s, "query", "")),
        "backend": str(getattr(s, "backend", "")),
        "titles": [str(getattr(d, "title", "")) for d in docs],
        "latency_ms": round(float(getattr(s, "latency_ms", 0.0) or 0.0), 2),
        "cache_hit": bool(getattr(s, "cache_hit", False)),
        "error": str(getattr(s, "error", "") or ""),
    }


class Evaluator:
    """Runs methods over datasets against one policy backend and one search backend.

    Args:
        policy: a :class:`~searchrl.agent.loop.GenerationBackend` (``TransformersEngine``, ``SGLangEngine``,
            ``RemotePolicyBackend``); its ``tokenizer`` renders the prompts.
        search: a :class:`~searchrl.agent.loop.SearchBackend`, or ``None`` (then only ``direct`` and a
            search-less ``agent`` can run).
        config: generation settings.
        search_name: label of the search backend for records and MLflow (``retriever``, ``simulator``, ``none``).
    """

    def __init__(self, policy: Any, search: Any | None, config: EvalConfig, search_name: str = "") -> None:
        config.validate()
        self.policy = policy
        self.search = search
        self.config = config
        self.search_name = search_name or ("none" if search is None else type(search).__name__)
        self._agent: Any = None

    # ---------------------------------------------------------------------------------------------- methods
    def _agent_loop(self) -> Any:
        if self._agent is None:
            from searchrl.agent.loop import AgentLoop, AgentLoopConfig

            c = self.config
            cfg = AgentLoopConfig(
                template=c.template,
                protocol=c.protocol,
                max_turns=c.max_turns,
                max_response_tokens=c.max_response_tokens,
                max_new_tokens_per_turn=c.max_new_tokens,
                top_k=c.top_k,
                max_doc_chars=c.max_doc_chars,
                temperature=c.temperature,
                top_p=c.top_p,
            )
            if c.agent_response_prefix is not None:
                cfg.response_prefix = c.agent_response_prefix
            self._agent = AgentLoop(self.policy, self.search, cfg)
        return self._agent

    def _response_prefix(self) -> str:
        from searchrl.agent.loop import AgentLoopConfig

        return str(getattr(AgentLoopConfig(), "response_prefix", "<think>") or "")

    async def _run_baseline(self, method: str, ex: Example, dataset: str, seed: int) -> dict[str, Any]:
        from searchrl.evaluator.prompts import render_baseline_prompt

        c = self.config
        searches: list[dict[str, Any]] = []
        documents: list[Any] = []
        search_ms = 0.0
        if method == "rag":
            from searchrl.agent.loop import SearchContext

            if self.search is None:
                raise InvalidRequest("the rag baseline needs a search backend (--search retriever|simulator)")
            t0 = time.perf_counter()
            # No gold answers in the context: a simulator must not see them at evaluation time.
            outcome = await self.search.search(
                ex.question, top_k=c.top_k, context=SearchContext(question=ex.question, golden_answers=[], seed=seed)
            )
            search_ms = (time.perf_counter() - t0) * 1000
            documents = list(outcome.documents)
            searches.append(
                {
                    "query": ex.question,
                    "backend": outcome.backend,
                    "titles": [d.title for d in documents],
                    "latency_ms": round(search_ms, 2),
                    "cache_hit": bool(outcome.cache_hit),
                    "error": outcome.error,
                }
            )
        prefix = self._response_prefix()
        _text, prompt_ids = render_baseline_prompt(
            self.policy.tokenizer,
            method,
            ex.question,
            documents,
            template=c.template,
            response_prefix=prefix,
            max_doc_chars=c.max_doc_chars,
        )
        t1 = time.perf_counter()
        out = await self.policy.generate(
            prompt_ids,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
            stop=("</answer>",),
            seed=seed,
        )
        gen_ms = (time.perf_counter() - t1) * 1000
        response = prefix + out.text
        # A stop at </answer> is where the episode ends (as the agent loop does); only "length" is cut short.
        ended = out.finish_reason in ("stop", "eos")
        rec = _score_response(response, ex.golden_answers, ended_with_eos=ended, scheme=c.scheme)
        rec.update(
            {
                "response": response,
                "searches": searches,
                "num_searches": len(searches),
                "turns": 1,
                "prompt_tokens": len(prompt_ids),
                "response_tokens": len(out.token_ids),
                "generated_tokens": len(out.token_ids),
                "finish_reason": out.finish_reason,
                "generation_ms": round(gen_ms, 2),
                "search_ms": round(search_ms, 2),
                "policy_version": str(getattr(out, "policy_version", "") or ""),
            }
        )
        return rec

    async def _run_agent(self, ex: Example, dataset: str, seed: int) -> dict[str, Any]:
        loop = self._agent_loop()
        # Gold answers stay out of the episode so no search backend (e.g. a simulator) can see them; we score here.
        ep = await loop.run(ex.question, (), question_id=ex.id, seed=seed)
        rec = _score_response(
            ep.response_text,
            ex.golden_answers,
            ended_with_eos=bool(ep.ended_with_eos),
            scheme=self.config.scheme,
        )
        searches = [_search_entry(s) for s in ep.searches]
        timings = dict(getattr(ep, "timings", {}) or {})
        rec.update(
            {
                "response": ep.response_text,
                "searches": searches,
                "num_searches": len(searches),
                "turns": len(ep.turns),
                "prompt_tokens": len(ep.prompt_ids),
                "response_tokens": len(ep.response_ids),
                "generated_tokens": int(sum(ep.loss_mask)),
                "finish_reason": ep.finish_reason,
                "generation_ms": round(float(timings.get("generation_ms", 0.0)), 2),
                "search_ms": round(float(timings.get("search_ms", 0.0)), 2),
                "policy_version": str(getattr(ep, "policy_version", "") or ""),
            }
        )
        return rec

    async def run_example(self, method: str, ex: Example, dataset: str) -> dict[str, Any]:
        """Evaluates one example with one method and returns its record (see ``records.jsonl`` fields).

        Raises:
            InvalidRequest: unknown method, or ``rag`` without a search backend.
            Unavailable / grpc.RpcError: the policy backend failed.
        """
        seed = _example_seed(self.config.seed, dataset, ex.id)
        t0 = time.perf_counter()
        if method in ("direct", "rag"):
            body = await self._run_baseline(method, ex, dataset, seed)
        elif method == "agent":
            body = await self._run_agent(ex, dataset, seed)
        else:
            raise InvalidRequest(f"unknown method {method!r}; expected one of {METHODS}")
        latency_ms = (time.perf_counter() - t0) * 1000
        return {
            "dataset": dataset,
            "method": method,
            "id": ex.id,
            "question": ex.question,
            "golden_answers": list(ex.golden_answers),
            **body,
            "latency_ms": round(latency_ms, 2),
            "seed": seed,
            "search_backend": self.search_name if method != "direct" else "none",
            "finished_at": time.time(),
        }


# ------------------------------------------------------------------------------------------------------ driver
def _fingerprint(model: str, search_name: str, config: EvalConfig) -> dict[str, Any]:
    c = asdict(config)
    c.pop("concurrency")  # does not change results
    return {"model": model, "search": search_name, **c}


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


def _resolve_datasets(
    datasets: Sequence[Dataset | str], limit: int | None, sample_seed: int | None, skip_invalid: bool
) -> list[Dataset]:
    out: list[Dataset] = []
    for d in datasets:
        out.append(
            d
            if isinstance(d, Dataset)
            else load_dataset(d, limit=limit, sample_seed=sample_seed, skip_invalid=skip_invalid)
        )
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"two datasets share a name ({names}); name files as name=path.jsonl")
    if not out:
        raise InvalidRequest("no dataset given")
    return out


def _resolve_methods(methods: Sequence[str] | str, has_search: bool) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    flat: list[str] = []
    for m in methods:
        for part in str(m).split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                flat += [x for x in METHODS if x != "rag" or has_search]
            elif part in METHODS:
                flat.append(part)
            else:
                raise InvalidRequest(f"unknown method {part!r}; expected one of {', '.join(METHODS)} or all")
    flat = list(dict.fromkeys(flat))
    if not flat:
        raise InvalidRequest("no method given")
    if "rag" in flat and not has_search:
        raise InvalidRequest("the rag baseline needs a search backend (--search retriever|simulator)")
    return flat


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
    dsets = _resolve_datasets(datasets, limit, sample_seed, skip_invalid)
    meths = _resolve_methods(methods, search_backend is not None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if restart and (out / "records.jsonl").exists():
        (out / "records.jsonl").unlink()
    model_label = model or str(getattr(policy_backend, "model_name", "") or type(policy_backend).__name__)
    fp = _fingerprint(model_label, evaluator.search_name, cfg)

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
        plan: list[tuple[Dataset, str, Example]] = [(d, m, ex) for d in dsets for m in meths for ex in d]
        plan_keys: set[RecordKey] = {(d.name, m, ex.id) for d, m, ex in plan}
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
        from searchrl.evaluator.tracking import log_evaluation

        params: dict[str, Any] = {
            "model": model_label,
            "search_backend": evaluator.search_name,
            "methods": ",".join(meths),
            "datasets": ",".join(d.name for d in dsets),
            **{k: v for k, v in asdict(cfg).items()},
        }
        for d in dsets:
            params[f"dataset.{d.name}.version"] = d.version
            params[f"dataset.{d.name}.n"] = len(d)
            params[f"dataset.{d.name}.source"] = d.source
        params.update(extra_params or {})
        metrics: dict[str, float] = {}
        for r in rows:
            for k in (
                "em",
                "f1",
                "accuracy",
                "format_valid",
                "searches_per_question",
                "mean_turns",
                "mean_generated_tokens",
                "mean_latency_ms",
            ):
                metrics[f"{r.dataset}/{r.method}/{k}"] = float(getattr(r, k))
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
            run_name=run_name or f"{Path(model_label).name}-{'+'.join(d.name for d in dsets)}",
        )
        result.run_id, result.tracking_uri = run_id, uri
        meta["mlflow"] = {"run_id": run_id, "tracking_uri": uri, "experiment": experiment}
        (out / EVAL_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return result


def evaluate_sync(*args: Any, **kwargs: Any) -> EvalResult:
    """:func:`evaluate` from synchronous code (runs its own event loop; backends must not be bound to another)."""
    return asyncio.run(evaluate(*args, **kwargs))


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
    stop = asyncio.Event()
    finished = 0
    failure: list[tuple[tuple[str, str, str], BaseException]] = []

    prog_cm: Any = contextlib.nullcontext(None)
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        prog_cm = Progress(
            TextColumn("[bold]eval[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )

    with prog_cm as prog:
        bar = prog.add_task("", total=total, completed=resumed) if prog is not None else None

        async def one(d: Dataset, m: str, ex: Example) -> None:
            nonlocal finished
            async with sem:
                if stop.is_set():
                    return
                try:
                    rec = await evaluator.run_example(m, ex, d.name)
                except Exception as exc:  # noqa: BLE001 - every failure stops the run with a clear message
                    if not stop.is_set():
                        failure.append(((d.name, m, ex.id), exc))
                        stop.set()
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
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        try:
            return f"policy/search RPC failed with {code().name}: {details()}"
        except Exception:  # noqa: BLE001
            pass
    if isinstance(exc, SearchRLError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
