"""verl plug-ins on CPU: the ``searchrl_research`` AgentLoop driven like verl's AgentLoopWorker drives it, with a CPU
server manager (same async ``generate`` as verl's ``LLMServerClient``, backed by the real SmolLM2 model), and the
``SearchRLSearchTool`` loaded by verl's own tool loader from our YAML against a real RetrievalService."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from searchrl.agent.loop import SearchContext, SearchOutcome
from searchrl.agent.settings import SamplingParams
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.policy.engines.transformers import TransformersEngine
from searchrl.testing import ServiceProcess, free_port

pytest.importorskip("verl")

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, DictConfigWrap, ToolListWrap, _agent_loop_registry  # noqa: E402
from verl.tools.tool_registry import initialize_tools_from_config  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FORCED = "<think> I should look this up. </think>\n<search> Eiffel Tower </search>"


# vLLM 0.24.0 ``SamplingParams`` keyword arguments (vllm/sampling_params.py; the trainer image's vLLM). It is a
# msgspec.Struct: any other keyword raises TypeError, so a sampling key our loop invents fails here as on the GPU.
VLLM_SAMPLING_KWARGS = frozenset(
    "n presence_penalty frequency_penalty repetition_penalty temperature top_p top_k min_p seed stop stop_token_ids "
    "ignore_eos max_tokens min_tokens logprobs prompt_logprobs logprob_token_ids flat_logprobs detokenize "
    "skip_special_tokens spaces_between_special_tokens include_stop_str_in_output output_kind skip_clone "
    "output_text_buffer_length structured_outputs logit_bias allowed_token_ids extra_args "
    "routed_experts_prompt_start bad_words skip_reading_prefix_cache thinking_token_budget repetition_detection".split()
)


class CpuServerManager:
    """verl 0.9.1's vLLM rollout server as an agent loop sees it, over a CPU TransformersEngine.

    ``generate`` handles the sampling parameters exactly as ``vLLMHttpServer.generate`` does
    (verl/workers/rollout/vllm_rollout/vllm_async_server.py:601-634): ``max_tokens`` / SGLang-style
    ``max_new_tokens`` popped, ``logprobs`` turned into 0/None, ``repetition_penalty`` and ``ignore_eos`` defaulted,
    then everything else must be a vLLM ``SamplingParams`` keyword (else ``TypeError`` as msgspec raises it).
    """

    def __init__(self, engine: TransformersEngine, global_steps: int = 3, response_length: int = 256) -> None:
        self.engine = engine
        self.global_steps = global_steps
        self.response_length = response_length
        self.calls: list[dict[str, Any]] = []

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any
    ) -> TokenOutput:
        sp = dict(sampling_params)
        self.calls.append({"request_id": request_id, **sp})
        if "max_tokens" in sp:
            max_tokens = int(sp.pop("max_tokens"))
        elif "max_new_tokens" in sp:
            max_tokens = int(sp.pop("max_new_tokens"))
        else:
            max_tokens = self.response_length
        sp["logprobs"] = 0 if sp.pop("logprobs", False) else None
        sp.setdefault("repetition_penalty", 1.0)
        sp.setdefault("ignore_eos", False)
        unknown = sorted(set(sp) - VLLM_SAMPLING_KWARGS)
        if unknown:
            raise TypeError(f"Unexpected keyword argument '{unknown[0]}'")
        top_k = int(sp.get("top_k", 0) or 0)
        out = await self.engine.generate(
            list(prompt_ids),
            SamplingParams(
                max_new_tokens=max(1, max_tokens),
                temperature=float(sp.get("temperature", 1.0)),
                top_p=float(sp.get("top_p", 1.0)),
                top_k=top_k if top_k > 0 else -1,
            ),
            stop=list(sp.get("stop") or []),
            seed=sp.get("seed"),
        )
        return TokenOutput(
            token_ids=out.token_ids,
            log_probs=out.logprobs if sp["logprobs"] is not None else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )


@pytest.fixture(scope="module")
def engine(policy_path: str) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(policy_path, max_batch_size=8, batch_wait_ms=2, torch_threads=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def index_dir(small_wiki_index: Path) -> Path:
    """A flat index of ~200 bundled Wikipedia summaries (Eiffel Tower among them)."""
    return small_wiki_index


@pytest.fixture(scope="module")
def retriever(small_wiki_retriever: ServiceProcess) -> ServiceProcess:
    """A real RetrievalService over :func:`index_dir`."""
    return small_wiki_retriever


@pytest.fixture(scope="module")
def tls_retriever(
    index_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceProcess, Path, str]]:
    """The same RetrievalService with TLS (a self-signed certificate for localhost) and a bearer token file, as the
    chart runs it with global.tls and global.auth on: ``(process, CA file, token file)``."""
    from searchrl.testing import self_signed_certificate

    root = tmp_path_factory.mktemp("verl-tls")
    cert, key = self_signed_certificate(root)
    token = root / "token"
    token.write_text("rayjob-token\n")
    args = ["--index-dir", str(index_dir), "--http-port", "-1", "--tls-cert-file", str(cert), "--tls-key-file",
            str(key), "--auth-token-file", str(token)]  # fmt: skip
    with ServiceProcess("retriever", args, timeout_s=300, root_ca=cert.read_bytes()) as proc:
        yield proc, cert, str(token)


def load_tool(monkeypatch: pytest.MonkeyPatch, target: str) -> Any:
    """Our tool, built by verl's own loader from trainer/searchrl/trainer/config/tools/searchrl_search.yaml."""
    monkeypatch.setenv("SEARCHRL_RETRIEVER_TARGET", target)
    monkeypatch.setenv("SEARCHRL_SEARCH_BACKEND", "retriever")
    (tool,) = initialize_tools_from_config(
        str(REPO / "trainer" / "searchrl" / "trainer" / "config" / "tools" / "searchrl_search.yaml")
    )
    return tool


