"""The local GRPO trainer: ReSearch / ZeroSearch training on one machine (CPU or one GPU), on verl's algorithms.

verl's workers need GPUs and Ray, so at desk scale the loop is ours while the maths is verl's
(:mod:`searchrl.trainer.grpo` wraps ``verl.trainer.ppo.core_algos``). One step:

1. **rollout** - take ``data.batch_size`` questions (a seeded permutation per epoch; the cursor is checkpointed) and
   run ``data.group_size`` episodes of the agent loop per question, concurrently, with the live policy (an in-process
   :class:`~searchrl.services.policy.engines.TransformersEngine` sharing the training model, or a remote
   PolicyService that receives the new weights with ``LoadWeights`` after each update). Every episode has its own
   seed derived from ``(seed, step, question slot, sample)``. Searches go to the configured backend with the
   curriculum position ``(step - 1, total)`` for the ZeroSearch simulator.
2. **reward** - score each episode in-process with ``searchrl.reward.scoring.score``.
3. **update** - GRPO advantages per question group; old log-probs recomputed with a forward pass of the current
   weights (on-policy: the ratio starts at 1) and reference log-probs from the frozen initial model; the PPO-clip
   loss over loss-masked tokens plus ``kl_coef`` x low-variance KL, aggregated ``token-mean`` over the mini-batch
   (gradient accumulation over micro-batches gives the same gradient as one big batch); AdamW, gradient clipping.
4. **report** - MLflow metrics every step, Prometheus gauges, guard rails, trajectories to the Redis rollout stream,
   checkpoints every N steps.

Tensor layout in the update (as verl's): prompts left-padded to the longest prompt ``P`` of the micro-batch,
responses right-padded to the longest response ``R``; ``input_ids (b, P + R)``; the logits of the ``R + 1`` last
positions (``logits_to_keep``) give the log-probs of the ``R`` response tokens; ``response_mask (b, R)`` is the
episode's loss mask (0 for inserted ``<result>`` tokens, the response prefix and padding).

SIGINT / SIGTERM: the first signal lets the running step finish, writes a checkpoint and returns; a second one during
the rollout or reward phase abandons the step (nothing of it is kept; the previous step's state is checkpointed) and
returns at once. An update that has started always finishes, so a checkpoint never holds half an update.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchrl.errors import InvalidRequest
from searchrl.trainer import checkpoint as ckpt
from searchrl.trainer import grpo
from searchrl.trainer.config import TrainConfig
from searchrl.trainer.data import QAExample, load_examples
from searchrl.trainer.guards import GUARDS, GuardEvent, Guards
from searchrl.trainer.telemetry import MlflowRun, TrainerGauges

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, dict[str, float]], None]


class StepAbandoned(Exception):
    """A second stop signal arrived while a step was running; the step's work is discarded."""


# ------------------------------------------------------------------------------------------------ data order


class DataCursor:
    """Which questions come next: a seeded permutation per epoch, read ``batch_size`` at a time.

    A batch that crosses an epoch boundary takes the rest of the epoch and the start of the next one, so every
    question is seen once per epoch. The state is ``(epoch, position)``; the permutation of epoch ``e`` depends only
    on ``(seed, e)``.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if n_rows < 1:
            raise InvalidRequest("no training questions")
        self.n_rows, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def next_batch(self) -> list[int]:
        """Indices of the next ``batch_size`` questions."""
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(out), self.n_rows - self.position)
            out += [int(i) for i in order[self.position : self.position + take]]
            self.position += take
            if self.position >= self.n_rows:
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict` output."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.n_rows:  # the data shrank since the checkpoint: start the next epoch
            self.epoch, self.position = self.epoch + 1, 0


def episode_seed(seed: int, step: int, slot: int, sample: int) -> int:
    """Seed of one episode, a pure function of the run seed, the step, the question slot and the sample index."""
    return int(np.random.SeedSequence([seed, step, slot, sample]).generate_state(1, dtype=np.uint32)[0])


# ------------------------------------------------------------------------------------------------ results


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_id: the MLflow run id.
        tracking_uri: where that run lives.
        step: last finished step.
        metrics: that step's metrics (empty when no step ran).
        history: metrics of every step this call ran, in order.
        checkpoint: the newest checkpoint folder (``None`` when none was written).
        stopped_by: ``None`` (reached ``max_steps``), ``"signal"`` or the guard that stopped the run.
        guard_events: every guard trip of this call.
        output_dir: the run folder.
    """

    run_id: str
    tracking_uri: str
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint: Path | None
    stopped_by: str | None
    guard_events: list[GuardEvent]
    output_dir: Path


# ------------------------------------------------------------------------------------------------ the trainer


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@dataclass
class _Batch:
    input_ids: torch.Tensor  # (b, P + R)
    attention_mask: torch.Tensor  # (b, P + R)
    position_ids: torch.Tensor  # (b, P + R)
    responses: torch.Tensor  # (b, R)
    response_mask: torch.Tensor  # (b, R) float
    response_len: int
    prompt_lists: list[list[int]] = field(default_factory=list)
    response_lists: list[list[int]] = field(default_factory=list)


