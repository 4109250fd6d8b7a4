"""The training reward of finished episodes: one function for the local trainer and the rollout workers, so that an
episode scores the same wherever it was sampled."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from searchrl.agent.loop import Episode
from searchrl.agent.prompts import get_protocol
from searchrl.reward.scoring import ScoreResult, score
from searchrl.reward.shaping import format_progress


def score_episodes(
    episodes: Sequence[Episode],
    *,
    scheme: str,
    protocol: str = "research",
    format_bonus: float = 0.0,
    reward_fn: Callable[..., Any] | None = None,
    data_sources: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
) -> list[ScoreResult]:
    """Scores episodes with a reward scheme (:func:`searchrl.reward.scoring.score`), or with a custom reward function
    when one is given (the scheme's F1/EM/format then stay as diagnostics), plus ``format_bonus`` x
    :func:`~searchrl.reward.shaping.format_progress`.

    Args:
        episodes: N finished episodes (response text, gold answers, ``ended_with_eos``).
        scheme: the reward scheme (``research``, ``search_r1_em``, ...).
        protocol: the agent's tag protocol (picks the document tag and the format-progress rules).
        format_bonus: weight of the format-progress shaping term (0: the scheme's reward alone).
        reward_fn: a function with verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``
            contract returning a float or ``{"score": float, ...}``.
        data_sources, ids: N dataset names and question ids, passed to ``reward_fn`` (default: empty, the
            episode's ``question_id``).

    Returns:
        N :class:`~searchrl.reward.scoring.ScoreResult`, in order; ``reward`` is what GRPO trains on.
    """
    proto = get_protocol(protocol)
    info_tag = proto.obs_open.strip("<>")
    out = []
    for i, ep in enumerate(episodes):
        res = score(ep.response_text, ep.golden_answers, scheme, ended_with_eos=ep.ended_with_eos, info_tag=info_tag)
        reward = res.reward
        if reward_fn is not None:
            got = reward_fn(
                data_source=data_sources[i] if data_sources is not None else "",
                solution_str=ep.response_text,
                ground_truth={"target": list(ep.golden_answers)},
                extra_info={
                    "question": ep.question,
                    "id": ids[i] if ids is not None else ep.question_id,
                    "scheme": scheme,
                    "ended_with_eos": ep.ended_with_eos,
                },
            )
            reward = float(got["score"] if isinstance(got, dict) else got)
        if format_bonus:
            reward += format_bonus * format_progress(ep.response_text, proto.name)
        out.append(dataclasses.replace(res, reward=reward))
    return out