@functools.cache
def preset_rollout() -> Any:
    """``actor_rollout_ref.rollout`` of the research_grpo preset, composed as the RayJob entrypoint composes it."""
    from searchrl.trainer.rayjob_entrypoint import compose

    return compose("research_grpo").actor_rollout_ref.rollout


def make_loop(
    engine: TransformersEngine,
    tools: list[Any],
    response_length: int = 256,
    prompt_length: int = 1024,
    **settings: Any,
) -> Any:
    """Instantiates the registered agent loop the way verl's AgentLoopWorker does (hydra.utils.instantiate)."""
    import hydra

    import searchrl.trainer.verl_plugins  # noqa: F401 - registers searchrl_research

    # The rollout section of the research preset as verl composes it, cut down to CPU sizes.
    rollout = OmegaConf.to_container(preset_rollout(), resolve=True)
    assert isinstance(rollout, dict)
    rollout.update(prompt_length=prompt_length, response_length=response_length)
    rollout["multi_turn"]["max_assistant_turns"] = 2
    config = OmegaConf.create(
        {"actor_rollout_ref": {"rollout": rollout}, "trainer": {"total_training_steps": 10}, "data": {}}
    )
    entries = OmegaConf.load(REPO / "trainer" / "searchrl" / "trainer" / "config" / "agent_loops.yaml")
    spec = next(e for e in entries if e.name == "searchrl_research")
    assert _agent_loop_registry["searchrl_research"]["_target_"] == spec._target_
    spec = OmegaConf.merge(spec, settings)
    del spec["name"]
    return hydra.utils.instantiate(
        config=spec,
        trainer_config=DictConfigWrap(config=config),
        server_manager=CpuServerManager(engine),
        tokenizer=engine.tokenizer,
        processor=None,
        hf_model_type="llama",
        dataset_cls=None,
        data_config=DictConfigWrap(config.data),
        tools=ToolListWrap(tools),
    )


def verl_row(question: str, golds: list[str]) -> dict[str, Any]:
    """The dataset fields verl passes to run(), from a row written by `searchrl data prepare`."""
    from searchrl.data.datasets import Example
    from searchrl.trainer.data import to_verl_row

    row = to_verl_row(Example("q1", question, tuple(golds), "test"), index=0, split="train")
    return {
        "raw_prompt": row["prompt"],
        "extra_info": row["extra_info"],
        "reward_model": row["reward_model"],
        "data_source": row["data_source"],
    }