def _collate(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> _Batch:
    """Left-pads prompts and right-pads responses (verl's layout), on ``device``; see the module docstring."""
    b = len(prompts)
    p_len = max(len(p) for p in prompts)
    r_len = max(max(len(r) for r in responses), 1)
    ids = torch.full((b, p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p_len + r_len), dtype=torch.long)
    resp = torch.full((b, r_len), pad_id, dtype=torch.long)
    rmask = torch.zeros((b, r_len), dtype=torch.float32)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks, strict=True)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, p_len : p_len + len(r)] = 1
            resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[i, : len(r)] = torch.tensor(m, dtype=torch.float32)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    ids, attn, pos, resp, rmask = (t.to(device) for t in (ids, attn, pos, resp, rmask))
    return _Batch(ids, attn, pos, resp, rmask, r_len, [list(p) for p in prompts], [list(r) for r in responses])


def _expand_cache(cache: Any, rows: int) -> None:
    """Repeats a batch-1 KV cache ``rows`` times in place (``expand``: no copy; gradients sum over the rows)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        raise RuntimeError("unsupported KV cache type for prompt sharing")
    for layer in layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)


def response_logits(model: Any, mb: _Batch, *, share_prompt: bool) -> torch.Tensor:
    """Next-token logits ``(b, R, V)`` at the response positions: entry ``t`` predicts response token ``t``.

    Args:
        model: a causal LM.
        mb: the micro-batch from :func:`_collate`.
        share_prompt: run each distinct prompt once and its responses on top of its KV cache (a GRPO group shares
            one prompt, so the prompt is computed once instead of ``n`` times, forward and backward); otherwise one
            forward pass over the padded ``prompt + response`` rows. Both give the same values up to float rounding.
    """
    if not share_prompt:
        out = model(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            use_cache=False,
            logits_to_keep=mb.response_len + 1,
        )
        return out.logits[:, :-1, :]  # type: ignore[no-any-return]
    from transformers import DynamicCache

    dev = mb.input_ids.device
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(mb.prompt_lists):
        groups.setdefault(tuple(prompt), []).append(row)
    parts: dict[int, torch.Tensor] = {}
    r_all = mb.response_len
    for prompt, rows in groups.items():
        p_len, k = len(prompt), len(rows)
        cache = DynamicCache(config=model.config)
        p_out = model(
            input_ids=torch.tensor([prompt], dtype=torch.long, device=dev),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = p_out.logits[:, -1:, :].expand(k, 1, -1)  # predicts response token 0
        r_len = max(max(len(mb.response_lists[r]) for r in rows), 1)
        if r_len > 1:
            _expand_cache(p_out.past_key_values, k)
            ids = torch.full((k, r_len), 0, dtype=torch.long)
            attn = torch.zeros((k, p_len + r_len), dtype=torch.long)
            attn[:, :p_len] = 1
            for i, r in enumerate(rows):
                resp = mb.response_lists[r]
                ids[i, : len(resp)] = torch.tensor(resp, dtype=torch.long)
                attn[i, p_len : p_len + len(resp)] = 1
            pos = torch.arange(p_len, p_len + r_len).unsqueeze(0).expand(k, -1)
            ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
            r_out = model(
                input_ids=ids[:, :-1],
                attention_mask=attn[:, :-1],
                position_ids=pos[:, :-1],
                past_key_values=p_out.past_key_values,
                use_cache=True,
            )
            logits = torch.cat([first, r_out.logits], dim=1)  # (k, r_len, V)
        else:
            logits = first
        for i, r in enumerate(rows):
            row_logits = logits[i]
            if row_logits.shape[0] < r_all:  # pad to the micro-batch width; padded positions are masked out
                row_logits = torch.cat(
                    [row_logits, row_logits.new_zeros(r_all - row_logits.shape[0], row_logits.shape[1])]
                )
            parts[r] = row_logits
    return torch.stack([parts[r] for r in range(len(mb.prompt_lists))])


@dataclass
class _EpisodeData:
    """One scored episode as the update needs it."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    reward: float
    group: str


