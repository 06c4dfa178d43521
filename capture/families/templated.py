"""The prompt's tokens inside a templated text sequence (Qwen-Image's chat template, FLUX.2's system message and
[INST] turn, SANA's instruction): the pipeline tokenizes more than the prompt, and only the prompt's own tokens are
``metadata.tokens``.

Byte-level BPE pieces (Qwen's, Mistral's ``Ġword``) are not readable text, so a token's ``text`` is its decoded piece
with a leading space written ``▁`` (SentencePiece's word-start mark, which the dashboard drops when it shows a token).
A piece that starts with a space (or ``▁``), the first piece and a piece after a special token start a word; the
word is the decoded text of its pieces.
"""
from __future__ import annotations

from typing import Sequence

SPACE = "\u2581"


def piece_tokens(tokenizer, picked: Sequence[tuple[int, int]], *, encoder: str, words: list[str]) -> list[dict]:
    """``metadata.tokens`` for ``picked`` = ``[(position in the text sequence, token id)]``, in order; each word is
    appended to ``words`` and indexed from the tokens."""
    special = set(tokenizer.all_special_ids)
    tokens: list[dict] = []
    members: list[int] = []   # indices into ``tokens`` of the word being read

    def close() -> None:
        if members:
            word = tokenizer.decode([tokens[i]["id"] for i in members]).strip()
            for i in members:
                tokens[i]["word"] = len(words) if word else None
            if word:
                words.append(word)
            members.clear()

    for position, token_id in picked:
        token_id = int(token_id)
        is_special = token_id in special
        if is_special:
            close()
            text = str(tokenizer.convert_ids_to_tokens(token_id))
        else:
            piece = tokenizer.decode([token_id])
            starts = piece[:1].isspace() or piece.startswith(SPACE)
            if starts or not members:
                close()
            text = SPACE + piece[1:] if piece[:1].isspace() else piece
        tokens.append({"index": int(position), "id": token_id, "text": text or "␣", "word": None,
                       "special": is_special, "set": encoder})
        if not is_special:
            members.append(len(tokens) - 1)
    close()
    return tokens


def overlapping(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character span meets ``[start, end)`` (a piece that merged a template character
    with the prompt's first one counts as the prompt's)."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]


def token_set(tokens: list[dict], *, encoder: str, tokenizer: str, sequence_end: int) -> dict:
    """``token_sets[]`` for ``tokens`` (contiguous in the sequence): their first position as ``offset``, the slots from
    there to ``sequence_end`` (the set's end in the text sequence) as ``sequence_length``."""
    offset = tokens[0]["index"] if tokens else 0
    return {"encoder": encoder, "tokenizer": tokenizer, "offset": offset, "length": len(tokens),
            "sequence_length": sequence_end - offset, "agrees": True}
