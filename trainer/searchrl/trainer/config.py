"""The local trainer's configuration: one typed YAML file, every field documented (pydantic models).

Load with :func:`load_config` (a YAML path plus ``key.sub=value`` overrides, values parsed as YAML), dump with
:meth:`TrainConfig.to_yaml`. Unknown keys are errors, so a typo fails at load time. ``searchrl train --help-config``
prints every field with its description and default.

Defaults follow the anchors (REFERENCE.md "GRPO"): group size 5, clip ratio 0.2, KL coefficient 0.001 with the
``low_var_kl`` estimator as a loss term, ``token-mean`` aggregation, lr 1e-6, one PPO epoch. The desk demo overrides
the learning rate (a 135M model moves visibly in a few steps only with ~1e-5).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from searchrl.agent.settings import AgentSettings
from searchrl.errors import InvalidRequest
from searchrl.tracking import resolve_tracking_uri

#: The local trainer's recipe YAMLs (``local_demo.yaml``, ...), shipped inside the package.
RECIPES_DIR = Path(__file__).resolve().parent / "configs"


#: Attention and MLP projections of Llama-style decoders (SmolLM2, Llama, Qwen2, Mistral): LoRA's default targets.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The policy being trained and its frozen reference."""

    path: str = Field(
        "smollm2-135m-instruct",
        description="HF checkpoint folder or hub-style name; 'smollm2-135m-instruct' is the bundled SmolLM2-135M-Instruct.",
    )
    reference_path: str | None = Field(
        None, description="Checkpoint of the frozen reference policy for the KL term; default: the initial policy."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Compute dtype of the update's forward passes: bfloat16 runs them under autocast (fast on CPUs with "
        "bf16 units and on GPUs); master weights, optimizer state and rollout stay float32, as in verl's FSDP.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the update's forward pass.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU (default: torch's choice)."
    )
    lora_rank: int = Field(
        0,
        ge=0,
        description="LoRA rank r (peft): train low-rank adapters on lora_target_modules instead of every weight; the "
        "reference policy is the same model with the adapters disabled (no second copy), AdamW holds only adapter "
        "state, and the exported model folders are merged. 0: full fine-tuning.",
    )
    lora_alpha: float = Field(
        32.0, gt=0, description="LoRA scaling numerator: the adapter update is (lora_alpha / lora_rank) * B @ A."
    )
    lora_target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        min_length=1,
        description="Module names that get adapters (peft target_modules); default every attention and MLP "
        "projection of a Llama-style decoder.",
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (peft lora_dropout).")

    @model_validator(mode="after")
    def _lora_reference(self) -> ModelConfig:
        if self.lora_rank and self.reference_path:
            raise ValueError(
                "model.reference_path cannot be used with model.lora_rank > 0: the reference is the policy's base "
                "model with its adapters disabled"
            )
        return self


class DataConfig(_Strict):
    """Which questions are trained on and how they are batched."""

    train: list[str] = Field(
        default_factory=lambda: ["fanoutqa-sub"],
        description="Training sources: prepared parquet files or specs (fanoutqa-sub, fanoutqa, bench:NAME, PATH.jsonl).",
    )
    val: list[str] = Field(
        default_factory=list, description="Validation sources (evaluated by 'searchrl eval', not here)."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N training questions (after de-duplication).")
    batch_size: int = Field(4, ge=1, description="Questions per GRPO step (the anchors use 64-512 on GPUs).")
    group_size: int = Field(5, ge=1, description="Responses sampled per question: the GRPO group size n (anchors: 5).")
    shuffle: bool = Field(True, description="Reshuffle the questions every epoch with a seed derived from 'seed'.")


class SearchConfig(_Strict):
    """Where the agent's searches go."""

    backend: Literal["retriever", "simulator", "mixed", "inprocess", "none"] = Field(
        "retriever",
        description="RetrievalService, ZeroSearch simulator service, a mix of both, a FAISS index loaded in this "
        "process (index_dir), or no search at all.",
    )
    index_dir: str | None = Field(
        None,
        description="backend=inprocess: index folder ('searchrl index build'); default the bundled Wikipedia index.",
    )
    retriever_target: str = Field("127.0.0.1:50052", description="gRPC target of the RetrievalService.")
    simulator_target: str = Field("127.0.0.1:50053", description="gRPC target of the SimulatedSearchService.")
    mix_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With backend=mixed: share of searches sent to the retriever (the rest: simulator).",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one search call, seconds (sets rollout.agent.search_timeout_s)."
    )
    curriculum_total_steps: int | None = Field(
        None, ge=1, description="Steps over which the simulator's noise curriculum runs (default: trainer.max_steps)."
    )
    added_latency_s: float = Field(
        0.0,
        ge=0,
        description="Seconds added before every search, as a web search API takes (benchmarks of slow search; 0: none).",
    )


