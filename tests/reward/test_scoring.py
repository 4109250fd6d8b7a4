"""The reward library: SQuAD normalisation, EM/F1, every format rule of every scheme, and property tests."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from searchrl.errors import InvalidRequest
from searchrl.reward import scoring
from searchrl.reward.scoring import (
    SCHEMES,
    ScoreResult,
    exact_match,
    extract_boxed,
    extract_last_answer,
    f1_score,
    normalize_answer,
    research_format_error,
    score,
    score_batch,
    search_r1_format_error,
)

# --------------------------------------------------------------------------------------------- normalisation, EM, F1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple, a PEAR!  ", "apple pear"),
        ("Theater", "theater"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("rock-n-roll", "rocknroll"),
        ("a the an", ""),
        ("Tab\tand\nnewline", "tab and newline"),
        ("Émile Zola", "émile zola"),
    ],
)
def test_normalize_answer_table(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_f1_and_em_examples() -> None:
    assert f1_score("Paris", ["paris"]) == 1.0
    assert exact_match("the Paris.", ["Paris"]) == 1.0
    # 1 common token of 2 predicted and 1 gold: P=1/2, R=1 -> F1=2/3
    assert f1_score("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert exact_match("Paris France", ["Paris"]) == 0.0
    # max over gold answers
    assert f1_score("Barack Obama", ["Obama", "Barack Hussein Obama"]) == pytest.approx(0.8)
    # token multisets: repeated tokens count at most as often as in the gold
    assert f1_score("new new york", ["new york"]) == pytest.approx(0.8)
    # a long multi-token case that takes the Counter path
    pred = "one two three four five six seven eight nine"
    gold = "one two three four five six seven eight ten"
    assert f1_score(pred, [gold]) == pytest.approx(8 / 9)
    assert f1_score("anything", []) == 0.0
    assert f1_score("x", "x") == 1.0  # a bare string is one gold answer


@pytest.mark.parametrize(
    ("pred", "gold", "f1"),
    [
        ("yes", "yes", 1.0),
        ("no", "No.", 1.0),
        ("yes", "yes it is", 0.0),  # prediction yes/no must match exactly
        ("yes it is", "yes", 0.0),  # gold yes/no must match exactly
        ("no answer", "noanswer", 0.0),
        ("noanswer", "no answer", 0.0),
        ("not yes", "yes", 0.0),
    ],
)
def test_yes_no_noanswer_match_exactly(pred: str, gold: str, f1: float) -> None:
    assert f1_score(pred, [gold]) == f1


def test_empty_normalised_prediction() -> None:
    assert f1_score("the", ["a"]) == 0.0  # both normalise to "" -> no tokens -> F1 0 (SQuAD)
    assert exact_match("the", ["a"]) == 1.0  # ... while EM compares the strings


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("\\boxed{Paris}", "Paris"),
        ("so \\boxed{New {York}} city", "New {York}"),
        ("\\boxed{\\text{a {b} c}}", "\\text{a {b} c}"),
        ("\\boxed{first} and \\boxed{second}", "second"),  # the last one
        ("\\boxed{open", None),
        ("\\boxed{a {b}", None),
        ("no box", None),
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed(text: str, boxed: str | None) -> None:
    assert extract_boxed(text) == boxed


def test_extract_last_answer() -> None:
    assert extract_last_answer("<answer> a </answer> then <answer>\n b \n</answer>") == "b"
    assert extract_last_answer("<answer> a") is None
    assert extract_last_answer("a </answer>") is None


# ------------------------------------------------------------------------------------------------ ReSearch scheme

GOOD = (
    "<think> Who wrote it? </think> <search> author of Germinal </search> "
    "<result>\n(1) Germinal is a novel by Émile Zola.\n</result> "
    "<think> It is Zola. </think> <answer> The answer is \\boxed{Émile Zola} </answer>"
)


@pytest.mark.parametrize(
    ("response", "eos", "error"),
    [
        (GOOD, True, ""),
        ("<think> x </think> <think> y <answer>\\boxed{a}</answer>", True, "think_tags_unbalanced"),
        ("<answer>\\boxed{a}</answer>", True, "think_tags_missing"),
        ("<think>x</think>\\boxed{a}", True, "answer_tags_not_once"),
        ("<think>x</think><answer>\\boxed{a}</answer><answer>\\boxed{b}</answer>", True, "answer_tags_not_once"),
        ("<think>x</think><answer>\\boxed{a}", True, "answer_tags_not_once"),
        (
            "<think>x</think><search> q <result>d</result></search><answer>\\boxed{a}</answer>",
            True,
            "search_result_order",
        ),
        ("<think>x</think><search> q </search><answer>\\boxed{a}</answer>", True, "search_result_order"),
        ("<think>x</think><search> q </search><result> d <answer>\\boxed{a}</answer>", True, "search_result_order"),
        ("<think>x</think><search> q <answer>\\boxed{a}</answer>", True, "search_result_order"),
        ("<think>x</think></answer>\\boxed{a}<answer>", True, "answer_tags_order"),
        ("<think>x</think><answer> Paris </answer>", True, "answer_missing_boxed"),
        (GOOD, False, "no_eos"),
        ("<think>x</think><answer>\\boxed{Paris</answer>", True, "boxed_unextractable"),
    ],
)
def test_research_format_rules(response: str, eos: bool, error: str) -> None:
    assert research_format_error(response, eos) == error
    r = score(response, ["Émile Zola"], "research", ended_with_eos=eos)
    assert r.format_error == error
    assert r.format_ok is (error == "")
    if error:
        assert r.reward == 0.0


def test_research_reward_values() -> None:
    right = score(GOOD, ["Emile Zola", "Émile Zola"])
    assert right == ScoreResult(reward=1.0, f1=1.0, em=1.0, format_ok=True, format_error="", answer="Émile Zola")
    partial = score(GOOD, ["Zola"])
    assert partial.reward == pytest.approx(2 / 3) and partial.f1 == pytest.approx(2 / 3) and partial.em == 0.0
    wrong = score(GOOD, ["Victor Hugo"])
    assert (wrong.reward, wrong.f1, wrong.format_ok) == (0.1, 0.0, True)  # right format, wrong answer
    # a badly formatted response still reports the F1 of its answer for diagnostics, with reward 0
    cut = score(GOOD, ["Émile Zola"], ended_with_eos=False)
    assert (cut.reward, cut.f1, cut.answer, cut.format_error) == (0.0, 1.0, "Émile Zola", "no_eos")
    unbalanced = score("<think> <answer>\\boxed{Émile Zola}</answer>", ["Émile Zola"])
    assert (unbalanced.reward, unbalanced.f1, unbalanced.format_error) == (0.0, 1.0, "think_tags_unbalanced")


# ---------------------------------------------------------------------------------------------- Search-R1 schemes

SR1_GOOD = (
    "<think> need to search </think>\n<search> capital of France </search>\n"
    "<information> Doc 1: Paris is the capital of France. </information>\n"
    "<think> it is Paris </think>\n<answer> Paris </answer>"
)


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (SR1_GOOD, ""),
        ("<think> a </think> <answer> Paris </answer>", ""),
        ("  <think> a </think>\n\n<answer> Paris </answer>\n", ""),
        ("<answer> Paris </answer>", "unexpected_tag"),  # no think first
        ("<think> a </think> <search> q </search> <answer> Paris </answer>", "unexpected_tag"),  # search w/o info
        (
            "<think> a </think> <search> q </search> <information> d </information> <answer> x </answer>",
            "unexpected_tag",
        ),
        ("<think> a <think> b </think></think> <answer> x </answer>", "unexpected_tag"),  # nested
        ("<think> a </think> so <answer> Paris </answer>", "text_outside_tags"),
        ("preamble <think> a </think> <answer> Paris </answer>", "text_outside_tags"),
        (
            "<think> a </think> <search> q </search> <information> d </information> <think> b </think>",
            "incomplete_sequence",
        ),
        ("<think> a </think> <answer> Paris", "incomplete_sequence"),
        ("<think> a </think> <answer> Paris </answer> trailing", "text_after_answer"),
        ("", "incomplete_sequence"),
    ],
)
def test_search_r1_format_rules(response: str, error: str) -> None:
    assert search_r1_format_error(response) == error


def test_search_r1_info_tag_configurable() -> None:
    research_style = SR1_GOOD.replace("information>", "result>")
    assert search_r1_format_error(research_style) == "text_outside_tags"  # <result> is plain text here
    assert search_r1_format_error(research_style, info_tag="result") == ""
    r = score(research_style, ["Paris"], "search_r1_structured", info_tag="result")
    assert (r.reward, r.format_ok) == (1.0, True)
    with pytest.raises(InvalidRequest, match="tag name"):
        search_r1_format_error(SR1_GOOD, info_tag="<bad>")
    with pytest.raises(InvalidRequest, match="tag name"):
        score(SR1_GOOD, ["Paris"], "search_r1_structured", info_tag="think")


@pytest.mark.parametrize(
    ("response", "golds", "reward", "format_ok"),
    [
        (SR1_GOOD, ["Paris"], 1.0, True),  # correct + valid
        (SR1_GOOD + " extra", ["Paris"], 0.8, False),  # correct + invalid
        ("<answer> Paris </answer>", ["paris"], 0.8, False),
        (SR1_GOOD, ["Lyon"], 0.2, True),  # format only
        ("<think> a </think> Lyon <answer> Paris </answer>", ["Lyon"], 0.0, False),  # neither
        ("no tags at all", ["Paris"], 0.0, False),
    ],
)
def test_search_r1_structured_rewards(response: str, golds: list[str], reward: float, format_ok: bool) -> None:
    r = score(response, golds, "search_r1_structured")
    assert r.reward == pytest.approx(reward)
    assert r.format_ok is format_ok


def test_search_r1_em_and_zerosearch_f1() -> None:
    two = "<think>a</think><answer> London </answer><think>b</think><answer> Paris France </answer>"
    em = score(two, ["Paris"], "search_r1_em")
    assert (em.reward, em.em, em.answer, em.format_ok) == (0.0, 0.0, "Paris France", True)  # the last answer
    assert score(two, ["paris france"], "search_r1_em").reward == 1.0
    f1 = score(two, ["Paris"], "zerosearch_f1")
    assert f1.reward == pytest.approx(2 / 3) and f1.em == 0.0
    none = score("<think>no answer here</think>", ["Paris"], "zerosearch_f1")
    assert (none.reward, none.format_ok, none.format_error, none.answer) == (0.0, False, "answer_missing", "")
    # EM with a long answer gets no partial credit, F1 does (ZeroSearch's reason to prefer F1)
    long = "<answer> Paris is the answer </answer>"
    assert score(long, ["Paris"], "search_r1_em").reward == 0.0
    assert 0.0 < score(long, ["Paris"], "zerosearch_f1").reward < 1.0


# --------------------------------------------------------------------------------------------------- API errors


def test_invalid_requests() -> None:
    with pytest.raises(InvalidRequest, match="unknown reward scheme 'nope'"):
        score(GOOD, ["x"], "nope")
    with pytest.raises(InvalidRequest, match="no gold answers"):
        score(GOOD, [])
    with pytest.raises(InvalidRequest, match="no gold answers"):
        score(GOOD, ["", "  "])
    with pytest.raises(InvalidRequest, match="item 1"):
        score_batch([GOOD, GOOD], [["x"], []])
    with pytest.raises(InvalidRequest, match="2 responses but 1"):
        score_batch([GOOD, GOOD], [["x"]])
    with pytest.raises(InvalidRequest, match="ended_with_eos"):
        score_batch([GOOD], [["x"]], ended_with_eos=[True, False])


def test_score_batch_matches_score() -> None:
    responses = [GOOD, SR1_GOOD, "junk", GOOD]
    golds: list[list[str]] = [["Émile Zola"], ["Paris"], ["x"], ["Zola"]]
    eos = [True, True, False, False]
    for scheme in SCHEMES:
        batch = score_batch(responses, golds, scheme, eos)
        assert batch == [score(r, g, scheme, e) for r, g, e in zip(responses, golds, eos, strict=True)]


# ------------------------------------------------------------------------------------------------ properties

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
wordy = st.lists(
    st.sampled_from(["a", "an", "the", "Paris", "paris,", "yes", "no", "noanswer", "x", "Y!", "é"]), max_size=8
).map(" ".join)
answers = st.one_of(text, wordy)


@settings(max_examples=300, deadline=None)
@given(answers)
def test_normalize_is_idempotent(s: str) -> None:
    once = normalize_answer(s)
    assert normalize_answer(once) == once
    assert once == once.strip() and "  " not in once


@settings(max_examples=300, deadline=None)
@given(answers, answers)
def test_f1_bounds_symmetry_and_em(a: str, b: str) -> None:
    f_ab = f1_score(a, [b])
    assert 0.0 <= f_ab <= 1.0
    assert f_ab == pytest.approx(f1_score(b, [a]))  # F1 is symmetric in prediction and gold
    if exact_match(a, [b]) == 1.0 and normalize_answer(a):
        assert f_ab == 1.0  # EM implies F1 = 1 (when there is any token)
    if f_ab == 1.0:
        assert sorted(normalize_answer(a).split()) == sorted(normalize_answer(b).split())


@settings(max_examples=200, deadline=None)
@given(answers, st.lists(answers, min_size=1, max_size=4), answers)
def test_max_over_golds_is_monotone(pred: str, golds: list[str], extra: str) -> None:
    assert f1_score(pred, golds + [extra]) >= f1_score(pred, golds)
    assert f1_score(pred, golds) == max(f1_score(pred, [g]) for g in golds)
    assert exact_match(pred, golds) == max(exact_match(pred, [g]) for g in golds)


tags = st.sampled_from(
    ["<think>", "</think>", "<search>", "</search>", "<result>", "</result>", "<information>", "</information>"]
    + ["<answer>", "</answer>", "\\boxed{", "}", "{", " Paris ", " x ", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(tags, max_size=25).map("".join), st.booleans(), st.sampled_from(SCHEMES))
def test_reward_in_unit_interval_and_consistent(response: str, eos: bool, scheme: str) -> None:
    r = score(response, ["Paris"], scheme, eos)
    assert 0.0 <= r.reward <= 1.0 and 0.0 <= r.f1 <= 1.0 and r.em in (0.0, 1.0)
    assert r.format_ok is (r.format_error == "")
    if scheme == "research":
        assert r.reward == 0.0 or r.format_ok
        if r.format_ok:
            assert r.reward == (r.f1 if r.f1 > 0 else scoring.RESEARCH_FORMAT_ONLY_REWARD)
    if scheme == "search_r1_structured":
        assert r.reward in (0.0, 0.2, 0.8, 1.0)
