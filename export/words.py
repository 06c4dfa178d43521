"""Prompt words of a run: token labels, sub-words merged into words, and which words carry content.

The dashboard's token selector and ``diffviz export-figure`` both read words from here, so a word is
labelled, merged and judged "content" the same way in both. Plain Python (it runs in Pyodide too).

    from export.words import words
    for word in words(run.metadata["tokens"], run.metadata.get("words") or []):
        word.label, word.rows, word.content     # "circle", (3,), True
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

#: Words that are never a prompt's subject: skipped for the default token and the default word grid.
FUNCTION_WORDS = frozenset("a an the and or of on in at to with by for from over under is are , .".split())


@dataclass(frozen=True)
class Word:
    """One entry of the prompt: a word (its sub-word tokens merged), a special token, or a token with no word."""

    label: str
    #: stored token indices (rows of a ``[T, h, w]`` stack), in prompt order
    rows: tuple[int, ...]
    #: not a special token and not a function word
    content: bool
    #: ``metadata.words`` index, None for special tokens and tokens outside every word
    word: int | None = None


def clean_token(text: Any) -> str:
    """A tokenizer piece as shown: CLIP's end-of-word mark ``</w>`` and SentencePiece's word-start mark ``▁``
    (T5) dropped; an empty piece as ``␣``."""
    text = str(text)
    if text.endswith("</w>"):
        text = text[:-4]
    return text.removeprefix("\u2581") or "␣"


def token_text(token: Mapping[str, Any]) -> str:
    """The label of one ``metadata.tokens`` record: ``<start>``/``<end>`` for special tokens."""
    if token.get("special"):
        text = str(token.get("text", ""))
        return "<start>" if "start" in text else "<end>" if "end" in text else text
    return clean_token(token.get("text", ""))


def word_of(token: Mapping[str, Any]) -> int | None:
    word = token.get("word")
    return None if word is None else int(word)


def is_content(tokens: Sequence[Mapping[str, Any]], rows: Sequence[int]) -> bool:
    """True when some row is a non-special token whose text is not a function word (the dashboard's
    rule for its first token: a word counts when any of its sub-word pieces does)."""
    return any(not tokens[i].get("special") and token_text(tokens[i]).lower() not in FUNCTION_WORDS for i in rows)


def words(tokens: Sequence[Mapping[str, Any]], word_list: Sequence[str] | None = None) -> list[Word]:
    """Every entry of the prompt in order of its first token: one :class:`Word` per ``metadata.words``
    entry (its tokens merged), and one per token that belongs to no word (special tokens included).

    A word's label is ``word_list[word]`` when the list has it, else its pieces joined."""
    word_list = list(word_list or [])
    rows_of: dict[tuple, list[int]] = {}   # a word merges within its token set (SD3's CLIP and T5 both spell it)
    for i, token in enumerate(tokens):
        word = word_of(token)
        if word is not None:
            rows_of.setdefault((token.get("set"), word), []).append(i)
    out: list[Word] = []
    for i, token in enumerate(tokens):
        word = word_of(token)
        if word is None:
            out.append(Word(token_text(token), (i,), is_content(tokens, [i]), None))
            continue
        rows = rows_of[(token.get("set"), word)]
        if rows[0] != i:
            continue  # a later piece of a word already listed
        label = word_list[word] if 0 <= word < len(word_list) else "".join(token_text(tokens[r]) for r in rows)
        out.append(Word(str(label), tuple(rows), is_content(tokens, rows), word))
    return out


def content_words(tokens: Sequence[Mapping[str, Any]], word_list: Sequence[str] | None = None) -> list[Word]:
    return [w for w in words(tokens, word_list) if w.content]


def default_token(tokens: Sequence[Mapping[str, Any]]) -> int:
    """The token shown first: the first content token of the prompt, else the first non-special one, else 0."""
    plain = [i for i, token in enumerate(tokens) if not token.get("special")]
    content = [i for i in plain if is_content(tokens, [i])]
    return (content or plain or [0])[0]


# ---- words a model does not know (the toy model refuses them: capture.toyworld.vocabulary, the generator tab)

#: The CLIP pre-tokenizer's split, less its "other punctuation" branch: the toy tokenizer turns punctuation into
#: its end token, the same token that pads every prompt, so punctuation brings in no unseen pieces.
_WORD = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d+")
#: A refusal lists at most this many unknown words, each cut to this many characters.
_MAX_LISTED, _MAX_WORD_CHARS = 10, 24


def prompt_words(text: str) -> list[str]:
    """The words of ``text`` as a CLIP tokenizer splits them, lower-cased, in order."""
    return _WORD.findall(unicodedata.normalize("NFC", text or "").lower())


def unknown_words(text: str, vocabulary: Iterable[str]) -> list[str]:
    """The distinct words of ``text`` that are not in ``vocabulary``, in order of first appearance."""
    known = {w.lower() for w in vocabulary}
    out: list[str] = []
    for word in prompt_words(text):
        if word not in known and word not in out:
            out.append(word)
    return out


def refusal(unknown: list[str], vocabulary: Iterable[str]) -> str:
    """One line naming the unknown words and listing what the toy model knows."""
    vocabulary = list(vocabulary)
    shown = [w if len(w) <= _MAX_WORD_CHARS else w[:_MAX_WORD_CHARS - 1] + "…" for w in unknown[:_MAX_LISTED]]
    more = f" (+{len(unknown) - _MAX_LISTED} more)" if len(unknown) > _MAX_LISTED else ""
    noun = "word" if len(unknown) == 1 else "words"
    return f"unknown {noun} for the toy model: {', '.join(shown)}{more} (it knows: {', '.join(vocabulary)})"