class QueueConfig(_Strict):
    """The Redis streams between the trainer and the rollout workers (:mod:`searchrl.services.rollouts.queue`)."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis of the task and group streams.")
    prefix: str = Field(
        "searchrl:rollout", description="Key prefix of the streams (one per training run sharing a Redis)."
    )
    groups_in_flight: int = Field(2, ge=1, description="Worker: tasks one worker runs at once.")
    reclaim_idle_s: float = Field(
        120.0,
        gt=0,
        description="A task (worker) or group (trainer) read and not finished for this long is taken over from its "
        "consumer, presumed dead.",
    )
    wait_timeout_s: float = Field(
        600.0, gt=0, description="Trainer: fail the step when no group arrives for this long (no worker running?)."
    )


class RolloutConfig(_Strict):
    """How episodes are generated."""

    agent: AgentSettings = Field(
        default_factory=AgentSettings, description="Agent-loop settings (searchrl.agent.settings.AgentSettings)."
    )
    search: SearchConfig = Field(default_factory=SearchConfig, description="Search backend settings.")
    engine: Literal["inprocess", "remote"] = Field(
        "inprocess",
        description="inprocess: a TransformersEngine sharing the live training model; remote: a PolicyService "
        "(weights pushed with LoadWeights after every update).",
    )
    policy_target: str = Field("127.0.0.1:50054", description="gRPC target of the PolicyService (engine=remote).")
    max_batch_size: int = Field(16, ge=1, description="In-process engine: generate calls micro-batched together.")
    torch_threads: int = Field(
        1,
        ge=0,
        description="In-process engine: torch intra-op threads of its decoding thread (0: torch's default). One, as "
        "on a few shared cores more threads oversubscribe (benchmarks/rollout_bench.py, benchmarks/train_bench.py).",
    )
    concurrency: int = Field(
        16, ge=1, description="Episodes run at once. 1 makes every generate call its own batch (bit-reproducible)."
    )
    mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: each step samples its own episodes with the current weights, then updates (exact resume). "
        "async: rollout workers ('searchrl rollout-worker') sample groups into the Redis group stream while the "
        "trainer updates; groups at most max_staleness versions old are trained with the importance ratio against "
        "the sampling policy's log-probs.",
    )
    max_staleness: int = Field(
        1,
        ge=0,
        description="async: most policy versions a group may lag the weights it trains (older ones are skipped and "
        "counted in stream/stale_groups).",
    )
    queue: QueueConfig = Field(
        default_factory=lambda: QueueConfig(), description="async: the Redis task and group streams."
    )

    @model_validator(mode="after")
    def _async_needs_the_policy_service(self) -> RolloutConfig:
        if self.mode == "async" and self.engine != "remote":
            raise ValueError(
                "rollout.mode=async needs rollout.engine=remote: the rollout workers sample through the PolicyService "
                "that the trainer pushes its weights to"
            )
        return self


class AlgorithmConfig(_Strict):
    """GRPO and optimiser hyper-parameters (verl core_algos names in brackets)."""

    lr: float = Field(1e-6, gt=0, description="AdamW learning rate (anchors: 1e-6; the CPU demo uses ~1e-5).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in optimizer steps.")
    clip_ratio: float = Field(0.2, gt=0, description="PPO clip range epsilon [clip_ratio].")
    clip_ratio_low: float | None = Field(None, gt=0, description="Lower clip range (default clip_ratio).")
    clip_ratio_high: float | None = Field(
        None, gt=0, description="Upper clip range (default clip_ratio; DAPO raises it)."
    )
    clip_ratio_c: float = Field(3.0, gt=1, description="Dual-clip bound for negative advantages [clip_ratio_c].")
    kl_coef: float = Field(
        0.001,
        ge=0,
        description="Coefficient of the KL-to-reference loss term [kl_loss_coef]. 0 (DAPO, Dr. GRPO): no reference "
        "forward pass at all and actor/kl reported as 0.",
    )
    kl_type: Literal["low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2"] = Field(
        "low_var_kl", description="KL estimator [kl_loss_type]."
    )
    entropy_coeff: float = Field(0.0, ge=0, description="Entropy bonus coefficient [entropy_coeff].")
    loss_agg_mode: Literal[
        "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = Field("token-mean", description="How per-token losses become a scalar [loss_agg_mode].")
    norm_adv_by_std: bool = Field(
        True, description="Divide group-centred rewards by the group std [norm_adv_by_std_in_grpo]."
    )
    adv_epsilon: float = Field(1e-6, gt=0, description="Added to the group std before dividing.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch of episodes [ppo_epochs].")
    mini_batches: int = Field(
        1, ge=1, description="Optimizer steps per PPO epoch; the batch is split into this many parts."
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Episodes per forward/backward; gradients accumulate over a mini-batch's micro-batches."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping by global norm.")
    loss_token_logits: bool = Field(
        True,
        description="Compute vocabulary logits, log-probs and entropies only at loss-mask-1 response tokens (not at "
        "inserted <result> documents, the response prefix or padding), which no loss or metric reads; same "
        "result up to rounding, less LM-head and softmax work.",
    )
    share_prompt: bool = Field(
        True,
        description="Compute each prompt once per micro-batch and its group's responses on its KV cache (same "
        "result up to rounding; ~n times less prompt compute). Off with model.gradient_checkpointing.",
    )


class RewardConfig(_Strict):
    """Scoring of finished episodes (``searchrl.reward.scoring``)."""

    scheme: Literal["research", "search_r1_em", "search_r1_structured", "zerosearch_f1"] = Field(
        "research", description="Reward scheme: ReSearch format+F1, Search-R1 EM / structured, or ZeroSearch F1."
    )
    format_bonus: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Shaping for small models: add this x the share of format parts present (think pair, one answer "
        "block, boxed answer, a closed search) to every reward, so groups differ before any answer is right.",
    )
    function: str | None = Field(
        None,
        description="Custom reward instead of the scheme, verl's contract: 'PATH.py:NAME' or 'pkg://module:NAME', "
        "called as NAME(data_source, solution_str, ground_truth, extra_info) -> float | {'score': ...}. "
        "F1/EM/format metrics still come from the scheme.",
    )


class TrainerConfig(_Strict):
    """Length of the run and where it writes."""

    max_steps: int = Field(100, ge=1, description="GRPO steps to run (a resumed run continues to this step).")
    output_dir: str = Field("runs/local", description="Run folder: checkpoints, metrics.jsonl, config.yaml, mlruns.")
    log_trajectories: int = Field(2, ge=0, description="Episodes per step written to trajectories.jsonl for reading.")


class LoggingConfig(_Strict):
    """MLflow and Prometheus."""

    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else a local sqlite store "
        "'sqlite:///<output_dir>/mlflow.db'.",
    )
    experiment: str = Field("searchrl-grpo", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="MLflow run name (default: the output folder's name).")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus /metrics port of the trainer (0: off; chart: 9095)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the Prometheus endpoint binds (loopback by default).")
    rollout_redis_url: str | None = Field(None, description="Push finished trajectories to this Redis rollout stream.")
    rollout_stream: str = Field("searchrl:rollouts", description="Redis stream name of the rollout store.")
    rollout_publish_retry_s: float = Field(
        60.0,
        ge=0,
        description="How long a step keeps retrying to publish its trajectories while Redis is down (backoff with"
        " jitter; each batch lands once, whole); past it the step goes on and logs what it could not publish.",
    )
    log_checkpoints_to_mlflow: bool = Field(
        False, description="Also upload each checkpoint's model folder as an MLflow artifact."
    )


class CheckpointConfig(_Strict):
    """Checkpoints: model (HF folder the PolicyService can LoadWeights), optimizer, scheduler, RNG and data cursor."""

    dir: str | None = Field(None, description="Checkpoint folder (default '<output_dir>/checkpoints').")
    every_steps: int = Field(10, ge=0, description="Save every N steps (0: only at the end and on a signal).")
    keep_last: int = Field(3, ge=1, description="Keep the newest K checkpoints, delete older ones.")
    save_final: bool = Field(True, description="Save after the last step.")


class RewardCollapseGuard(_Strict):
    """Reward collapse: mean reward fell more than ``drop`` below its max over the last ``window`` steps."""

    enabled: bool = Field(True, description="Watch for reward collapse.")
    drop: float = Field(0.3, gt=0, description="Absolute drop of the batch mean reward that trips the guard.")
    window: int = Field(10, ge=1, description="Steps over which the running max is taken.")
    action: Literal["warn", "stop"] | None = Field(None, description="Override of guards.action for this guard.")


class NoSearchGuard(_Strict):
    """No searches: no episode searched for ``steps`` consecutive steps (tool-call misconfiguration)."""

    enabled: bool = Field(True, description="Watch for steps without any search.")
    steps: int = Field(5, ge=1, description="Consecutive search-free steps that trip the guard.")
    action: Literal["warn", "stop"] | None = Field(None, description="Override of guards.action for this guard.")


class KLExplosionGuard(_Strict):
    """KL explosion: the mean KL to the reference exceeded ``max_kl``."""

    enabled: bool = Field(True, description="Watch the KL to the reference.")
    max_kl: float = Field(1.0, gt=0, description="Mean per-token KL (nats) that trips the guard.")
    action: Literal["warn", "stop"] | None = Field(None, description="Override of guards.action for this guard.")


class SearchFailureGuard(_Strict):
    """Failed searches: more than ``max_ratio`` of a step's searches failed or timed out.

    A failed search becomes an error observation in the episode; past this share the step trains on rollouts that
    mostly never saw a document, so by default the run stops (checkpointed) instead of learning from them.
    """

    enabled: bool = Field(True, description="Watch the share of failed searches.")
    max_ratio: float = Field(0.2, ge=0, le=1, description="Share of a step's searches that may fail (error/timeout).")
    min_searches: int = Field(5, ge=1, description="Steps with fewer searches than this are not judged.")
    action: Literal["warn", "stop"] | None = Field("stop", description="Override of guards.action for this guard.")


class GuardsConfig(_Strict):
    """Guard rails the anchors lack: each trip is logged, exported as searchrl_train_guard_tripped{guard}."""

    action: Literal["warn", "stop"] = Field("warn", description="warn: log and continue; stop: checkpoint and stop.")
    reward_collapse: RewardCollapseGuard = Field(default_factory=RewardCollapseGuard, description="Reward collapse.")
    no_search: NoSearchGuard = Field(default_factory=NoSearchGuard, description="No search in many steps.")
    kl_explosion: KLExplosionGuard = Field(default_factory=KLExplosionGuard, description="KL explosion.")
    search_failure: SearchFailureGuard = Field(
        default_factory=SearchFailureGuard, description="Too many failed searches in a step (stops by default)."
    )


class TrainConfig(_Strict):
    """Everything one local GRPO run needs. See each section's fields."""

    seed: int = Field(0, description="Seed of data order, sampling and torch: the same seed gives the same run.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout generation.")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="GRPO / optimiser.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward scheme.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Run length and output.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="MLflow and Prometheus.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    guards: GuardsConfig = Field(default_factory=GuardsConfig, description="Guard rails.")

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int) -> int:
        if not 0 <= v < 2**32:
            raise ValueError("seed must be in [0, 2**32)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        episodes = self.data.batch_size * self.data.group_size
        if self.algorithm.mini_batches > episodes:
            raise ValueError(
                f"algorithm.mini_batches ({self.algorithm.mini_batches}) exceeds the episodes per step ({episodes})"
            )
        return self

    # ----------------------------------------------------------------------------------------------- derived paths
    @property
    def output_path(self) -> Path:
        """The run folder."""
        return Path(self.trainer.output_dir).expanduser()

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint folder."""
        return Path(self.checkpoint.dir).expanduser() if self.checkpoint.dir else self.output_path / "checkpoints"

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: ``logging.mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store
        in the run folder (:func:`searchrl.tracking.resolve_tracking_uri`)."""
        return resolve_tracking_uri(self.output_path, self.logging.mlflow_tracking_uri)

    @property
    def curriculum_total_steps(self) -> int:
        """Total steps of the simulator's noise curriculum."""
        return self.rollout.search.curriculum_total_steps or self.trainer.max_steps

    def to_yaml(self) -> str:
        """The config as YAML (round-trips through :func:`load_config`)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``tree`` with ``key.sub=value`` overrides merged in (OmegaConf dot-list; the value is parsed as YAML: ``1e-5``,
    ``[a, b]``, ``true``; an empty value is the empty string).

    Raises:
        InvalidRequest: an override without ``=``, or one that cannot be merged (e.g. a key inside a list).
    """
    dotlist = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise InvalidRequest(f"override {item!r} must look like key.sub=value")
        dotlist.append(f"{key.strip()}={raw if raw.strip() else repr('')}")
    try:
        merged = OmegaConf.merge(OmegaConf.create(tree), OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise InvalidRequest(f"cannot apply overrides {list(overrides)}: {exc}") from None
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def config_from_dict(tree: Mapping[str, Any]) -> TrainConfig:
    """Validates a raw mapping.

    Raises:
        InvalidRequest: unknown key, wrong type or value out of range (every problem named by its dotted path).
    """
    try:
        return TrainConfig.model_validate(dict(tree))
    except ValidationError as exc:
        raise InvalidRequest(f"invalid trainer config: {_format_errors(exc)}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides.

    Raises:
        InvalidRequest: unreadable file, not a mapping, or an invalid field.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidRequest(f"cannot read trainer config {p}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InvalidRequest(f"trainer config {p} must be a YAML mapping")
        tree = loaded or {}
    return config_from_dict(apply_overrides(tree, overrides))


def _attribute_docs(model: type[BaseModel]) -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` section of a model's docstring (``a, b: text`` documents both)."""
    docs: dict[str, str] = {}
    section = (inspect.getdoc(model) or "").partition("Attributes:")[2]
    for m in re.finditer(r"^    ([\w, /]+): (.+(?:\n {8}.+)*)", section, flags=re.M):
        for name in re.split(r"[, /]+", m.group(1)):
            docs[name] = " ".join(m.group(2).split())
    return docs


def describe_fields(model: type[BaseModel] = TrainConfig, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """Yields ``(dotted name, default, description)`` for every leaf field (for ``--help-config`` and docs); a field
    without a ``description`` is described by its model's ``Attributes:`` docstring section."""
    docs = _attribute_docs(model)
    for name, info in model.model_fields.items():
        ann = info.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from describe_fields(ann, dotted + ".")
            continue
        default = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
        yield dotted, repr(default), info.description or docs.get(name, "")