class LocalTrainer:
    """GRPO on one machine. Use :func:`train` unless you need the pieces.

    Args:
        config: the run's configuration.
        search_backend: a ready :class:`~searchrl.agent.loop.SearchBackend` to use instead of building one
            from ``config.rollout.search`` (e.g. an in-process retriever); ``None``: build from the config.
        examples: training questions to use instead of loading ``config.data.train``.
        reward_fn: a reward function with verl's ``compute_score`` contract instead of ``config.reward.function``.

    Raises:
        InvalidRequest: unusable config or data, or a reward function that cannot be loaded.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        search_backend: Any = None,
        examples: Sequence[QAExample] | None = None,
        reward_fn: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config
        self._search_override = search_backend
        self.examples = (
            list(examples) if examples is not None else load_examples(config.data.train, limit=config.data.limit)
        )
        if config.data.limit:
            self.examples = self.examples[: config.data.limit]
        self.cursor = DataCursor(len(self.examples), config.data.batch_size, config.seed, config.data.shuffle)
        self.guards = Guards(config.guards)
        self.step = 0
        self.run: MlflowRun | None = None
        self.gauges: TrainerGauges | None = None
        self._stop_requested = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None
        self._policy_client: Any = None
        self._search: Any = None
        self._rollout_store: Any = None
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: ckpt.CheckpointInfo | None = None
        self._rollout_task: asyncio.Task[Any] | None = None
        self._setup_done = False
        self._reward_fn: Callable[..., Any] | None = reward_fn or (
            load_reward_function(config.reward.function) if config.reward.function else None
        )

    # -------------------------------------------------------------------------------------------- set-up
    def setup(self, *, resume: bool = True) -> None:
        """Loads the models, the optimizer, the search backend and MLflow; restores the newest checkpoint when
        ``resume`` and one exists.

        Raises:
            InvalidRequest: the model cannot be loaded.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from searchrl.assets import policy_model_path

        cfg = self.config
        if cfg.model.torch_threads:
            torch.set_num_threads(cfg.model.torch_threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        cfg.output_path.mkdir(parents=True, exist_ok=True)
        found = ckpt.latest_checkpoint(cfg.checkpoint_path) if resume else None
        base_path = policy_model_path(cfg.model.path)
        ref_path = policy_model_path(cfg.model.reference_path) if cfg.model.reference_path else base_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base_path)
            # Master weights stay float32; bfloat16 is used through autocast (verl's FSDP mixed precision does the same).
            ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
            if found is not None:
                self.model = AutoModelForCausalLM.from_pretrained(found.model_path, dtype=torch.float32)
            elif ref_path == base_path:
                self.model = copy.deepcopy(ref_model)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        except OSError as exc:
            raise InvalidRequest(f"cannot load the policy {cfg.model.path!r}: {exc}") from exc
        self.ref_model = ref_model.eval().requires_grad_(False)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.eval()
        self.pad_id = int(
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        algo = cfg.algorithm
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=algo.lr, betas=algo.betas, weight_decay=algo.weight_decay
        )
        warm = algo.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warm) if warm else 1.0
        )
        self.actor_cfg = grpo.actor_config(
            clip_ratio=algo.clip_ratio,
            clip_ratio_low=algo.clip_ratio_low,
            clip_ratio_high=algo.clip_ratio_high,
            clip_ratio_c=algo.clip_ratio_c,
            loss_agg_mode=algo.loss_agg_mode,
            kl_loss_coef=algo.kl_coef,
            kl_loss_type=algo.kl_type,
            entropy_coeff=algo.entropy_coeff,
            rollout_n=cfg.data.group_size,
        )
        run_id = None
        if found is not None:
            state = ckpt.load_state(found)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.cursor.load_state_dict(state["cursor"])
            self.guards.load_state_dict(state.get("guards", {}))
            self.step = int(state["step"])
            run_id = state.get("mlflow_run_id")
            ckpt.set_rng_state(state["rng"])
            self.last_checkpoint = found
            log.info("resumed from %s (step %d)", found.path, self.step)
        self.run = MlflowRun(
            cfg.tracking_uri,
            cfg.logging.experiment,
            run_name=cfg.logging.run_name or cfg.output_path.name,
            run_id=run_id,
            tags={"searchrl.component": "local-trainer", "searchrl.model": cfg.model.path},
        )
        if run_id is None:
            self.run.log_params(_flatten(cfg.model_dump(mode="json")))
        (cfg.output_path / "config.yaml").write_text(cfg.to_yaml())
        self.gauges = TrainerGauges(cfg.logging.metrics_port, cfg.logging.metrics_host)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._setup_async())
        self._setup_done = True

    async def _setup_async(self) -> None:
        cfg = self.config
        self._search = self._search_override if self._search_override is not None else build_search_backend(cfg)
        if cfg.rollout.engine == "inprocess":
            from searchrl.services.policy.engines import TransformersEngine

            self._engine = TransformersEngine(
                self.model,
                tokenizer=self.tokenizer,
                max_batch_size=cfg.rollout.max_batch_size,
                version=f"step-{self.step}",
                # one intra-op thread for decoding: on a few shared cores two threads oversubscribe (4-10x slower
                # decode steps measured in benchmarks/rollout_bench.py conditions)
                torch_threads=1,
            )
            self._generator = self._engine
        else:
            from searchrl.client.policy import PolicyClient
            from searchrl.services.policy.engines import RemotePolicyBackend

            self._policy_client = PolicyClient(cfg.rollout.policy_target)
            self._generator = RemotePolicyBackend(self._policy_client, self.tokenizer)
            if self.step > 0 and self.last_checkpoint is not None:
                await self._policy_client.load_weights(
                    str(self.last_checkpoint.model_path), policy_version=f"step-{self.step}", timeout_s=600
                )
        if cfg.logging.rollout_redis_url:
            from searchrl.services.rollout_store import RolloutStore

            self._rollout_store = RolloutStore(cfg.logging.rollout_redis_url, stream=cfg.logging.rollout_stream)

    # -------------------------------------------------------------------------------------------- one step
    async def _rollout(self, step: int, batch: list[QAExample]) -> list[Any]:
        from searchrl.agent.loop import AgentLoop, AgentLoopConfig, EpisodeRequest, run_episodes

        cfg = self.config
        agent_fields = cfg.rollout.agent.model_dump()
        loop_cfg = AgentLoopConfig(**agent_fields, search_timeout_s=cfg.rollout.search.timeout_s)
        agent = AgentLoop(self._generator, self._search, loop_cfg)
        n = cfg.data.group_size
        requests = [
            EpisodeRequest(
                ex.question, list(ex.golden_answers), question_id=ex.id, seed=episode_seed(cfg.seed, step, slot, j)
            )
            for slot, ex in enumerate(batch)
            for j in range(n)
        ]
        # The curriculum position is the number of finished steps: the first step samples at p_start (ZeroSearch).
        return await run_episodes(
            agent,
            requests,
            max_concurrency=cfg.rollout.concurrency,
            step=step - 1,
            total_steps=self.config.curriculum_total_steps,
        )

    def _score(self, episodes: Sequence[Any], examples: Sequence[QAExample]) -> list[Any]:
        """Scores episodes (``examples[i // group_size]`` is episode ``i``'s question) with the scheme, or with the
        custom reward function when one is configured (the scheme's F1/EM/format then stay as diagnostics)."""
        import dataclasses

        from searchrl.reward.scoring import score

        cfg = self.config
        scheme = cfg.reward.scheme
        info_tag = "result" if cfg.rollout.agent.protocol == "research" else "information"
        results = [
            score(ep.response_text, ep.golden_answers, scheme, ended_with_eos=ep.ended_with_eos, info_tag=info_tag)
            for ep in episodes
        ]
        bonus = cfg.reward.format_bonus
        if bonus:
            protocol = cfg.rollout.agent.protocol
            results = [
                dataclasses.replace(r, reward=r.reward + bonus * format_progress(ep.response_text, protocol))
                for r, ep in zip(results, episodes, strict=True)
            ]
        if self._reward_fn is None:
            return results
        out = []
        for i, (ep, res) in enumerate(zip(episodes, results, strict=True)):
            ex = examples[i // cfg.data.group_size]
            extra = {"question": ep.question, "id": ex.id, "scheme": scheme, "ended_with_eos": ep.ended_with_eos}
            got = self._reward_fn(
                data_source=ex.source,
                solution_str=ep.response_text,
                ground_truth={"target": list(ex.golden_answers)},
                extra_info=extra,
            )
            value = got["score"] if isinstance(got, dict) else got
            shaped = bonus * format_progress(ep.response_text, cfg.rollout.agent.protocol) if bonus else 0.0
            out.append(dataclasses.replace(res, reward=float(value) + shaped))
        return out

    def _forward_logprobs(
        self, model: Any, mb: _Batch, *, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs ``(b, R)`` of the response tokens (and their entropies) under ``model``."""
        cfg = self.config
        use_bf16 = cfg.model.dtype == "bfloat16"
        share = cfg.algorithm.share_prompt and not cfg.model.gradient_checkpointing
        with torch.autocast(mb.input_ids.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = response_logits(model, mb, share_prompt=share).float()  # (b, R, V)
        logp = grpo.token_log_probs(logits, mb.responses)
        ent = None
        if with_entropy:
            if self.actor_cfg.entropy_coeff != 0:
                ent = grpo.token_entropy(logits)
            else:
                with torch.no_grad():
                    ent = grpo.token_entropy(logits.detach())
        return logp, ent

    def _plan(self, n_ep: int) -> list[list[list[int]]]:
        """Mini-batches of micro-batches of episode indices (the same partition for every pass of a step)."""
        algo = self.config.algorithm
        size = algo.micro_batch_size
        plan = []
        for mini in np.array_split(np.arange(n_ep), algo.mini_batches):
            idx = [int(i) for i in mini]
            if idx:
                plan.append([idx[s : s + size] for s in range(0, len(idx), size)])
        return plan

    def _collate(self, data: Sequence[_EpisodeData], part: Sequence[int]) -> _Batch:
        return _collate(
            [data[i].prompt_ids for i in part],
            [data[i].response_ids for i in part],
            [data[i].loss_mask for i in part],
            self.pad_id,
            device=next(self.model.parameters()).device,
        )

    def _update(self, data: list[_EpisodeData]) -> dict[str, float]:
        """GRPO update on the scored episodes; returns the actor metrics."""
        algo = self.config.algorithm
        n_ep = len(data)
        plan = self._plan(n_ep)
        r_max = max(max(len(d.response_ids) for d in data), 1)

        # Advantages per question group (GRPO), broadcast over each response's loss tokens.
        rewards = torch.tensor([d.reward for d in data], dtype=torch.float32)
        full_mask = torch.zeros((n_ep, r_max))
        for i, d in enumerate(data):
            full_mask[i, : len(d.loss_mask)] = torch.tensor(d.loss_mask, dtype=torch.float32)
        advantages = grpo.grpo_advantages(
            rewards, full_mask, [d.group for d in data], epsilon=algo.adv_epsilon, norm_by_std=algo.norm_adv_by_std
        )

        # Old (behaviour) log-probs are those of the weights before the update. With one PPO epoch and one
        # mini-batch nothing changes the weights before the only forward pass, so that pass's detached log-probs are
        # exactly the recomputed old log-probs (ratio 1); otherwise a separate no-grad pass computes them first, over
        # the same micro-batches as the update. Reference log-probs come from the frozen initial model.
        reuse_first_pass = algo.ppo_epochs == 1 and len(plan) == 1
        old_lp: dict[int, torch.Tensor] = {}
        ref_lp: dict[int, torch.Tensor] = {}
        self.model.eval()
        with torch.no_grad():
            for mini in plan:
                for part in mini:
                    mb = self._collate(data, part)
                    rlp, _ = self._forward_logprobs(self.ref_model, mb, with_entropy=False)
                    for row, i in enumerate(part):
                        ref_lp[i] = rlp[row]
                    if not reuse_first_pass:
                        lp, _ = self._forward_logprobs(self.model, mb, with_entropy=False)
                        for row, i in enumerate(part):
                            old_lp[i] = lp[row]

        sums: dict[str, float] = {
            "kl": 0.0,
            "entropy": 0.0,
            "clip": 0.0,
            "clip_lower": 0.0,
            "approx_kl": 0.0,
            "tokens": 0.0,
        }
        pg_losses: list[float] = []
        losses: list[float] = []
        grad_norms: list[float] = []
        skipped = 0
        self.model.train()
        try:
            for _epoch in range(algo.ppo_epochs):
                for mini in plan:
                    mini_idx = [i for part in mini for i in part]
                    n_tokens = int(sum(sum(data[i].loss_mask) for i in mini_idx))
                    self.optimizer.zero_grad(set_to_none=True)
                    mini_loss = mini_pg = 0.0
                    for part in mini:
                        mb = self._collate(data, part)
                        logp, ent = self._forward_logprobs(self.model, mb, with_entropy=True)
                        if reuse_first_pass:
                            for row, i in enumerate(part):
                                old_lp[i] = logp[row].detach()
                        old = torch.stack([old_lp[i] for i in part])
                        ref = torch.stack([ref_lp[i] for i in part])
                        adv = advantages[part][:, : mb.response_len].to(logp.device)
                        out = grpo.grpo_objective(
                            logp,
                            old,
                            ref,
                            adv,
                            mb.response_mask,
                            self.actor_cfg,
                            entropy=ent,
                            batch_num_tokens=max(n_tokens, 1),
                            global_batch_size=len(mini_idx),
                        )
                        out.loss.backward()
                        mini_loss += float(out.loss.detach())
                        mini_pg += out.pg_loss
                        # Token-weighted diagnostics, independent of the aggregation mode.
                        mask = mb.response_mask
                        tok = float(mask.sum())
                        with torch.no_grad():
                            kld = grpo.kl_per_token(logp.detach(), ref, self.actor_cfg.kl_loss_type)
                            sums["kl"] += float((kld * mask).nan_to_num().sum())
                            if ent is not None:
                                sums["entropy"] += float((ent.detach() * mask).sum())
                        sums["clip"] += out.clip_fraction * tok
                        sums["clip_lower"] += out.metrics["clip_fraction_lower"] * tok
                        sums["approx_kl"] += out.approx_kl * tok
                        sums["tokens"] += tok
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), algo.max_grad_norm))
                    if math.isfinite(grad_norm):
                        self.optimizer.step()
                    else:  # verl skips the step on a non-finite gradient norm, too
                        skipped += 1
                        log.warning("non-finite gradient norm at step %d: update skipped", self.step + 1)
                        self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    grad_norms.append(grad_norm)
                    losses.append(mini_loss)
                    pg_losses.append(mini_pg)
        finally:
            self.model.eval()
        # How far the rollout engine's log-probs are from the trainer's forward pass (both float32: ~1e-5).
        gap_sum = gap_n = 0.0
        for i, d in enumerate(data):
            n = len(d.response_ids)
            if not n or len(d.rollout_logprobs) != n:
                continue
            m = torch.tensor(d.loss_mask, dtype=torch.bool)
            if m.any():
                beh = torch.tensor(d.rollout_logprobs, dtype=torch.float32)
                gap_sum += float((old_lp[i][:n].cpu()[m] - beh[m]).abs().sum())
                gap_n += float(m.sum())
        tokens = max(sums["tokens"], 1.0)
        return {
            "actor/loss": float(np.mean(losses)),
            "actor/pg_loss": float(np.mean(pg_losses)),
            "actor/kl": sums["kl"] / tokens,
            "actor/entropy": sums["entropy"] / tokens,
            "actor/clip_fraction": sums["clip"] / tokens,
            "actor/clip_fraction_lower": sums["clip_lower"] / tokens,
            "actor/ppo_kl": sums["approx_kl"] / tokens,
            "actor/grad_norm": float(np.mean(grad_norms)),
            "actor/skipped_updates": float(skipped),
            "actor/lr": float(self.scheduler.get_last_lr()[0]),
            "actor/loss_tokens": float(sums["tokens"]) / algo.ppo_epochs,
            "actor/rollout_logprob_gap": gap_sum / gap_n if gap_n else 0.0,
        }

    def _rollout_metrics(self, episodes: Sequence[Any], scores: Sequence[Any]) -> dict[str, float]:
        from searchrl.rollout.v1 import rollout_pb2

        rewards = [s.reward for s in scores]
        n = max(len(episodes), 1)
        searches = [len(ep.searches) for ep in episodes]
        calls = [s for ep in episodes for s in ep.searches]
        with_docs = [s for s in calls if s.documents]
        noisy = [s for s in with_docs if any(d.quality == rollout_pb2.DOCUMENT_QUALITY_NOISY for d in s.documents)]
        # Groups whose rewards are all equal give zero advantage: no learning signal from them.
        groups: dict[str, list[float]] = {}
        for ep, r in zip(episodes, rewards, strict=True):
            groups.setdefault(ep.question_id, []).append(r)
        flat = sum(1 for g in groups.values() if len(set(g)) == 1)
        return {
            "reward/mean": float(np.mean(rewards)),
            "reward/std": float(np.std(rewards)),
            "reward/max": float(np.max(rewards)),
            "reward/min": float(np.min(rewards)),
            "reward/f1": float(np.mean([s.f1 for s in scores])),
            "reward/em": float(np.mean([s.em for s in scores])),
            "reward/format_rate": float(np.mean([1.0 if s.format_ok else 0.0 for s in scores])),
            "reward/answer_rate": float(np.mean([1.0 if s.answer else 0.0 for s in scores])),
            "reward/flat_group_share": flat / max(len(groups), 1),
            "rollout/searches_per_episode": float(np.mean(searches)),
            "rollout/search_error_rate": (sum(1 for s in calls if s.error) / len(calls)) if calls else 0.0,
            # service failures only (errors, timeouts), not the policy's invalid queries: guards.search_failure
            "rollout/searches": float(sum(s.sent for s in calls)),
            "rollout/search_failures": float(sum(s.failed for s in calls)),
            "rollout/search_failure_rate": sum(s.failed for s in calls) / max(sum(s.sent for s in calls), 1),
            "rollout/search_cache_hit_rate": (sum(1 for s in calls if s.cache_hit) / len(calls)) if calls else 0.0,
            "rollout/noisy_share": (len(noisy) / len(with_docs)) if with_docs else 0.0,
            "rollout/response_length": float(np.mean([len(ep.response_ids) for ep in episodes])),
            "rollout/prompt_length": float(np.mean([len(ep.prompt_ids) for ep in episodes])),
            "rollout/generated_tokens": float(np.mean([sum(ep.loss_mask) for ep in episodes])),
            "rollout/turns": float(np.mean([len(ep.turns) for ep in episodes])),
            "rollout/ended_with_eos": sum(1 for ep in episodes if ep.ended_with_eos) / n,
            "rollout/episodes": float(len(episodes)),
        }

    async def _publish(self, step: int, episodes: Sequence[Any], scores: Sequence[Any]) -> None:
        if self._rollout_store is None:
            return
        msgs = []
        for i, (ep, s) in enumerate(zip(episodes, scores, strict=True)):
            ep.policy_version = ep.policy_version or f"step-{step - 1}"
            msgs.append(ep.to_proto(reward=s.reward, group_index=i // self.config.data.group_size))
        try:
            await self._rollout_store.add_many(msgs)
        except Exception as exc:  # noqa: BLE001 - a down Redis must not stop training
            log.warning("could not push %d trajectories to the rollout store: %s", len(msgs), exc)

    def train_step(self) -> tuple[dict[str, float], list[GuardEvent]]:
        """Runs one full GRPO step (rollout, reward, update, report); returns its metrics and guard trips."""
        assert self._loop is not None and self.run is not None and self.gauges is not None
        cfg = self.config
        step = self.step + 1
        t0 = time.perf_counter()
        cursor_before = self.cursor.state_dict()
        batch = [self.examples[i] for i in self.cursor.next_batch()]
        log.info("step %d started: %d questions x %d samples", step, len(batch), cfg.data.group_size)
        try:
            self._rollout_task = self._loop.create_task(self._rollout(step, batch))
            try:
                episodes = self._loop.run_until_complete(self._rollout_task)
            except asyncio.CancelledError:
                raise StepAbandoned() from None
            finally:
                self._rollout_task = None
            self._check_abandon()
            t1 = time.perf_counter()
            scores = self._score(episodes, batch)
            t2 = time.perf_counter()
            self._check_abandon()
        except StepAbandoned:
            self.cursor.load_state_dict(cursor_before)
            raise
        data = [
            _EpisodeData(
                ep.prompt_ids,
                ep.response_ids,
                ep.loss_mask,
                ep.response_logprobs,
                s.reward,
                f"{step}:{i // cfg.data.group_size}",
            )
            for i, (ep, s) in enumerate(zip(episodes, scores, strict=True))
        ]
        actor = self._update(data)
        t3 = time.perf_counter()
        self.step = step
        version = f"step-{step}"
        if self._engine is not None:
            self._engine.set_model(self.model, version)
        metrics = {**self._rollout_metrics(episodes, scores), **actor}
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2})
        if self._policy_client is not None:
            t4 = time.perf_counter()
            weights = cfg.output_path / "live_weights"
            self.model.save_pretrained(weights)
            self.tokenizer.save_pretrained(weights)
            self._loop.run_until_complete(
                self._policy_client.load_weights(str(weights), policy_version=version, timeout_s=600)
            )
            metrics["time/weight_sync_s"] = time.perf_counter() - t4
        self._loop.run_until_complete(self._publish(step, episodes, scores))
        metrics["time/total_s"] = time.perf_counter() - t0
        metrics["train/epoch"] = float(self.cursor.epoch)
        events = self.guards.update(
            step,
            reward_mean=metrics["reward/mean"],
            searches_per_episode=metrics["rollout/searches_per_episode"],
            kl=metrics["actor/kl"],
            searches=int(metrics["rollout/searches"]),
            failed_searches=int(metrics["rollout/search_failures"]),
        )
        for g in GUARDS:
            metrics[f"guard/{g}"] = 1.0 if self.guards.tripped.get(g) else 0.0
        self.run.log_metrics(metrics, step=step)
        self.gauges.update(step, metrics, self.guards.tripped)
        self._write_jsonl("metrics.jsonl", [{"step": step, **metrics}])
        if cfg.trainer.log_trajectories:
            rows = [
                {"step": step, "question": ep.question, "golden_answers": ep.golden_answers, "response": ep.response_text,
                 "reward": s.reward, "f1": s.f1, "format_ok": s.format_ok, "format_error": s.format_error,
                 "searches": [x.query for x in ep.searches], "finish_reason": ep.finish_reason}
                for ep, s in list(zip(episodes, scores, strict=True))[: cfg.trainer.log_trajectories]
            ]  # fmt: skip
            self._write_jsonl("trajectories.jsonl", rows)
        self.history.append(metrics)
        return metrics, events

    def _write_jsonl(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        with open(self.config.output_path / name, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    # -------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> ckpt.CheckpointInfo:
        """Writes a checkpoint of the current step (see :mod:`searchrl.trainer.checkpoint`)."""
        assert self.run is not None
        cfg = self.config
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "cursor": self.cursor.state_dict(),
            "guards": self.guards.state_dict(),
            "mlflow_run_id": self.run.run_id,
        }
        info = ckpt.save_checkpoint(
            cfg.checkpoint_path,
            self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            state=state,
            config_yaml=cfg.to_yaml(),
            keep_last=cfg.checkpoint.keep_last,
        )
        self.last_checkpoint = info
        self.run.set_tag("searchrl.last_checkpoint", str(info.path))
        if cfg.logging.log_checkpoints_to_mlflow:
            self.run.log_artifact(info.model_path, f"checkpoints/{info.path.name}")
        return info

    # -------------------------------------------------------------------------------------------- signals
    def request_stop(self) -> None:
        """Asks the run to stop: the first call finishes the running step and checkpoints; the second abandons it."""
        self._stop_requested += 1
        if self._stop_requested == 1:
            log.warning("stop requested: finishing the current step, then writing a checkpoint")
        else:
            log.warning("second stop request: abandoning the current step")
            task, loop = self._rollout_task, self._loop
            if task is not None and loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)

    def _check_abandon(self) -> None:
        if self._stop_requested >= 2:
            raise StepAbandoned()

    # -------------------------------------------------------------------------------------------- the run
    def fit(self, progress: ProgressFn | None = None) -> TrainResult:
        """Runs steps until ``trainer.max_steps``, a stop request or a stopping guard; always checkpoints on the way
        out when a step finished since the last checkpoint."""
        if not self._setup_done:
            self.setup()
        assert self.run is not None
        cfg = self.config
        events: list[GuardEvent] = []
        stopped_by: str | None = None
        status = "FINISHED"
        metrics: dict[str, float] = {}
        try:
            while self.step < cfg.trainer.max_steps:
                if self._stop_requested:
                    stopped_by = "signal"
                    break
                try:
                    metrics, step_events = self.train_step()
                except StepAbandoned:
                    stopped_by = "signal"
                    break
                events += step_events
                if progress is not None:
                    progress(self.step, metrics)
                every = cfg.checkpoint.every_steps
                if every and self.step % every == 0:
                    self.save_checkpoint()
                stop_events = [e for e in step_events if e.action == "stop"]
                if stop_events:
                    stopped_by = stop_events[0].guard
                    self.run.set_tag("searchrl.stopped_by", stopped_by)
                    break
            done_step = self.last_checkpoint.step if self.last_checkpoint else 0
            if self.step > done_step and (cfg.checkpoint.save_final or stopped_by is not None):
                self.save_checkpoint()
            if stopped_by == "signal":
                status = "KILLED"
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.run.finish(status)
        return TrainResult(
            run_id=self.run.run_id,
            tracking_uri=cfg.tracking_uri,
            step=self.step,
            metrics=metrics or (self.history[-1] if self.history else {}),
            history=list(self.history),
            checkpoint=self.last_checkpoint.path if self.last_checkpoint else None,
            stopped_by=stopped_by,
            guard_events=events,
            output_dir=cfg.output_path,
        )

    def close(self) -> None:
        """Releases the engine, clients, the metrics server and the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():

            async def _close() -> None:
                if self._engine is not None:
                    await self._engine.close()
                for obj in (self._search, self._policy_client, self._rollout_store):
                    closer = getattr(obj, "close", None)
                    if closer is not None:
                        try:
                            res = closer()
                            if asyncio.iscoroutine(res):
                                await res
                        except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                            log.debug("close failed: %s", exc)

            loop.run_until_complete(_close())
            loop.close()
        if self.gauges is not None:
            self.gauges.close()


def build_search_backend(config: TrainConfig) -> Any:
    """The search backend named by ``config.rollout.search`` (call it on the event loop that will use it).

    Raises:
        InvalidRequest: an unknown backend or a missing target.
    """
    from searchrl.agent.search import build_search_backend as build

    s = config.rollout.search
    if s.backend == "inprocess":
        return inprocess_retriever(s.index_dir)
    return build(
        s.backend,
        retriever_target=s.retriever_target,
        simulator_target=s.simulator_target,
        mix_ratio=s.mixed_ratio,
        training=True,
        seed=config.seed,
        timeout_s=s.timeout_s,
    )


def inprocess_retriever(index_dir: str | Path | None = None, *, torch_threads: int = 0) -> Any:
    """A search backend that queries a FAISS index in this process (no RetrievalService needed).

    Args:
        index_dir: an index folder written by ``searchrl index build``; ``None``: the bundled Wikipedia summaries
            index, built and cached on first use.
        torch_threads: threads of the query encoder (0: torch's default).

    Returns:
        An :class:`~searchrl.agent.search.InProcessSearch` named ``retriever``.
    """
    from searchrl.agent.search import InProcessSearch
    from searchrl.retriever.index import ensure_wiki_index, load_index
    from searchrl.rollout.v1 import rollout_pb2

    index = load_index(index_dir or ensure_wiki_index(progress=False), use_gpu=False, torch_threads=torch_threads)

    def lookup(query: str, top_k: int) -> list[Any]:
        scores, rows = index.search([query], top_k)
        docs = []
        for score, row in zip(scores[0], rows[0], strict=True):
            if row < 0:
                continue
            p = index.store.get(int(row))
            docs.append(rollout_pb2.Document(id=p.id, title=p.title, text=p.text, score=float(score)))
        return docs

    return InProcessSearch(lookup, name="retriever", in_thread=True)


def format_progress(response: str, protocol: str = "research") -> float:
    """Share of the tag-format parts a response gets right, in [0, 1] (reward shaping for small models).

    Parts: a closed ``<think>...</think>``; exactly one ``<answer>...</answer>``; (ReSearch) a ``\\boxed{`` inside the
    answer; a closed ``<search>...</search>``. The full ReSearch format check lives in the reward library; this only
    grades partial progress so that a group of all-wrong responses still has reward differences. Text inside the
    observation blocks (``<result>``/``<information>``) is ignored: the environment wrote it.
    """
    import re

    # Only what the policy wrote counts: drop inserted observation blocks (documents, error messages with tag examples).
    obs = "result" if protocol == "research" else "information"
    response = re.sub(rf"<{obs}>.*?</{obs}>", " ", response, flags=re.S)
    think = bool(re.search(r"<think>.*?</think>", response, flags=re.S))
    answers = re.findall(r"<answer>(.*?)</answer>", response, flags=re.S)
    one_answer = len(answers) == 1 and response.count("<answer>") == 1
    search = bool(re.search(r"<search>.+?</search>", response, flags=re.S))
    parts = [think, one_answer, search]
    if protocol == "research":
        parts.append(bool(answers) and "\\boxed{" in answers[-1])
    return sum(parts) / len(parts)


def load_reward_function(spec: str) -> Callable[..., Any]:
    """Loads ``'PATH.py:NAME'`` or ``'pkg://module.path:NAME'`` (verl's ``custom_reward_function`` forms).

    Raises:
        InvalidRequest: a malformed spec, or the module/function cannot be loaded.
    """
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name or "/" in name:
        raise InvalidRequest(
            f"reward.function must look like 'path/to/file.py:name' or 'pkg://module:name', got {spec!r}"
        )
    from verl.utils.import_utils import load_extern_object

    try:
        fn = load_extern_object(path, name)
    except (ImportError, FileNotFoundError, AttributeError, RuntimeError) as exc:
        raise InvalidRequest(f"cannot load reward function {spec!r}: {exc}") from exc
    if not callable(fn):
        raise InvalidRequest(f"reward function {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def train(
    config: TrainConfig,
    resume: bool = True,
    progress: ProgressFn | None = None,
    *,
    search_backend: Any = None,
    examples: Sequence[QAExample] | None = None,
    reward_fn: Callable[..., Any] | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Runs (or continues) a local GRPO training run. The Python API behind ``searchrl train`` and the demo.

    Args:
        config: the run's configuration.
        resume: continue from the newest checkpoint in ``config.checkpoint_path`` when there is one.
        progress: called as ``progress(step, metrics)`` after every step.
        search_backend: a ready search backend instead of the one ``config.rollout.search`` names.
        examples: training questions instead of ``config.data.train``.
        reward_fn: a reward function (verl ``compute_score`` contract) instead of ``config.reward.function``.
        handle_signals: install SIGINT/SIGTERM handlers for a graceful stop (main thread only).

    Returns:
        :class:`TrainResult` with the MLflow run id, the last step's metrics and the newest checkpoint.

    Raises:
        InvalidRequest: bad config, data or model.
    """
    trainer = LocalTrainer(config, search_backend=search_backend, examples=examples, reward_fn=reward_fn)
    previous: dict[int, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda _s, _f: trainer.request_stop())
    try:
        trainer.setup(resume=resume)
        return trainer.fit(progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.close()
