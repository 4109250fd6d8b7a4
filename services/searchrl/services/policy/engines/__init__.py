"""Policy inference engines behind one async interface (:class:`~searchrl.services.policy.engines.base.PolicyEngine`).

* :class:`TransformersEngine` - the CPU default. Concurrent :meth:`~TransformersEngine.generate` calls are joined into
  one running batch over a shared KV cache (continuous batching at token granularity: a request that arrives while
  others decode is prefilled and merged into the batch at the next step; a finished row leaves at once). Every row
  keeps its own sampling parameters and its own seeded ``torch.Generator``, so a seeded request samples the same
  tokens whatever else is in the batch (up to float rounding of padded attention).
* :class:`SGLangEngine` - GPU: an in-process ``sglang.Engine`` (``async_generate`` with ``return_logprob``) or a
  remote SGLang server's native ``POST /generate`` API.
* :class:`RemotePolicyBackend` - the PolicyService ``Generate`` RPC, so an agent loop can drive a remote policy.

Log-probs are natural-log probabilities of each sampled token under the model's raw next-token distribution
(``log_softmax`` of the logits, before temperature / top-p / top-k): what the trainer's forward pass computes
(``trainer/searchrl/trainer/local.py`` ``_forward_logprobs``, verl's ``logprobs_from_logits``), so the two agree at any sampling
temperature. SGLang's are ``log_softmax(logits / temperature)`` unless ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, which
:class:`SGLangEngine` sets for its in-process engine.

Seeds: :class:`TransformersEngine` reproduces a seeded request's tokens (per request, whatever the batch);
:class:`SGLangEngine` only with deterministic inference on (``deterministic=True``), otherwise SGLang ignores seeds.
"""

from searchrl.services.policy.engines.base import PolicyEngine
from searchrl.services.policy.engines.remote import RemotePolicyBackend
from searchrl.services.policy.engines.sglang import SGLangEngine
from searchrl.services.policy.engines.transformers import TransformersEngine

__all__ = ["PolicyEngine", "RemotePolicyBackend", "SGLangEngine", "TransformersEngine"]
