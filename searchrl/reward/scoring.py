"""Reward scoring for search-augmented RL: SQuAD answer normalisation, EM, token F1 and the format rules.

Pure Python with precompiled patterns and ``str`` methods; no third-party imports, so the trainer, the evaluator,
the RewardService and verl's reward hook all share one definition.

Schemes (:data:`SCHEMES`):

``research``
    ReSearch (arXiv 2503.19470, Sec. 3.2 "Reward Modeling"): the reward is 0 when any format rule fails (see
    :func:`research_format_error`), otherwise the token F1 of the ``\\boxed{}`` answer inside ``<answer>`` when it is
    above 0, else 0.1 (right format, wrong answer).
``search_r1_em``
    Search-R1 outcome reward: exact match (1 or 0) of the text in the last ``<answer>...</answer>``.
``search_r1_structured``
    Search-R1 v0.3 structured reward: 1.0 correct answer and valid format, 0.8 correct answer with invalid format,
    0.2 valid format with a wrong answer ("format only"), 0 otherwise. "Valid format" is defined by
    :func:`search_r1_format_error`.
``zerosearch_f1``
    ZeroSearch (arXiv 2505.04588, Sec. 3.4 "Reward Design"): token F1 of the last ``<answer>``, no format term (F1
    rather than EM, because EM invited reward hacking by long answers).

Answer metrics follow the SQuAD v1.1 evaluation script as used by HotpotQA, FlashRAG and ReSearch: lower-case, strip
ASCII punctuation, drop the articles a/an/the, collapse whitespace; F1 over whitespace tokens; maxima over the gold
answers; when either side normalises to ``yes``, ``no`` or ``noanswer``, F1 is 0 unless both sides are equal.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from searchrl.errors import InvalidRequest

__all__ = [
    "SCHEMES",
    "DEFAULT_INFO_TAG",
    "ScoreResult",
    "normalize_answer",
    "f1_score",
    "exact_match",
    "extract_boxed",
    "extract_last_answer",
    "extract_answer",
    "research_format_error",
    "search_r1_format_error",
    "score",
    "score_batch",
    "validate_scheme",
]

RESEARCH: Final = "research"
SEARCH_R1_EM: Final = "search_r1_em"
SEARCH_R1_STRUCTURED: Final = "search_r1_structured"
ZEROSEARCH_F1: Final = "zerosearch_f1"
SCHEMES: Final[tuple[str, ...]] = (RESEARCH, SEARCH_R1_EM, SEARCH_R1_STRUCTURED, ZEROSEARCH_F1)

#: Tag that wraps the documents in the Search-R1 / ZeroSearch variants (ReSearch itself uses ``result``).
DEFAULT_INFO_TAG: Final = "information"

#: ReSearch: reward for a well-formatted response whose answer has F1 0.
RESEARCH_FORMAT_ONLY_REWARD: Final = 0.1
#: Search-R1 v0.3 structured reward weights.
STRUCTURED_CORRECT: Final = 1.0
STRUCTURED_FORMAT_SCORE: Final = 0.2

# A character-class regex removes ASCII punctuation 2-4x faster than str.translate with a deletion table (measured on
# short answers by benchmarks/reward_bench.py's workload).
_PUNCT: Final = re.compile(f"[{re.escape(string.punctuation)}]+")
_ARTICLES: Final = re.compile(r"\b(?:a|an|the)\b")
_EXACT_ONLY: Final = frozenset({"yes", "no", "noanswer"})
_BRACES: Final = re.compile(r"[{}]")
_BOXED: Final = "\\boxed{"


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """The score of one response.

    Attributes:
        reward: scalar reward in [0, 1] under the scheme.
        f1: token-level F1 of the extracted answer, max over the gold answers, in [0, 1] (0 when no answer).
        em: exact match after normalisation, 1.0 or 0.0, max over the gold answers.
        format_ok: True when every format rule of the scheme holds (for ``search_r1_em`` and ``zerosearch_f1``,
            whose reward has no format term: an ``<answer>...</answer>`` block was found).
        format_error: the first failed rule (a stable code such as ``"think_tags_unbalanced"``); ``""`` when
            ``format_ok``.
        answer: the extracted final answer (``""`` when none could be extracted).
    """

    reward: float
    f1: float
    em: float
    format_ok: bool
    format_error: str
    answer: str


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation.

    Lower-case, remove ASCII punctuation, replace the articles ``a``/``an``/``the`` (whole words) with spaces, and
    collapse runs of whitespace to one space. Idempotent.

    Args:
        text: any string.

    Returns:
        The normalised string (possibly empty).
    """
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub("", text.lower())).split())