@pytest.mark.slow  # a real retriever over a freshly built index, or a child policy process
async def test_tool_executes_against_real_retriever(monkeypatch: pytest.MonkeyPatch, retriever: ServiceProcess) -> None:
    tool = load_tool(monkeypatch, retriever.target)
    assert tool.name == "search" and tool.tool_schema.function.parameters.required == ["query"]
    iid, _ = await tool.create(
        create_kwargs={"question": "Where is the Eiffel Tower?", "golden_answers": ["Paris"], "step": 2}
    )
    resp, reward, metrics = await tool.execute(iid, {"query": "Eiffel Tower"})
    assert resp.text.startswith("Doc 1 (Title: ") and "Eiffel" in resp.text and reward == 0.0
    assert metrics["num_documents"] == 5 and metrics["backend"] == "retriever" and not metrics["error"]
    resp, _, metrics = await tool.execute(iid, {"query": "   "})
    assert resp.text == "Search error: the query is empty." and metrics["num_documents"] == 0
    resp, _, _ = await tool.execute(iid, {"query": "q" * 5000})
    assert "longer than 2000" in (resp.text or "")
    await tool.release(iid)
    # A dead backend: an error observation, not an exception.
    dead = load_tool(monkeypatch, f"127.0.0.1:{free_port()}")
    dead.timeout_s = 2.0
    resp, _, metrics = await dead.execute("unknown", {"query": "Eiffel Tower"})
    assert resp.text == "Search error: the search engine is unavailable." and metrics["error"]


@pytest.mark.slow  # a real retriever over a freshly built index, or a child policy process
async def test_agent_loop_inserts_documents_with_zero_response_mask(
    monkeypatch: pytest.MonkeyPatch, engine: TransformersEngine, retriever: ServiceProcess
) -> None:
    tool = load_tool(monkeypatch, retriever.target)
    loop = make_loop(engine, [tool], response_prefix=FORCED, max_new_tokens_per_turn=32, top_k=2)
    out: AgentLoopOutput = await loop.run(
        {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True},
        **verl_row("In which city is the Eiffel Tower?", ["Paris"]),
    )
    tok = engine.tokenizer
    assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs or []) <= 256
    # Zero-mask spans are exactly the prefix and the inserted <result> block(s).
    spans: list[list[int]] = []
    prev = 1
    for t, m in zip(out.response_ids, out.response_mask, strict=True):
        if m == 0:
            if prev == 1:
                spans.append([])
            spans[-1].append(t)
        prev = m
    inserted = tok.decode([t for s in spans for t in s])
    assert inserted.startswith(FORCED + " <result>\nDoc 1 (Title: ")
    assert "Eiffel" in inserted and inserted.count("</result>") >= 1
    assert all(lp == 0.0 for lp, m in zip(out.response_logprobs or [], out.response_mask, strict=True) if m == 0)
    # The prompt is the dataset's chat messages through the chat template.
    assert tok.decode(out.prompt_ids).startswith(
        "<|im_start|>system\nYou are a helpful assistant that answers questions by searching"
    )
    assert out.extra_fields["searchrl_num_searches"] >= 1 and out.num_turns >= 3
    assert out.metrics.tool_calls > 0 and out.metrics.generate_sequences > 0
    # Stop strings went to the server manager in vLLM's form (the preset's engine), with the per-turn cap.
    call = loop.server_manager.calls[0]
    assert call["stop"] == ["</search>", "</answer>"] and call["include_stop_str_in_output"] is True
    assert call["max_new_tokens"] <= 32 and "no_stop_trim" not in call
    # verl's own conversion to tensors works on our output.
    d = out.as_dict()
    assert d["response_mask"].tolist() == out.response_mask and d["rollout_log_probs"].shape[0] == len(out.response_ids)


