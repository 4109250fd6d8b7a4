"""Prompts of the simulation LLM (ZeroSearch, arXiv 2505.04588, section 3.2), in searchrl's own wording.

The simulator plays a search engine: for a query it writes ``k`` documents of about 30 words, numbered
``Doc 1:``, ``Doc 2:`` ... The USEFUL and NOISY prompts are identical except for the quality word, as in ZeroSearch, so
that the only thing the model is told to change is whether the documents help. During training the prompt can also name
the original question and its gold answer (ZeroSearch conditions on both to steer what useful documents say); at
inference the query alone is sent.

Prompts are chat messages. The last message is an assistant turn holding the start of the answer - a header that
repeats the quality word (``Useful documents for "<query>":``), the documents kept so far, and the next ``Doc N:``
marker - which the engines continue rather than answer. This forces the numbered format even on the tiny embedded
model (SmolLM2-135M-Instruct), and putting the quality word right before the text to write is what made that model's
USEFUL and NOISY documents differ at all (measured with ``tests/simulator/test_simulate.py``); the two prompts still
differ only in the quality word. :func:`sft_messages` builds the same prompt
for the simulator's fine-tuning data (:mod:`searchrl.simulator.sft`), so training and serving see the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from searchrl.simulator.curriculum import Quality

#: Bumped whenever the wording changes: it is part of the search-cache key, so old cached documents are not reused.
PROMPT_VERSION = "zs-v1"

#: Default document length asked for, in words (ZeroSearch: about 30).
DOC_WORDS = 30

SYSTEM_PROMPT = (
    "You are a web search engine. For each search query you write the short text snippets that a results page "
    "would show, one snippet per search result."
)

_TASK = (
    "Write {k} {quality} documents for the search query below, about {words} words each. "
    "Each document must carry {quality} information for the query. "
    'Start every document on a new line with "Doc 1:", "Doc 2:" and so on, and write nothing else.'
)
_CONDITION = (
    'Context: the query was written while answering the question "{question}", whose correct answer is {answers}.'
)

#: Phrases of the instructions above; a "document" that repeats one is an echo of the prompt and is dropped.
INSTRUCTION_ECHOES = (
    "the query was written while answering",
    "whose correct answer is",
    "documents for the search query",
    "start every document on a new line",
    "write nothing else",
    "information for the query",
    "snippets that a results page",
)

Message = dict[str, str]


@dataclass(frozen=True)
class Conditioning:
    """Training-time context of a query (ZeroSearch): the original question and its gold answers.

    Attributes:
        question: the question the query serves; empty at inference.
        golden_answers: its gold answers; empty at inference.
    """

    question: str = ""
    golden_answers: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """True when there is a question or an answer to condition on."""
        return bool(self.question.strip() or any(a.strip() for a in self.golden_answers))

    def key(self) -> str:
        """A canonical string for cache keys (empty when inactive)."""
        if not self.active:
            return ""
        return self.question.strip() + "\x1f" + "\x1e".join(a.strip() for a in self.golden_answers if a.strip())


def _answers_text(answers: Sequence[str]) -> str:
    kept = [a.strip() for a in answers if a.strip()]
    if not kept:
        return "not given"
    return " or ".join(f'"{a}"' for a in kept)


def user_prompt(
    query: str, quality: Quality, k: int, conditioning: Conditioning | None = None, words: int = DOC_WORDS
) -> str:
    """The user message asking for ``k`` documents of ``quality`` for ``query``.

    Args:
        query: the search query, verbatim.
        quality: USEFUL or NOISY (the only word that differs between the two prompts).
        k: number of documents (top-k), >= 1.
        conditioning: the training-time question and gold answers; ``None`` or inactive at inference.
        words: target length of a document, in words.

    Returns:
        The message text.

    Raises:
        ValueError: ``k < 1`` or ``words < 1``.
    """
    if k < 1 or words < 1:
        raise ValueError(f"k and words must be >= 1, got k={k}, words={words}")
    parts = [_TASK.format(k=k, quality=Quality(quality).value, words=words)]
    if conditioning is not None and conditioning.active:
        parts.append(
            _CONDITION.format(
                question=conditioning.question.strip(), answers=_answers_text(conditioning.golden_answers)
            )
        )
    parts.append(f"Query: {query.strip()}")
    return "\n\n".join(parts)


def format_documents(texts: Sequence[str], start: int = 1) -> str:
    """Documents in the simulator's output format: ``"Doc {i}: {text}"`` one per line, numbered from ``start``."""
    return "\n".join(f"Doc {start + i}: {t.strip()}" for i, t in enumerate(texts))


def prefill(kept: Sequence[str] = (), quality: Quality | None = None, query: str = "") -> str:
    """The assistant text the engine continues.

    Args:
        kept: documents already accepted (written back as ``Doc 1: ...`` lines).
        quality: when given, a header line ``'<Quality> documents for "<query>":'`` comes first.
        query: the query named in the header.

    Returns:
        ``[header\n][Doc 1: ...\nDoc 2: ...\n]Doc {len(kept)+1}:``
    """
    head = format_documents(kept)
    marker = f"Doc {len(kept) + 1}:"
    if quality is not None:
        head = f'{Quality(quality).value.capitalize()} documents for "{query.strip()}":\n' + head
        return f"{head}\n{marker}" if kept else head + marker
    return f"{head}\n{marker}" if head else marker


def build_messages(
    query: str,
    quality: Quality,
    k: int,
    conditioning: Conditioning | None = None,
    kept: Sequence[str] = (),
    words: int = DOC_WORDS,
) -> list[Message]:
    """Chat messages for one simulation call, ending with the assistant prefill to continue.

    Args:
        query: the search query.
        quality: USEFUL or NOISY.
        k: number of documents asked for.
        conditioning: training-time question and gold answers (``None`` at inference).
        kept: documents already accepted from an earlier round (the continuation asks for ``Doc {len(kept)+1}``).
        words: target words per document.

    Returns:
        ``[system, user, assistant-prefill]`` messages.
    """
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_prompt(query, quality, k, conditioning, words)},
        {"role": "assistant", "content": prefill(kept, quality, query)},
    ]


def sft_messages(
    query: str,
    quality: Quality,
    documents: Sequence[str],
    conditioning: Conditioning | None = None,
    words: int = DOC_WORDS,
) -> tuple[list[Message], list[Message]]:
    """A prompt/completion pair for simulator SFT (ZeroSearch section 3.3) in the serving prompt format.

    Args:
        query: the search query.
        quality: the label of the documents (USEFUL when the trajectory reached the right answer, else NOISY).
        documents: the document texts the real engine returned, best first.
        conditioning: the trajectory's question and gold answers.
        words: target words per document.

    Returns:
        ``(prompt, completion)``: the system and user messages, and one assistant message with the same header
        line the serving prefill starts with, then ``"Doc 1: ...\\nDoc 2: ..."``.

    Raises:
        ValueError: no documents.
    """
    if not documents:
        raise ValueError("an SFT example needs at least one document")
    prompt = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_prompt(query, quality, len(documents), conditioning, words)},
    ]
    header = prefill((), quality, query)[: -len("Doc 1:")]
    return prompt, [{"role": "assistant", "content": header + format_documents(documents)}]
