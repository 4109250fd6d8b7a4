"""``SearchRLSearchTool``: a verl ``BaseTool`` that searches through the searchrl gRPC services.

Registered by the tool-config YAML ``trainer/searchrl/trainer/config/tools/searchrl_search.yaml`` (``class_name``, ``config``,
OpenAI ``tool_schema``), as verl's ``initialize_tools_from_config`` expects. It serves two callers:

* verl's stock ``ToolAgentLoop`` (function-calling models): ``create(create_kwargs=...)`` stores the question, gold
  answers and curriculum step of a trajectory (``extra_info.tools_kwargs.search.create_kwargs`` written by
  ``searchrl data prepare``); ``execute(instance_id, {"query": ...})`` returns the documents as a ``ToolResponse``.
* our ``searchrl_research`` AgentLoop (ReSearch tags): it uses the tool as its
  :class:`~searchrl.agent.loop.SearchBackend` through :meth:`SearchRLSearchTool.search`, so the tool config
  is the one place where search targets are set.

``config`` keys: ``backend`` (``retriever``, ``simulator``, ``mixed``), ``retriever_target``, ``simulator_target``,
``mix_ratio``, ``training`` (send question/gold answers to the simulator), ``top_k``, ``timeout_s``,
``max_query_chars``, ``max_doc_chars``, ``total_steps`` (curriculum length when ``create_kwargs`` lack it),
``auth_token_env`` (name of an environment variable holding the services' bearer token).

TLS and auth come from the environment (:meth:`searchrl.client.base.ChannelOptions.from_env`): ``SEARCHRL_TLS``,
``SEARCHRL_TLS_CA_FILE``, ``SEARCHRL_TLS_CLIENT_CERT_FILE`` / ``_KEY_FILE`` and ``SEARCHRL_AUTH_TOKEN_FILE`` or the
variable named by ``auth_token_env``. A search that fails anyway is an error observation, counted in
``searchrl_policy_searches_total{outcome="error"|"timeout"}``, and the agent loop fails the run past
``SEARCHRL_MAX_SEARCH_FAILURE_RATIO``.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from searchrl.agent.loop import SearchContext, SearchOutcome, run_search
from searchrl.agent.search import SearchSpec, build_search_backend
from searchrl.agent.settings import AgentSettings
from searchrl.client.base import ChannelOptions
from searchrl.reward.verl_reward import golden_answers_of


class SearchRLSearchTool(BaseTool):
    """Search through the RetrievalService / SimulatedSearchService as a verl tool.

    Args:
        config: the ``config`` mapping of the tool-config YAML (keys in the module docstring).
        tool_schema: the OpenAI function schema (a function with one string parameter ``query``).
    """

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema) -> None:
        super().__init__(config, tool_schema)
        self.backend_kind = str(config.get("backend", "retriever"))
        self.timeout_s = float(config.get("timeout_s", 30.0))
        self.settings = AgentSettings(
            top_k=int(config.get("top_k", 5)),
            search_timeout_s=self.timeout_s,
            max_query_chars=int(config.get("max_query_chars", 2000)),
            max_doc_chars=int(config.get("max_doc_chars", 0)),
        )
        self.total_steps = config.get("total_steps")
        self._backend: Any = config.get("backend_object")  # tests / in-process use: an existing SearchBackend
        self._instances: dict[str, SearchContext] = {}

    def _get_backend(self) -> Any:
        # Created lazily: grpc.aio channels belong to the event loop that runs the rollouts.
        if self._backend is None:
            # TLS (SEARCHRL_TLS, SEARCHRL_TLS_CA_FILE, mTLS cert/key) and the token file from the pod's environment,
            # as the RayJob manifests set them; the tool config's auth_token_env names a token variable too.
            options = ChannelOptions.from_env()
            token_env = str(self.config.get("auth_token_env", "") or "")
            if token_env and os.environ.get(token_env):
                options.token = os.environ[token_env].strip()
            spec = SearchSpec(
                kind=self.backend_kind,
                retriever_target=str(self.config.get("retriever_target", "")),
                simulator_target=str(self.config.get("simulator_target", "")),
                mix_ratio=float(self.config.get("mix_ratio", 0.5)),
                training=bool(self.config.get("training", True)),
                timeout_s=self.timeout_s,
                options=options,
            )
            self._backend = build_search_backend(spec)
        return self._backend

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        """Starts a trajectory's tool instance; ``create_kwargs`` may carry question, golden_answers, step, seed."""
        ck = dict(kwargs.get("create_kwargs") or {})
        iid = instance_id or uuid4().hex
        total = ck.get("total_steps", self.total_steps)
        self._instances[iid] = SearchContext(
            question=str(ck.get("question", "")),
            golden_answers=golden_answers_of(ck.get("golden_answers", ck.get("ground_truth"))),
            step=int(ck["step"]) if ck.get("step") is not None else None,
            total_steps=int(total) if total is not None else None,
            seed=int(ck["seed"]) if ck.get("seed") is not None else None,
        )
        return iid, ToolResponse()

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """The :class:`~searchrl.agent.loop.SearchBackend` interface (used by our AgentLoop)."""
        outcome: SearchOutcome = await self._get_backend().search(query, top_k=top_k, context=context)
        return outcome

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        """Runs one search for verl's ToolAgentLoop.

        Args:
            instance_id: from :meth:`create` (an unknown id searches without question context).
            parameters: ``{"query": str}`` (or Search-R1's ``{"query_list": [str, ...]}``: the first query is used).

        Returns:
            ``(ToolResponse(text=documents or error message), 0.0, metrics)``; metrics hold ``latency_ms``,
            ``num_documents``, ``cache_hit``, ``backend`` and ``error``. Never raises for bad input or a dead backend
            (the observation texts and the search counter are the agent loop's: :func:`~searchrl.agent.loop.run_search`).
        """
        query = parameters.get("query")
        if query is None and parameters.get("query_list"):
            query = list(parameters["query_list"])[0]
        context = self._instances.get(instance_id) or SearchContext(question="", golden_answers=[])
        record, body = await run_search(self, str(query or "").strip(), context, self.settings, self.backend_kind)
        metrics = {
            "latency_ms": record.latency_ms,
            "num_documents": len(record.documents),
            "cache_hit": record.cache_hit,
            "backend": record.backend,
            "error": record.error,
        }
        return ToolResponse(text=body), 0.0, metrics

    async def calc_reward(self, instance_id: str, **kwargs: Any) -> float:
        """No step reward: the episode reward comes from ``compute_score``."""
        return 0.0

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        """Forgets the trajectory's context."""
        self._instances.pop(instance_id, None)
