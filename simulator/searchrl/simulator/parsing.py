"""Parsing and repair of simulation-LLM output into documents.

The simulator asks for ``Doc 1: ... Doc k: ...`` (:mod:`searchrl.simulator.prompts`). :func:`parse_documents` splits a
completion on the ``Doc N:`` markers, cuts everything from ``Doc {k+1}`` on (as ZeroSearch does), and cleans each
document so that no garbage is passed on:

=============== =============================================================================================
repair kind     what happened
=============== =============================================================================================
``trimmed``     text after the document proper was cut: commentary lines ("Explanation: ..."), extra
                paragraphs, URLs, over-long text, documents beyond ``k``
``split``       a document far longer than asked for was split at sentence boundaries into several
``repetition``  a repetition loop (the same run of words again) was cut at its second occurrence
``dropped``     a document was discarded: empty, too short, mostly repeated words, a duplicate, or an echo of
                the prompt's instructions
=============== =============================================================================================

Callers (:class:`searchrl.simulator.simulate.DocumentSimulator`) add ``retried`` (another generation round was needed)
and ``filled`` (still short after the retries: an explicit "no result" document was added) and export the counts as
``searchrl_simulator_repairs_total{kind}``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["ParsedDocument", "ParseResult", "document_id", "parse_documents", "title_of", "truncate_words"]

# "Doc 2:", "**Doc 2**:", "Document 2:", "doc #2:" anywhere (the colon is required so prose mentioning "document 2"
# is not split).
_MARKER = re.compile(r"\**\b(?:doc|document)\s*#?\s*(\d{1,3})\s*\**\s*:", re.IGNORECASE)
# Lines that are commentary about the documents rather than a document.
_META_LINE = re.compile(
    r"^\s*[#>*\-\d.()\s]*(?:explanation|note|notes|here is|here are|here's|sentence\s*\d|premise|summary|proofread\w*|"
    r"demonstration|document\s*:|documents\s*:|source|sources|url|link|links|reference|references|query|output|"
    r"i hope|let me|sure[,!]|as an ai|in conclusion|title of)\b",
    re.IGNORECASE,
)
_BULLET_ONLY = re.compile(r"^\s*[\d.)\-*#>•]*\s*$")
_TITLE_LINE = re.compile(r"^\s*\**title\**\s*:\s*(.+)$", re.IGNORECASE)
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MARKUP = re.compile(r"[*_`#]+|\[(?:[^\]]*)\]\((?:[^)]*)\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z0-9\"'(])")
_QUOTES = "\"'“”‘’«» "

MIN_DOC_WORDS = 4
REPEAT_NGRAM = 5


@dataclass
class ParsedDocument:
    """One cleaned document.

    Attributes:
        title: a short title (a ``Title:`` line, a heading line, or the first words of the text).
        text: the body, whitespace-normalised.
    """

    title: str
    text: str


@dataclass
class ParseResult:
    """Documents parsed from one completion and the repairs that were needed.

    Attributes:
        documents: at most ``k`` documents, in order.
        repairs: repair kind -> count (see the module docstring).
    """

    documents: list[ParsedDocument] = field(default_factory=list)
    repairs: Counter[str] = field(default_factory=Counter)


def document_id(query: str, quality: str, rank: int) -> str:
    """Synthetic id of a simulated document: ``"sim-"`` + 16 hex digits of SHA-256 over (query, quality, rank)."""
    return "sim-" + hashlib.sha256(f"{query}\x1f{quality}\x1f{rank}".encode()).hexdigest()[:16]


def truncate_words(text: str, max_words: int) -> str:
    """``text`` cut to at most ``max_words`` words, at the last sentence end inside the limit when there is one.

    Args:
        text: whitespace-separated text.
        max_words: the word budget (>= 1).
    """
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    head = " ".join(words[:max_words])
    cut = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if head.endswith((".", "!", "?")):
        return head
    if cut >= len(head) // 3:
        return head[: cut + 1]
    return head


def title_of(text: str, max_words: int = 8) -> str:
    """A title from the first words of ``text``, up to the first clause punctuation, at most ``max_words`` words."""
    first = re.split(r"[.;:!?,(]|\s[-–—]\s", text, maxsplit=1)[0]
    words = first.split()[:max_words] or text.split()[:max_words]
    return " ".join(words).strip(_QUOTES + ",.;:")


def _clean_inline(text: str) -> str:
    text = _URL.sub("", text)
    text = _MARKUP.sub("", text)
    text = re.sub(r"\s+", " ", text).strip()
    return _strip_quotes(text)


def _strip_quotes(text: str) -> str:
    """Removes quotes that wrap the whole text, or an opening/closing quote that has no partner."""
    quotes = set(_QUOTES) - {" "}
    while len(text) >= 2 and text[0] in quotes and text[-1] in quotes:
        text = text[1:-1].strip()
    if text[:1] in quotes and not any(c in quotes for c in text[1:]):
        text = text[1:].strip()
    if text[-1:] in quotes and not any(c in quotes for c in text[:-1]):
        text = text[:-1].strip()
    return text


def _cut_repetition(words: list[str], n: int = REPEAT_NGRAM) -> tuple[list[str], bool]:
    """Cuts ``words`` where a run of ``n`` words occurs for the second time."""
    seen: dict[tuple[str, ...], int] = {}
    norm = [w.lower().strip(".,;:!?\"'") for w in words]
    for i in range(len(norm) - n + 1):
        gram = tuple(norm[i : i + n])
        first = seen.get(gram)
        if first is not None and i - first >= n:
            return words[:i], True
        seen.setdefault(gram, i)
    return words, False


def _split_long(text: str, words: int) -> list[str]:
    """Splits ``text`` at sentence ends into chunks of about ``words`` words (at least ``words // 2`` each)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    chunks: list[str] = []
    current: list[str] = []
    count = 0
    for sentence in sentences:
        n = len(sentence.split())
        if current and count + n > words * 1.5 and count >= words // 2:
            chunks.append(" ".join(current))
            current, count = [], 0
        current.append(sentence)
        count += n
    if current:
        if chunks and count < words // 2:
            chunks[-1] = chunks[-1] + " " + " ".join(current)
        else:
            chunks.append(" ".join(current))
    return chunks


def _body(segment: str, repairs: Counter[str]) -> tuple[str, str]:
    """Title and body text of one ``Doc N:`` segment: the first paragraph, without commentary."""
    lines = [ln.rstrip() for ln in segment.strip().splitlines()]
    title = ""
    kept: list[str] = []
    for idx, line in enumerate(lines):
        if _BULLET_ONLY.match(line) and line.strip():
            continue  # a list number left over before the next marker ("2. Doc 3: ...")
        if not line.strip():
            if kept:  # a blank line ends the document (its first paragraph)
                if any(ln.strip() for ln in lines[idx + 1 :]):
                    repairs["trimmed"] += 1
                break
            continue
        m = _TITLE_LINE.match(line)
        if m and not title and not kept:
            title = _clean_inline(m.group(1))
            continue
        if _META_LINE.match(line) and (kept or title):
            repairs["trimmed"] += 1
            break
        if _META_LINE.match(line) and not kept:
            continue  # a commentary line before any text: skip it
        kept.append(line.strip())
    # A short first line without final punctuation, followed by more text, is a heading.
    if not title and len(kept) >= 2:
        head = _clean_inline(kept[0])
        if 0 < len(head.split()) <= 12 and not head.endswith((".", "!", "?", ",", ";", ":")):
            title = head
            kept = kept[1:]
    return title, " ".join(kept)


def parse_documents(
    completion: str,
    k: int,
    start: int = 1,
    words: int = 30,
    existing: Iterable[str] = (),
    echoes: Iterable[str] = (),
) -> ParseResult:
    """Parses a simulation completion into cleaned documents.

    Args:
        completion: the text the engine generated after the prefill ``"Doc {start}:"`` (the prefill itself is not
            part of it).
        k: documents wanted in total (top-k); markers numbered above ``k`` end the parse ("cut at Doc k+1").
        start: number of the first document in ``completion`` (``len(existing) + 1`` for a continuation).
        words: target words per document; documents over ``2 * words`` are split or trimmed.
        existing: texts of documents already kept (duplicates of them are dropped).
        echoes: phrases of the prompt's instructions; a document containing one (case- and punctuation-insensitive)
            repeats the prompt instead of answering it and is dropped.

    Returns:
        At most ``k - start + 1`` documents and the repairs made.

    Raises:
        ValueError: ``k < 1``, ``start < 1`` or ``words < 1``.
    """
    if k < 1 or start < 1 or words < 1:
        raise ValueError(f"k, start and words must be >= 1, got k={k}, start={start}, words={words}")
    result = ParseResult()
    want = k - start + 1
    if want <= 0:
        return result
    text = f"Doc {start}:" + completion
    markers = list(_MARKER.finditer(text))
    segments: list[str] = []
    for i, m in enumerate(markers):
        if int(m.group(1)) > k:  # ZeroSearch cuts the output at "Doc {k+1}"
            result.repairs["trimmed"] += 1
            break
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        segments.append(text[m.end() : end])
    seen = {_norm(t) for t in existing}
    echo_keys = [_norm(e) for e in echoes if _norm(e)]
    candidates: list[ParsedDocument] = []
    for segment in segments:
        title, body = _body(segment, result.repairs)
        if echo_keys and any(e in _norm(title + " " + body) for e in echo_keys):
            result.repairs["dropped"] += 1
            continue
        if _URL.search(body):
            result.repairs["trimmed"] += 1
        tokens, looped = _cut_repetition(_clean_inline(body).split())
        if looped:
            result.repairs["repetition"] += 1
        if len(tokens) < MIN_DOC_WORDS or len({t.lower() for t in tokens}) / len(tokens) < 0.4:
            result.repairs["dropped"] += 1
            continue
        body_clean = " ".join(tokens)
        pieces = [body_clean]
        if len(tokens) > 2 * words:
            pieces = _split_long(body_clean, words)
            if len(pieces) > 1:
                result.repairs["split"] += 1
            for j, piece in enumerate(pieces):
                if len(piece.split()) > 2 * words:
                    pieces[j] = truncate_words(piece, 2 * words)
                    result.repairs["trimmed"] += 1
        for j, piece in enumerate(pieces):
            key = _norm(piece)
            if not key or key in seen:
                result.repairs["dropped"] += 1
                continue
            seen.add(key)
            piece_title = title if (title and j == 0) else title_of(piece)
            candidates.append(ParsedDocument(title=piece_title or title_of(piece), text=piece))
    if len(candidates) > want:
        result.repairs["trimmed"] += 1
        candidates = candidates[:want]
    result.documents = candidates
    return result


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def fill_document(query: str) -> ParsedDocument:
    """The explicit placeholder used when the engine could not produce enough documents after its retries."""
    return ParsedDocument(title="No result", text=f'No further result was found for the query "{query.strip()}".')
