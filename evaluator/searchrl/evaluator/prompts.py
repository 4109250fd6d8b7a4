"""Prompts of the two baselines, in the same two forms as the agent's ReSearch templates.

* ``direct``: answer from the model's own knowledge, no search (the "Direct Prompt" rows of the ZeroSearch and
  Search-R1 tables).
* ``rag``: retrieve once with the question, show the documents, then answer (the "RAG" rows).

Both ask for ``<think> ... </think>`` then ``<answer> ... \\boxed{answer} ... </answer>`` so the ReSearch format rules
and the answer extraction of the reward library apply to every method alike. ``research_instruct`` puts the
instructions in a system prompt through the tokenizer's chat template; ``research_base`` is one plain-text
conversation ending in ``"Assistant:"`` (as :mod:`searchrl.agent.prompts` does for the agent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from searchrl.agent.loop import format_documents
from searchrl.errors import InvalidRequest

_ANSWER_RULE = (
    "Think briefly inside <think> </think>, then give the final answer as "
    "<answer> The final answer is \\boxed{answer} </answer>. The boxed answer should be a short entity, date, number "
    "or yes/no, not a sentence."
)


_EXAMPLE = (
    "Example:\nQuestion: In which city is the Eiffel Tower?\n"
    "<think> The Eiffel Tower is a landmark of Paris. </think>\n<answer> The final answer is \\boxed{Paris} </answer>"
)


def _system(method: str) -> str:
    if method == "direct":
        return (
            f"You are a helpful assistant that answers questions from your own knowledge. {_ANSWER_RULE}\n\n{_EXAMPLE}"
        )
    return (
        "You are a helpful assistant that answers questions using the Wikipedia documents given with the question "
        f"(they may or may not contain the answer). {_ANSWER_RULE}\n\n{_EXAMPLE}"
    )


def _user(method: str, question: str, documents: str) -> str:
    if method == "direct":
        return f"Question: {question.strip()}"
    return f"Documents:\n{documents}\n\nQuestion: {question.strip()}"


def render_baseline_prompt(
    tokenizer: Any,
    method: str,
    question: str,
    documents: Sequence[Any] = (),
    template: str = "research_instruct",
    response_prefix: str = "<think>",
    max_doc_chars: int = 0,
) -> tuple[str, list[int]]:
    """Prompt text and token ids of a baseline.

    Args:
        tokenizer: the policy's Hugging Face tokenizer.
        method: ``"direct"`` or ``"rag"``.
        question: the question.
        documents: retrieved documents (``rag``), shown as the agent sees them
            (:func:`searchrl.agent.loop.format_documents`).
        template: ``"research_instruct"`` or ``"research_short"`` (chat template; the baselines have one system
            prompt for both) or ``"research_base"`` (plain text).
        response_prefix: text appended after the assistant header that starts the response (the agent loop's
            default ``<think>``); it is part of the response the reward sees.
        max_doc_chars: cut each document to this many characters (0: no limit).

    Returns:
        ``(text, ids)``; ids, shape [prompt_len], include the response prefix.

    Raises:
        InvalidRequest: unknown method or template, or ``research_instruct`` with a tokenizer lacking a chat template.
    """
    if method not in ("direct", "rag"):
        raise InvalidRequest(f"unknown baseline {method!r}; expected direct or rag")
    docs = format_documents(list(documents), max_doc_chars) if method == "rag" else ""
    if template in ("research_instruct", "research_short"):
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{template} needs a tokenizer with a chat template; use --template research_base")
        messages = [
            {"role": "system", "content": _system(method)},
            {"role": "user", "content": _user(method, question, docs)},
        ]
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    elif template == "research_base":
        text = (
            "A conversation between User and Assistant. The User asks a question and the Assistant answers it. "
            f"{_system(method)}\nUser: {_user(method, question, docs)}\nAssistant:"
        )
    else:
        raise InvalidRequest(
            f"unknown template {template!r}; expected research_instruct, research_short or research_base"
        )
    text += response_prefix
    return text, [int(x) for x in tokenizer.encode(text, add_special_tokens=False)]