async def test_agent_loop_curriculum_step_and_no_logprobs(engine: TransformersEngine) -> None:
    """A scripted server (like verl's, it reports global_steps): the step reaches the search backend's context."""
    seen: list[SearchContext] = []
    tok = engine.tokenizer

    class Spy:
        name = "spy"

        async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
            seen.append(SearchContext(**vars(context)))
            return SearchOutcome([rollout_pb2.Document(title="T", text="x")], "spy")

    class ScriptedServer:
        turns = [" Let me search. </think>\n<search> Eiffel Tower </search>", " <answer> \\boxed{Paris} </answer>"]

        def __init__(self) -> None:
            self.n = 0

        async def generate(
            self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kw: Any
        ) -> TokenOutput:
            ids = tok.encode(self.turns[min(self.n, 1)], add_special_tokens=False)
            self.n += 1
            return TokenOutput(token_ids=ids, log_probs=None, extra_fields={"global_steps": 3})

    loop = make_loop(engine, [], max_new_tokens_per_turn=64)
    loop.server_manager = ScriptedServer()
    loop._fallback_search = Spy()
    out = await loop.run(
        {"temperature": 0.0, "top_p": 1.0, "logprobs": False}, **verl_row("Where is the Eiffel Tower?", ["Paris"])
    )
    assert out.response_logprobs is None
    assert out.extra_fields["searchrl_finish_reason"] == "answer" and out.extra_fields["searchrl_answer"] == "Paris"
    # Question and gold answers from extra_info; the curriculum step from the server's global_steps; m from the config.
    assert len(seen) == 1 and seen[0].question == "Where is the Eiffel Tower?" and seen[0].golden_answers == ["Paris"]
    assert seen[0].step == 3 and seen[0].total_steps == 10


class ScriptedVerlServer(CpuServerManager):
    """The same vLLM-server contract, answering each turn with scripted text instead of sampling."""

    def __init__(self, engine: TransformersEngine, turns: list[str]) -> None:
        super().__init__(engine)
        self.turns = turns

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any
    ) -> TokenOutput:
        sp = dict(sampling_params)
        self.calls.append({"request_id": request_id, **sp})
        sp.pop("max_tokens", None)
        sp.pop("max_new_tokens", None)
        sp["logprobs"] = 0 if sp.pop("logprobs", False) else None
        unknown = sorted(set(sp) - VLLM_SAMPLING_KWARGS)
        if unknown:
            raise TypeError(f"Unexpected keyword argument '{unknown[0]}'")
        text = self.turns[min(len(self.calls) - 1, len(self.turns) - 1)]
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        return TokenOutput(token_ids=ids, log_probs=None, extra_fields={"global_steps": 1})


class FixedSearch:
    """A search backend returning fixed documents (or failing), to drive the loop without a service."""

    name = "fixed"

    def __init__(self, text: str = "", fail: bool = False) -> None:
        self.text = text
        self.fail = fail

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        if self.fail:
            return SearchOutcome([], "fixed", error="UNAVAILABLE: connection refused")
        return SearchOutcome([rollout_pb2.Document(title="Eiffel Tower", text=self.text)], "fixed")


