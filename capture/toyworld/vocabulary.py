"""Which words of a prompt the toy model knows: the toy world's caption grammar, and nothing else.

The toy model's tokenizer has one token per grammar word (``world.VOCABULARY``). Any other word is
split into character pieces the model never saw together (``purple`` -> ``u, r, <end>, l, e``), so the
CLI, the bridge and the dashboard refuse such a prompt for the toy model instead of running it.

Words are found the way the tokenizer's pre-tokenizer finds them: lower-cased runs of letters, numbers,
and the contraction pieces (``'s``, ``'t`` …). Other punctuation is not a word: the tokenizer turns it
into its end token, the same token that pads every prompt, so it brings in no unseen pieces.

Torch-free (numpy through ``world`` only), so the check runs before any heavy import.
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable

from capture.toyworld.world import VOCABULARY

#: The shipped toy model (``capture.families.DEFAULT_MODEL_DIR`` is the same folder).
MODEL_DIR = Path(__file__).resolve().parent / "model"
#: The toy tokenizer's file is about 6 KB; a larger one belongs to some other model and is not read.
_MAX_TOKENIZER_BYTES = 256 * 1024
#: The refusal lists at most this many unknown words, each cut to this many characters.
_MAX_LISTED, _MAX_WORD_CHARS = 10, 24

# The CLIP pre-tokenizer's split, less its "other punctuation" branch (see the module docstring).
_WORD = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[^\W\d_]+|\d+")


def prompt_words(text: str) -> list[str]:
    """The words of ``text`` as the toy tokenizer splits them, lower-cased, in order."""
    return _WORD.findall(unicodedata.normalize("NFC", text or "").lower())


def unknown_words(text: str, vocabulary: Iterable[str] = VOCABULARY) -> list[str]:
    """The distinct words of ``text`` that are not in ``vocabulary``, in order of first appearance."""
    known = {w.lower() for w in vocabulary}
    out: list[str] = []
    for word in prompt_words(text):
        if word not in known and word not in out:
            out.append(word)
    return out


def refusal(unknown: list[str], vocabulary: Iterable[str] = VOCABULARY) -> str:
    """One line naming the unknown words and listing what the toy model knows."""
    shown = [w if len(w) <= _MAX_WORD_CHARS else w[:_MAX_WORD_CHARS - 1] + "…" for w in unknown[:_MAX_LISTED]]
    more = f" (+{len(unknown) - _MAX_LISTED} more)" if len(unknown) > _MAX_LISTED else ""
    noun = "word" if len(unknown) == 1 else "words"
    return f"unknown {noun} for the toy model: {', '.join(shown)}{more} (it knows: {', '.join(vocabulary)})"


def _tokenizer_vocab(folder: Path) -> dict | None:
    """``tokenizer/tokenizer.json``'s vocabulary, or None when it is missing, too large or unreadable."""
    path = folder / "tokenizer" / "tokenizer.json"
    try:
        if not path.is_file() or path.stat().st_size > _MAX_TOKENIZER_BYTES:
            return None
        vocab = json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("vocab")
    except (OSError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, dict) else None


def _pipeline_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def is_toy_model(model: str | None) -> bool:
    """True for the embedded default (``None``) and for a folder that is the toy model: the shipped folder
    itself, or a Stable Diffusion pipeline folder whose tokenizer has exactly the shipped tokenizer's
    vocabulary (a copy, or a model retrained with ``diffviz train-toyworld``). Real models, hub ids and
    paths that are no folder are not restricted (the model checks report those)."""
    if model is None:
        return True
    try:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            return False
        if folder.resolve() == MODEL_DIR:
            return True
    except (OSError, ValueError, RuntimeError):
        return False
    if _pipeline_class(folder) != "StableDiffusionPipeline":
        return False
    vocab = _tokenizer_vocab(folder)
    return vocab is not None and vocab == _tokenizer_vocab(MODEL_DIR)


def check_prompt(text: str, model: str | None) -> str | None:
    """The refusal line if ``model`` is the toy model and ``text`` has words it does not know, else None."""
    unknown = unknown_words(text)
    if not unknown or not is_toy_model(model):
        return None
    return refusal(unknown)
