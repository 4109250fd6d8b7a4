"""Reward shaping and custom reward functions on top of :mod:`searchrl.reward.scoring`.

* :func:`format_progress` - partial credit for the tag format, so that small models get reward differences before
  any answer is right.
* :func:`load_reward_function` - a user reward function with verl's ``compute_score`` contract.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from searchrl.errors import InvalidRequest


def format_progress(response: str, protocol: str = "research") -> float:
    """Share of the tag-format parts a response gets right, in [0, 1] (reward shaping for small models).

    Parts: a closed ``<think>...</think>``; exactly one ``<answer>...</answer>``; (ReSearch) a ``\\boxed{`` inside the
    answer; a closed ``<search>...</search>``. The full ReSearch format check lives in
    :func:`~searchrl.reward.scoring.research_format_error`; this only grades partial progress so that a group of
    all-wrong responses still has reward differences. Text inside the observation blocks (``<result>`` for
    ``protocol="research"``, else ``<information>``) is ignored: the environment wrote it.
    """
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
    """Loads ``'PATH.py:NAME'`` or ``'pkg://module.path:NAME'`` (verl's ``custom_reward_function`` forms; needs verl).

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
    return fn
