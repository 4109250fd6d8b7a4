"""The local GRPO trainer: ReSearch / ZeroSearch training on one machine (CPU or one GPU), on verl's algorithms.

verl's workers need GPUs and Ray, so at desk scale the loop is ours while the maths is verl's
(:mod:`searchrl.trainer.grpo` wraps ``verl.trainer.ppo.core_algos``). One step:

1. **rollout** - take ``data.batch_size`` questions (:mod:`.cursor`: a seeded permutation per epoch, checkpointed) and
   run ``data.group_size`` episodes of the agent loop per question, concurrently, with the live policy (an in-process
   :class:`~searchrl.services.policy.engines.transformers.TransformersEngine` sharing the training model, or a remote
   PolicyService that receives the new weights with ``LoadWeights`` after each update). Every episode has its own
   seed, :func:`~searchrl.agent.settings.episode_seed` of ``(seed, step, question slot, sample)``. Searches go to the
   configured backend with the curriculum position ``(step - 1, total)`` for the ZeroSearch simulator.
2. **reward** - score each episode in-process with ``searchrl.reward.scoring.score`` (plus the shaping and custom
   reward functions of :mod:`searchrl.reward.shaping`).
3. **update** - :class:`~.update.GRPOUpdater` over the layout of :mod:`.batching`: full fine-tuning, or LoRA adapters
   through peft with ``model.lora_rank > 0`` (:mod:`.lora`: the reference is the base model under the adapters, the
   engine and the checkpoints get the merged model); no reference pass at all with ``algorithm.kl_coef == 0``.
4. **report** - MLflow metrics every step, Prometheus gauges, guard rails, trajectories to the Redis rollout stream,
   checkpoints every N steps (:mod:`.trainer`).
"""
