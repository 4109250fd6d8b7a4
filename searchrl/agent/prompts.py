"""ReSearch prompt templates (arXiv 2503.19470, section 2.2), written for searchrl.

Two forms, as in ReSearch:

* ``research_short`` - :func:`short_system_prompt`: the tag rules in two sentences and no worked example (about 60
  prompt tokens instead of 230), for small instruct models whose response prefix and answer prefix already steer the
  format; every rollout and update token of the prompt costs CPU time.
* ``research_base`` - for base models: one plain-text "conversation between User and Assistant" with no chat
  template (ReSearch's ``apply_chat False`` + ``re_search_template``).
* ``research_instruct`` - for instruct models: the instructions go in a system prompt rendered by the tokenizer's
  chat template (``apply_chat True`` + ``re_search_template_sys``).

Both teach the tag protocol: ``<think>`` for reasoning, ``<search>query</search>`` to search, documents come back
between observation tags (``<result>`` for ReSearch, ``<information>`` for Search-R1 / ZeroSearch), and the final
answer is written as ``<answer> ... \\boxed{answer} ... </answer>``.

The assistant turn may start with a *response prefix* (default ``<think>``): text the environment writes at the start
of the response (loss mask 0) that steers small models into the format; it is part of the response text the reward
sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TEMPLATES = ("research_instruct", "research_base", "research_short")

THINK_PREFIX = "<think>"
"""The default response prefix: the response opens a reasoning block."""

SEARCH_FIRST_PREFIX = "<think> I need to search for this. </think>\n<search>"
"""A response prefix that opens a search, so the policy writes the query itself (loss mask 1 on the query).

Measured with SmolLM2-135M-Instruct on 20 FanOutQA dev sub-questions (``benchmarks/prompt_probe.py``): with
:data:`THINK_PREFIX` about 1 episode in 20 searches; with this prefix about 17 in 20 do. Use it for the embedded
135M model (the CPU demo); larger models follow the system prompt and need no help.
"""


@dataclass(frozen=True)
class TagProtocol:
    """The tags of one rollout protocol.

    Attributes:
        name: ``"research"`` or ``"search_r1"``.
        obs_open / obs_close: tags around inserted documents.
    """

    name: str
    obs_open: str
    obs_close: str
    think_open: str = "<think>"
    think_close: str = "</think>"
    search_open: str = "<search>"
    search_close: str = "</search>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"

    @property
    def info_tag(self) -> str:
        """Name of the observation tag (``result`` or ``information``): the reward library's ``info_tag``."""
        return self.obs_open.strip("<>")

    def observation(self, body: str) -> str:
        """The text inserted after a search: ``" <result>\\n{body}\\n</result>"`` (ReSearch's exact layout)."""
        return f" {self.obs_open}\n{body}\n{self.obs_close}"


PROTOCOLS: dict[str, TagProtocol] = {
    "research": TagProtocol("research", "<result>", "</result>"),
    "search_r1": TagProtocol("search_r1", "<information>", "</information>"),
}


def get_protocol(name: str) -> TagProtocol:
    """The :class:`TagProtocol` called ``name``.

    Raises:
        ValueError: unknown protocol name.
    """
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}") from None


def _rules(p: TagProtocol) -> str:
    return (
        f"Think step by step inside {p.think_open} {p.think_close}. Whenever you need a fact you do not know, search "
        f"for it by writing a short query as {p.search_open} query {p.search_close}; the search results will then be "
        f"shown to you between {p.obs_open} and {p.obs_close}. You may search several times. When you know the "
        f"answer, write it as {p.answer_open} The final answer is \\boxed{{answer}} {p.answer_close}"
    )


def _example(p: TagProtocol) -> str:
    return (
        f"{p.think_open} I need to find where the Eiffel Tower is. {p.think_close}\n"
        f"{p.search_open} Eiffel Tower location {p.search_close}"
        f"{p.observation('Doc 1 (Title: Eiffel Tower) The Eiffel Tower is a wrought-iron tower in Paris, France.')}\n"
        f"{p.think_open} The tower is in Paris. {p.think_close}\n"
        f"{p.answer_open} The final answer is \\boxed{{Paris}} {p.answer_close}"
    )


def system_prompt(protocol: str = "research") -> str:
    """The system prompt of ``research_instruct``: the rules and one worked example.

    Raises:
        ValueError: unknown protocol name.
    """
    p = get_protocol(protocol)
    return (
        "You are a helpful assistant that answers questions by searching Wikipedia. "
        f"{_rules(p)}\n\n"
        "Example:\nQuestion: In which city is the Eiffel Tower?\n"
        f"{_example(p)}"
    )


def short_system_prompt(protocol: str = "research") -> str:
    """The system prompt of ``research_short``: the tag rules without the worked example.

    Its example answer is a real one (``\\boxed{Paris}``), not a placeholder such as ``\\boxed{answer}``: a 135M
    model copies a placeholder into its answer, and with no example at all it does not close the answer block.

    Raises:
        ValueError: unknown protocol name.
    """
    p = get_protocol(protocol)
    return (
        f"Answer the question. To search Wikipedia, write a search between {p.search_open} and {p.search_close}; the "
        f"results appear between {p.obs_open} and {p.obs_close}. Then write the final answer, a name, a date or a few "
        f"words taken from the results, as in {p.answer_open} \\boxed{{Paris}} {p.answer_close}."
    )


def base_prompt_text(question: str, protocol: str = "research") -> str:
    """The plain-text ``research_base`` prompt ending in ``"Assistant:"`` (no chat template).

    Raises:
        ValueError: unknown protocol name.
    """
    p = get_protocol(protocol)
    return (
        "A conversation between User and Assistant. The User asks a question and the Assistant answers it. "
        f"{_rules(p)} For example:\n{_example(p)}\n"
        f"User: {question.strip()}\nAssistant:"
    )


def instruct_messages(question: str, protocol: str = "research", *, short: bool = False) -> list[dict[str, str]]:
    """The chat messages of ``research_instruct`` (``short``: of ``research_short``): the system prompt and the
    question as the user turn.

    Raises:
        ValueError: unknown protocol name.
    """
    return [
        {"role": "system", "content": short_system_prompt(protocol) if short else system_prompt(protocol)},
        {"role": "user", "content": f"Question: {question.strip()}"},
    ]


@dataclass
class Prompt:
    """A rendered prompt.

    Attributes:
        text: the prompt text (chat-formatted for ``research_instruct``).
        ids: its token ids, shape [prompt_len].
    """

    text: str
    ids: list[int]


def render_prompt(
    tokenizer: Any, question: str, template: str = "research_instruct", protocol: str = "research"
) -> Prompt:
    """Renders the prompt of one question.

    Args:
        tokenizer: a Hugging Face tokenizer (``research_instruct`` needs a chat template).
        question: the question text.
        template: ``"research_instruct"``, ``"research_short"`` or ``"research_base"``.
        protocol: ``"research"`` or ``"search_r1"`` (observation tags).

    Returns:
        The prompt text and ids (the instruct prompt ends with the assistant header of the chat template).

    Raises:
        ValueError: unknown template or protocol, or a tokenizer without a chat template for ``research_instruct``.
    """
    if template == "research_base":
        text = base_prompt_text(question, protocol)
    elif template in ("research_instruct", "research_short"):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{template} needs a tokenizer with a chat template; use research_base")
        messages = instruct_messages(question, protocol=protocol, short=template == "research_short")
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    ids = [int(x) for x in tokenizer.encode(text, add_special_tokens=False)]
    return Prompt(text=text, ids=ids)
