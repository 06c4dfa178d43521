"""Which words of a prompt the toy model knows: the toy world's caption grammar, and nothing else.

The toy model's tokenizer has one token per grammar word (``world.VOCABULARY``). Any other word is
split into character pieces the model never saw together (``purple`` -> ``u, r, <end>, l, e``), so the
CLI, the bridge and the dashboard refuse such a prompt for the toy model instead of running it.

Words are found the way the tokenizer's pre-tokenizer finds them (``export.words.prompt_words``, shared with the
dashboard's generator tab): lower-cased runs of letters, numbers, and the contraction pieces (``'s``, ``'t`` …).

Torch-free (numpy through ``world`` only), so the check runs before any heavy import.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from capture.config import NAMED_MODELS
from capture.toyworld.world import VOCABULARY
from export import words as _words

#: The shipped toy model (``capture.families.DEFAULT_MODEL_DIR`` is the same folder).
MODEL_DIR = Path(__file__).resolve().parent / "model"
#: The toy tokenizer's file is about 6 KB; a larger one belongs to some other model and is not read.
_MAX_TOKENIZER_BYTES = 256 * 1024
def unknown_words(text: str, vocabulary: Iterable[str] = VOCABULARY) -> list[str]:
    """The distinct words of ``text`` the toy model does not know, in order of first appearance."""
    return _words.unknown_words(text, vocabulary)


def refusal(unknown: list[str], vocabulary: Iterable[str] = VOCABULARY) -> str:
    """One line naming the unknown words and listing what the toy model knows."""
    return _words.refusal(unknown, vocabulary)


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
    if model is None or model in NAMED_MODELS:  # the shipped models, UNet and MM-DiT, share one vocabulary
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