def _token_f1(pred: str, gold: str) -> float:
    """F1 of two already-normalised strings (HotpotQA/ReSearch rule for yes/no/noanswer)."""
    if pred == gold:
        return 1.0 if pred else 0.0
    if pred in _EXACT_ONLY or gold in _EXACT_ONLY:
        return 0.0
    p_tokens = pred.split()
    g_tokens = gold.split()
    if not p_tokens or not g_tokens:
        return 0.0
    if len(g_tokens) == 1:  # common case: a one-word gold answer
        same = 1 if g_tokens[0] in p_tokens else 0
    elif len(p_tokens) * len(g_tokens) <= 64:  # short answers: multiset intersection by hand beats two Counters
        remaining = list(g_tokens)
        same = 0
        for tok in p_tokens:
            if tok in remaining:
                remaining.remove(tok)
                same += 1
    else:
        same = sum((Counter(p_tokens) & Counter(g_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(p_tokens)
    recall = same / len(g_tokens)
    return 2.0 * precision * recall / (precision + recall)


def _best(pred_norm: str, golds_norm: Sequence[str]) -> tuple[float, float]:
    """(max F1, max EM) of a normalised prediction over normalised gold answers."""
    best_f1 = 0.0
    em = 0.0
    for gold in golds_norm:
        if pred_norm == gold:
            em = 1.0
        f1 = _token_f1(pred_norm, gold)
        if f1 > best_f1:
            best_f1 = f1
            if f1 == 1.0:
                break
    if em == 0.0 and best_f1 == 1.0:  # EM for the remaining golds after the early exit
        em = 1.0 if pred_norm in golds_norm else 0.0
    return best_f1, em


def _as_list(golden_answers: str | Sequence[str]) -> list[str]:
    return [golden_answers] if isinstance(golden_answers, str) else list(golden_answers)


def f1_score(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """Token-level F1 of ``prediction``, max over ``golden_answers``, after :func:`normalize_answer`.

    Source: SQuAD v1.1 ``f1_score``; the ``yes``/``no``/``noanswer`` rule of HotpotQA as used by ReSearch.

    Args:
        prediction: the predicted answer text.
        golden_answers: one gold answer or a sequence of them (an empty sequence gives 0).

    Returns:
        F1 in [0, 1].
    """
    pred = normalize_answer(prediction)
    return max((_token_f1(pred, normalize_answer(g)) for g in _as_list(golden_answers)), default=0.0)


def exact_match(prediction: str, golden_answers: str | Sequence[str]) -> float:
    """Exact match after :func:`normalize_answer`: 1.0 when the prediction equals any gold answer, else 0.0.

    Args:
        prediction: the predicted answer text.
        golden_answers: one gold answer or a sequence of them.

    Returns:
        1.0 or 0.0.
    """
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(g) for g in _as_list(golden_answers)) else 0.0


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``, with balanced braces.

    ``\\boxed{\\text{New {York}}}`` gives ``\\text{New {York}}``.

    Args:
        text: usually the inside of the ``<answer>`` block.

    Returns:
        The content between the outer braces, or ``None`` when there is no ``\\boxed{`` or its braces never close.
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    begin = start + len(_BOXED)
    close = text.find("}", begin)
    if close < 0:
        return None
    if text.find("{", begin, close) < 0:  # common case: no nested braces
        return text[begin:close]
    depth = 1
    for m in _BRACES.finditer(text, begin):
        if m.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[begin : m.start()]
    return None


def extract_last_answer(response: str) -> str | None:
    """Text of the last ``<answer>...</answer>`` block, stripped (Search-R1 / ZeroSearch answer extraction).

    Args:
        response: the response text.

    Returns:
        The stripped answer, or ``None`` when no complete block exists.
    """
    end = response.rfind("</answer>")
    if end < 0:
        return None
    start = response.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return response[start + len("<answer>") : end].strip()


def extract_answer(response: str) -> str:
    """The final answer of a response: the ``\\boxed{}`` content (stripped) of the last ``<answer>`` block
    (ReSearch), or the whole block when it has no ``\\boxed{}`` (Search-R1); ``""`` when there is no complete block.

    ``<answer> so \\boxed{Bram {Stoker}} </answer>`` gives ``Bram {Stoker}``.
    """
    block = extract_last_answer(response)
    if block is None:
        return ""
    boxed = extract_boxed(block)
    return block if boxed is None else boxed.strip()


def research_format_error(response: str, ended_with_eos: bool = True) -> str:
    """The first ReSearch format rule that ``response`` breaks, or ``""`` when all hold.

    Rules, checked in this order (ReSearch, arXiv 2503.19470; the ``validate_format`` of Agent-RL/ReSearch):

    ============================  =====================================================================
    code                          rule broken
    ============================  =====================================================================
    ``think_tags_unbalanced``     counts of ``<think>`` and ``</think>`` differ
    ``think_tags_missing``        no ``<think>``/``</think>`` at all
    ``answer_tags_not_once``      ``<answer>`` or ``</answer>`` does not occur exactly once
    ``search_result_order``       a ``<search>`` is not followed, in order, by ``</search>``, ``<result>``,
                                  ``</result>``
    ``answer_tags_order``         ``</answer>`` comes before ``<answer>``
    ``answer_missing_boxed``      no ``\\boxed{`` inside the answer
    ``no_eos``                    the response did not end with EOS (cut at the length limit)
    ``boxed_unextractable``       the ``\\boxed{`` braces never balance
    ============================  =====================================================================

    Args:
        response: the response text (after the prompt, with the inserted ``<result>`` blocks, without EOS).
        ended_with_eos: whether generation stopped on the EOS token.

    Returns:
        A rule code from the table, or ``""``.
    """
    return _research_check(response, ended_with_eos)[0]


def _research_check(response: str, ended_with_eos: bool) -> tuple[str, str | None]:
    """(first failed ReSearch rule or "", boxed answer or None); the answer is extracted once for both uses."""
    n_think = response.count("<think>")
    if n_think != response.count("</think>"):
        return "think_tags_unbalanced", None
    if n_think == 0:
        return "think_tags_missing", None
    if response.count("<answer>") != 1 or response.count("</answer>") != 1:
        return "answer_tags_not_once", None
    pos = 0
    find = response.find
    while True:
        s = find("<search>", pos)
        if s < 0:
            break
        s_end = find("</search>", s)
        r = find("<result>", s)
        if s_end < 0 or r < 0 or s_end > r:
            return "search_result_order", None
        r_end = find("</result>", r)
        if r_end < 0:
            return "search_result_order", None
        pos = r_end
    a_start = find("<answer>")
    a_end = find("</answer>")
    if a_start > a_end:
        return "answer_tags_order", None
    inner = response[a_start + len("<answer>") : a_end]
    if _BOXED not in inner:
        return "answer_missing_boxed", None
    answer = extract_boxed(inner)
    if not ended_with_eos:
        return "no_eos", answer
    if answer is None:
        return "boxed_unextractable", None
    return "", answer


@lru_cache(maxsize=16)
def _search_r1_grammar(info_tag: str) -> tuple[frozenset[str], int, dict[tuple[str, str], str]]:
    """Tag set, longest tag length and state transitions of the Search-R1 sequence grammar for one document tag."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", info_tag) or info_tag in ("think", "search", "answer"):
        raise InvalidRequest(f"invalid document tag name {info_tag!r}: use a plain tag name such as 'information'")
    o, c = f"<{info_tag}>", f"</{info_tag}>"
    transitions = {
        ("start", "<think>"): "in_think",
        ("after_info", "<think>"): "in_think",
        ("in_think", "</think>"): "after_think",
        ("after_think", "<search>"): "in_search",
        ("in_search", "</search>"): "after_search",
        ("after_search", o): "in_info",
        ("in_info", c): "after_info",
        ("after_think", "<answer>"): "in_answer",
        ("in_answer", "</answer>"): "end",
    }
    tags = frozenset(tag for _state, tag in transitions)
    return tags, max(map(len, tags)), transitions


_INSIDE: Final = frozenset({"in_think", "in_search", "in_info", "in_answer"})


def search_r1_format_error(response: str, info_tag: str = DEFAULT_INFO_TAG) -> str:
    """The first Search-R1 sequence-format violation in ``response``, or ``""`` when the format is valid.

    Valid format (after Search-R1's ``is_valid_sequence``): the response is, apart from whitespace between tags,
    exactly ``<think>…</think>`` followed by zero or more rounds of ``<search>…</search> <info>…</info>
    <think>…</think>``, and ends with ``<answer>…</answer>``; no text outside the tags, no tag nested inside another
    (``info`` is ``info_tag``: ``information`` in Search-R1/ZeroSearch, ``result`` in ReSearch-style rollouts).
    End-of-sequence is not part of this format.

    Codes: ``unexpected_tag`` (a tag where the grammar does not allow it), ``text_outside_tags`` (non-whitespace text
    between tags), ``incomplete_sequence`` (ended before ``</answer>``), ``text_after_answer``.

    Args:
        response: the response text.
        info_tag: name of the tag that wraps inserted documents.

    Returns:
        A code, or ``""``.

    Raises:
        InvalidRequest: ``info_tag`` is not a plain tag name.
    """
    tags, longest, transitions = _search_r1_grammar(info_tag)
    state = "start"
    pos = 0
    find = response.find
    # Walk the '<' characters (a regex scan over the documents costs ~3x more); each one may open a known tag.
    i = find("<")
    while i >= 0:
        j = find(">", i + 2, i + longest)
        if j < 0 or response[i : j + 1] not in tags:
            i = find("<", i + 1)
            continue
        if state not in _INSIDE and i > pos and not response[pos:i].isspace():
            return "text_outside_tags"
        nxt = transitions.get((state, response[i : j + 1]))
        if nxt is None:
            return "unexpected_tag"
        state = nxt
        pos = j + 1
        i = find("<", pos)
    if state != "end":
        return "incomplete_sequence"
    if pos < len(response) and not response[pos:].isspace():
        return "text_after_answer"
    return ""


def validate_scheme(scheme: str) -> str:
    """Returns ``scheme`` when it is one of :data:`SCHEMES`.

    Raises:
        InvalidRequest: unknown scheme (the message lists the known ones).
    """
    if scheme not in SCHEMES:
        raise InvalidRequest(f"unknown reward scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return scheme


def _normalized_golds(golden_answers: str | Sequence[str], where: str = "") -> list[str]:
    golds = [golden_answers] if isinstance(golden_answers, str) else golden_answers
    out = [normalize_answer(g) for g in golds if g and not g.isspace()]
    if not out:
        raise InvalidRequest(f"no gold answers{where}: give at least one non-empty gold answer")
    return out


def _score_one(response: str, golds: list[str], scheme: str, ended_with_eos: bool, info_tag: str) -> ScoreResult:
    if scheme == RESEARCH:
        error, answer = _research_check(response, ended_with_eos)
        if answer is None and error and error != "answer_missing_boxed":
            # best effort, for the F1/EM diagnostics of a badly formatted response: the last answer block
            block = extract_last_answer(response)
            if block is not None:
                answer = extract_boxed(block)
        f1, em = _best(normalize_answer(answer), golds) if answer is not None else (0.0, 0.0)
        if error:
            reward = 0.0
        else:
            reward = f1 if f1 > 0.0 else RESEARCH_FORMAT_ONLY_REWARD
        return ScoreResult(reward, f1, em, not error, error, answer or "")
    answer = extract_last_answer(response)
    f1, em = _best(normalize_answer(answer), golds) if answer is not None else (0.0, 0.0)
    if scheme == SEARCH_R1_STRUCTURED:
        error = search_r1_format_error(response, info_tag)
        if em == 1.0:
            reward = STRUCTURED_CORRECT if not error else STRUCTURED_CORRECT - STRUCTURED_FORMAT_SCORE
        else:
            reward = STRUCTURED_FORMAT_SCORE if not error else 0.0
        return ScoreResult(reward, f1, em, not error, error, answer or "")
    error = "" if answer is not None else "answer_missing"
    reward = em if scheme == SEARCH_R1_EM else f1
    return ScoreResult(reward, f1, em, answer is not None, error, answer or "")


def score(
    response: str,
    golden_answers: str | Sequence[str],
    scheme: str = RESEARCH,
    ended_with_eos: bool = True,
    *,
    info_tag: str = DEFAULT_INFO_TAG,
) -> ScoreResult:
    """Scores one response under a reward scheme.

    Args:
        response: the text the policy produced after the prompt, with the inserted document blocks, without EOS.
        golden_answers: one gold answer or several; empty strings are ignored.
        scheme: one of :data:`SCHEMES`.
        ended_with_eos: whether generation stopped on EOS (the ReSearch scheme gives 0 when it did not).
        info_tag: document tag for ``search_r1_structured`` (``information``, or ``result`` for ReSearch-style text).

    Returns:
        The :class:`ScoreResult`.

    Raises:
        InvalidRequest: unknown scheme, no non-empty gold answer, or an invalid ``info_tag``.
    """
    validate_scheme(scheme)
    return _score_one(response, _normalized_golds(golden_answers), scheme, ended_with_eos, info_tag)


def score_batch(
    responses: Sequence[str],
    golden_answers: Sequence[str | Sequence[str]],
    scheme: str = RESEARCH,
    ended_with_eos: bool | Sequence[bool] = True,
    *,
    info_tag: str = DEFAULT_INFO_TAG,
) -> list[ScoreResult]:
    """Scores a batch of responses; results are in input order.

    Args:
        responses: N response texts.
        golden_answers: N entries, each one gold answer or a sequence of them.
        scheme: one of :data:`SCHEMES`, applied to every item.
        ended_with_eos: one flag for all items or N flags.
        info_tag: document tag for ``search_r1_structured``.

    Returns:
        N :class:`ScoreResult`.

    Raises:
        InvalidRequest: unknown scheme, mismatched lengths, or an item without gold answers (the message names the
            item index).
    """
    validate_scheme(scheme)
    n = len(responses)
    if len(golden_answers) != n:
        raise InvalidRequest(f"got {n} responses but {len(golden_answers)} gold-answer lists")
    if isinstance(ended_with_eos, bool):
        eos: Sequence[bool] = [ended_with_eos] * n
    else:
        eos = ended_with_eos
        if len(eos) != n:
            raise InvalidRequest(f"got {n} responses but {len(eos)} ended_with_eos flags")
    if scheme == SEARCH_R1_STRUCTURED:
        _search_r1_grammar(info_tag)  # validate the tag once, before scoring anything
    return [
        _score_one(responses[i], _normalized_golds(golden_answers[i], f" for item {i}"), scheme, eos[i], info_tag)
        for i in range(n)
    ]
