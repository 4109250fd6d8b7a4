"""verl reward hook: ``custom_reward_function.path`` = this file (or ``pkg://searchrl.reward.verl_reward``),
``custom_reward_function.name`` = ``compute_score``.

verl's reward managers (``verl/workers/reward_manager/naive.py`` and
``verl/experimental/reward_loop/reward_manager/naive.py`` in verl 0.9.1) call
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`` once per response, merged with
``custom_reward_function.reward_kwargs``, and accept either a float or a dict whose ``"score"`` key is the reward; the
other keys of a dict are collected as ``reward_extra_info`` (per-sample arrays in the batch and validation metrics), so
every value returned here is numeric.

verl decodes the response with ``skip_special_tokens=True``, so the EOS token is not in ``solution_str``. Pass
``extra_info["ended_with_eos"]`` (our agent loop does) or ``eos_token`` (the response is then checked for it, as in
ReSearch's ``compute_score``); without either the response counts as ended with EOS.

Imports are absolute so that verl can load this file by path as well as by package name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from searchrl.reward.scoring import DEFAULT_INFO_TAG, score

DEFAULT_SCHEME = "research"


def golden_answers_of(ground_truth: Any) -> list[str]:
    """Gold answers from the forms verl datasets use.

    Accepts a string, a list/tuple/numpy array of strings, or a dict with ``"target"`` (Search-R1/ZeroSearch
    parquet: ``reward_model.ground_truth = {"target": [...]}``), ``"golden_answers"`` or ``"answers"``.

    Returns:
        The gold answers as a list of strings (possibly empty; :func:`compute_score` then raises).
    """
    if isinstance(ground_truth, Mapping):
        for key in ("target", "golden_answers", "answers", "answer"):
            if key in ground_truth:
                return golden_answers_of(ground_truth[key])
        return []
    if isinstance(ground_truth, (str, bytes)):
        return [ground_truth.decode() if isinstance(ground_truth, bytes) else ground_truth]
    if hasattr(ground_truth, "tolist"):  # numpy array (parquet list columns load as object arrays)
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, (list, tuple)):
        out: list[str] = []
        for item in ground_truth:
            out.extend(golden_answers_of(item))
        return out
    return [] if ground_truth is None else [str(ground_truth)]


def row_golden_answers(row: Mapping[str, Any]) -> list[str]:
    """Gold answers of a verl dataset row (or of the row fields verl passes to an agent loop's ``run``).

    Returns:
        ``extra_info.golden_answers`` when the row has it, else ``reward_model.ground_truth``, in any form
        :func:`golden_answers_of` accepts (possibly empty).
    """
    golds = (row.get("extra_info") or {}).get("golden_answers")
    if golds is None:
        golds = (row.get("reward_model") or {}).get("ground_truth")
    return golden_answers_of(golds)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    scheme: str | None = None,
    ended_with_eos: bool | None = None,
    eos_token: str | None = None,
    info_tag: str | None = None,
    **_: Any,
) -> dict[str, float]:
    """verl ``custom_reward_function`` entry point.

    Per-sample ``extra_info`` keys win over the keyword arguments (which come from ``reward_kwargs``).

    Args:
        data_source: the dataset name (``data_source`` column); not used for the choice of scheme.
        solution_str: the decoded response.
        ground_truth: ``reward_model.ground_truth``: a string, a list, or ``{"target": [...]}``.
        extra_info: optional per-sample dict; keys ``scheme``, ``ended_with_eos``, ``eos_token``, ``info_tag``.
        scheme: default scheme (``research`` when unset); see :data:`searchrl.reward.scoring.SCHEMES`.
        ended_with_eos: default for responses whose ``extra_info`` does not say.
        eos_token: when given, the response ended with EOS iff it ends with this text (which is then removed).
        info_tag: document tag for ``search_r1_structured``.

    Returns:
        ``{"score": reward, "f1": f1, "em": em, "format_ok": 1.0 or 0.0}``.

    Raises:
        InvalidRequest: unknown scheme or no gold answers.
    """
    info = extra_info if isinstance(extra_info, Mapping) else {}
    scheme_ = str(info.get("scheme") or scheme or DEFAULT_SCHEME)
    eos_text = info.get("eos_token") or eos_token
    eos_flag = info.get("ended_with_eos", ended_with_eos)
    text = solution_str
    if eos_flag is None and eos_text:
        stripped = text.rstrip()
        eos_flag = stripped.endswith(eos_text)
        if eos_flag:
            text = stripped[: -len(eos_text)]
    result = score(
        text,
        golden_answers_of(ground_truth),
        scheme_,
        ended_with_eos=True if eos_flag is None else bool(eos_flag),
        info_tag=str(info.get("info_tag") or info_tag or DEFAULT_INFO_TAG),
    )
    return {"score": result.reward, "f1": result.f1, "em": result.em, "format_ok": 1.0 if result.format_ok else 0.0}