def _reward_through_verl(engine: TransformersEngine, out: AgentLoopOutput, row: dict[str, Any]) -> tuple[Any, Any]:
    """verl's own NaiveRewardManager with our compute_score, and the one-sample DataProto its reward loop builds
    from an AgentLoopOutput (``tool_extra_fields`` = the output's ``extra_fields``)."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    from searchrl.reward.verl_reward import compute_score

    n = len(out.response_ids)
    data = DataProto.from_dict(
        tensors={
            "prompts": torch.tensor([out.prompt_ids]),
            "responses": torch.tensor([out.response_ids]),
            "attention_mask": torch.ones(1, len(out.prompt_ids) + n, dtype=torch.long),
        },
        non_tensors={
            "data_source": np.array([row["data_source"]], dtype=object),
            "reward_model": np.array([row["reward_model"]], dtype=object),
            "extra_info": np.array([dict(row["extra_info"])], dtype=object),
            "tool_extra_fields": np.array([dict(out.extra_fields)], dtype=object),
        },
    )
    manager = NaiveRewardManager(OmegaConf.create({}), engine.tokenizer, compute_score)
    return manager, data


async def test_ended_with_eos_reaches_compute_score_on_the_verl_path(engine: TransformersEngine) -> None:
    """The ReSearch EOS rule fires on the cluster path: the loop reports ended_with_eos in extra_fields, verl's
    reward manager merges them into extra_info, and compute_score withholds the format reward without EOS."""
    answer = " I know it. </think>\n<answer> \\boxed{Paris} </answer>"
    loop = make_loop(engine, [], max_new_tokens_per_turn=64, response_prefix="<think>")
    loop.server_manager = ScriptedVerlServer(engine, [answer])
    row = verl_row("Where is the Eiffel Tower?", ["Paris"])
    out = await loop.run({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": False}, **row)
    assert out.extra_fields["ended_with_eos"] is True and out.extra_fields["searchrl_finish_reason"] == "answer"
    manager, data = _reward_through_verl(engine, out, row)
    scored = await manager.run_single(data)
    assert scored["reward_score"] == 1.0 and scored["reward_extra_info"]["format_ok"] == 1.0
    # The same response, reported as cut before EOS: verl carries the flag, the format reward is withheld.
    cut = out.model_copy(update={"extra_fields": {**out.extra_fields, "ended_with_eos": False}})
    manager, data = _reward_through_verl(engine, cut, row)
    scored = await manager.run_single(data)
    assert scored["reward_extra_info"]["format_ok"] == 0.0 and scored["reward_score"] < 1.0
    # An episode that runs out of turns without answering reports False itself.
    rambling = make_loop(engine, [], max_new_tokens_per_turn=16, response_prefix="<think>")
    rambling.server_manager = ScriptedVerlServer(engine, [" still thinking about it"])
    out = await rambling.run({"temperature": 1.0, "top_p": 1.0, "logprobs": False}, **row)
    assert out.extra_fields["ended_with_eos"] is False


async def test_tool_response_limit_of_the_preset_cuts_inserted_documents(engine: TransformersEngine) -> None:
    """rollout.multi_turn.max_tool_response_length (characters) and its cut side apply to our <result> blocks."""
    limit = int(preset_rollout().multi_turn.max_tool_response_length)
    long_text = "Gustave Eiffel's company built the tower in Paris. " * (2 * limit // 50)
    loop = make_loop(engine, [], response_length=2048, max_new_tokens_per_turn=64, response_prefix=FORCED)
    loop.server_manager = ScriptedVerlServer(engine, [" </think>\n<answer> \\boxed{Paris} </answer>"])
    loop._fallback_search = FixedSearch(long_text)
    out = await loop.run({"temperature": 1.0, "top_p": 1.0, "logprobs": False}, **verl_row("Where?", ["Paris"]))
    inserted = engine.tokenizer.decode([t for t, m in zip(out.response_ids, out.response_mask, strict=True) if m == 0])
    body = inserted.split("<result>", 1)[1].split("</result>", 1)[0]
    assert "...(truncated)" in body and limit <= len(body.strip()) <= limit + len("...(truncated)") + 2
    assert body.strip().startswith("Doc 1 (Title: Eiffel Tower)")  # the preset keeps the start (right side cut)


@pytest.mark.parametrize("use_dataset_prompt", [True, False])
async def test_prompts_are_cut_to_the_rollout_prompt_length(
    engine: TransformersEngine, use_dataset_prompt: bool
) -> None:
    """Both prompt sources (the dataset's chat messages, or our template as in the ZeroSearch preset) are cut to
    rollout.prompt_length the way verl's own loops cut them (left-truncation, _cap_text_prompt_length)."""
    row = verl_row("Where is the Eiffel Tower?", ["Paris"])
    full = make_loop(engine, [], use_dataset_prompt=use_dataset_prompt, response_prefix="<think>")
    full.server_manager = ScriptedVerlServer(engine, [" </think>\n<answer> \\boxed{Paris} </answer>"])
    whole = (await full.run({"temperature": 1.0, "top_p": 1.0}, **row)).prompt_ids
    assert len(whole) > 40
    cut = make_loop(engine, [], prompt_length=40, use_dataset_prompt=use_dataset_prompt, response_prefix="<think>")
    cut.server_manager = ScriptedVerlServer(engine, [" </think>\n<answer> \\boxed{Paris} </answer>"])
    out = await cut.run({"temperature": 1.0, "top_p": 1.0}, **row)
    assert out.prompt_ids == whole[-40:]
    assert len(cut.server_manager.calls) == 1  # the capped prompt is what the server was given


async def test_failed_searches_fail_the_run_past_the_threshold(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed searches are counted in extra_fields and, past SEARCHRL_MAX_SEARCH_FAILURE_RATIO of the worker's recent
    searches, the episode raises instead of handing GRPO a rollout built on error observations."""
    from searchrl.trainer.guards import SearchFailuresExceeded
    from searchrl.trainer.verl_plugins import agent_loop as plugin

    monkeypatch.setenv("SEARCHRL_MAX_SEARCH_FAILURE_RATIO", "0.5")
    monkeypatch.setenv("SEARCHRL_SEARCH_FAILURE_WINDOW", "4")
    monkeypatch.setattr(plugin, "_FAILURES", None)
    search_turn = " </think>\n<search> Eiffel Tower </search>"
    row = verl_row("Where is the Eiffel Tower?", ["Paris"])

    def loop_with(search: FixedSearch) -> Any:
        lp = make_loop(engine, [], max_new_tokens_per_turn=64, response_prefix="<think>")
        lp.server_manager = ScriptedVerlServer(engine, [search_turn, search_turn, " done"])
        lp._fallback_search = search
        return lp

    ok = await loop_with(FixedSearch("Paris.")).run({"temperature": 1.0, "top_p": 1.0}, **row)
    assert ok.extra_fields["searchrl_search_failures"] == 0 and ok.extra_fields["searchrl_num_searches"] == 1
    for _ in range(2):  # 3 searches so far: fewer than the window of 4, no verdict yet
        out = await loop_with(FixedSearch(fail=True)).run({"temperature": 1.0, "top_p": 1.0}, **row)
        assert out.extra_fields["searchrl_search_failures"] == 1
    with pytest.raises(SearchFailuresExceeded, match="SEARCHRL_MAX_SEARCH_FAILURE_RATIO"):
        # 3 of the last 4 failed: 75% > 50%
        await loop_with(FixedSearch(fail=True)).run({"temperature": 1.0, "top_p": 1.0}, **row)


@pytest.mark.slow  # starts a TLS + token RetrievalService
async def test_search_tool_uses_tls_and_token_from_the_pod_environment(
    monkeypatch: pytest.MonkeyPatch, tls_retriever: tuple[ServiceProcess, Path, str]
) -> None:
    """With TLS and auth on (as ci/gpu-values sets them), the tool reads SEARCHRL_TLS / SEARCHRL_TLS_CA_FILE /
    SEARCHRL_AUTH_TOKEN_FILE as the RayJob manifests set them and gets documents; without them every search fails."""
    proc, ca_file, token_file = tls_retriever
    monkeypatch.delenv("SEARCHRL_TLS", raising=False)
    monkeypatch.delenv("SEARCHRL_AUTH_TOKEN", raising=False)
    plain = load_tool(monkeypatch, proc.target)
    plain.timeout_s = 5.0
    resp, _, metrics = await plain.execute("x", {"query": "Eiffel Tower"})
    assert resp.text == "Search error: the search engine is unavailable." and metrics["error"]
    monkeypatch.setenv("SEARCHRL_TLS", "true")
    monkeypatch.setenv("SEARCHRL_TLS_CA_FILE", str(ca_file))
    monkeypatch.setenv("SEARCHRL_AUTH_TOKEN_FILE", token_file)
    tool = load_tool(monkeypatch, f"localhost:{proc.target.rsplit(':', 1)[1]}")
    resp, _, metrics = await tool.execute("x", {"query": "Eiffel Tower"})
    assert not metrics["error"] and metrics["num_documents"] == 5 and "Eiffel" in (resp.text or "")
