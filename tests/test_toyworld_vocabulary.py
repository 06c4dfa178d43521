"""The toy model's vocabulary: which prompt words it knows, how a toy-model folder is recognised, and that
the grammar, the shipped tokenizer and the refusal agree."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from capture.config import ConfigError, GenerateConfig
from capture.toyworld import vocabulary, world
from capture.toyworld.vocabulary import MODEL_DIR, is_toy_model, refusal, unknown_words


def test_unknown_words_word_level_case_and_punctuation():
    assert unknown_words("a purple dog") == ["purple", "dog"]
    assert unknown_words("a red circle") == []
    assert unknown_words("A RED Circle, and a blue square!") == []
    assert unknown_words("a red-circle on the left.") == []
    # repeated unknown words are named once, in order; contraction pieces are words as the tokenizer sees them
    assert unknown_words("Dog, dog and a PURPLE dog") == ["dog", "purple"]
    assert unknown_words("the red's circle") == ["'s"]
    assert unknown_words("3 red circles") == ["3", "circles"]
    assert unknown_words("") == [] and unknown_words(" ,.;! ") == []


def test_refusal_is_one_line_naming_the_words_and_the_vocabulary():
    line = refusal(["purple", "dog"])
    assert line.startswith("unknown words for the toy model: purple, dog (it knows: a, and, on, the, ")
    assert "\n" not in line and all(w in line for w in world.VOCABULARY)
    assert refusal(["dog"]).startswith("unknown word for the toy model: dog (")
    many = refusal([f"w{i}" for i in range(15)] + ["x" * 300])
    assert "w9" in many and "w10" not in many and "(+6 more)" in many and "x" * 30 not in many


def test_the_grammar_the_tokenizer_and_the_vocabulary_agree():
    # every word a caption can have is in the vocabulary, and every vocabulary word is used
    rng = np.random.default_rng(0)
    batch = world.make_batch(rng, 400, p_size=0.5, p_side=0.5)
    used = {w for words in batch.words for w in words}
    assert used == set(world.VOCABULARY)
    assert all(unknown_words(c) == [] for c in batch.captions)
    # the shipped tokenizer has one whole-word token per vocabulary word, numbered in vocabulary order
    vocab = json.loads((MODEL_DIR / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    ids = [vocab[w + "</w>"] for w in world.VOCABULARY]
    assert ids == sorted(ids)
    longer = {t[:-4] for t in vocab if t.endswith("</w>") and len(t) > 5}  # words of 2+ letters
    assert longer == {w for w in world.VOCABULARY if len(w) > 1}


def test_which_model_is_the_toy_model(tmp_path: Path):
    from capture.families import DEFAULT_MODEL_DIR

    assert MODEL_DIR == DEFAULT_MODEL_DIR.resolve()
    assert is_toy_model(None) and is_toy_model(str(MODEL_DIR))
    # a copy (only the small files: the check reads no weights)
    copy = tmp_path / "copy"
    shutil.copytree(MODEL_DIR / "tokenizer", copy / "tokenizer")
    shutil.copy(MODEL_DIR / "model_index.json", copy / "model_index.json")
    assert is_toy_model(str(copy))
    # another pipeline class, another tokenizer, no tokenizer, a hub id, a missing path: not restricted
    sdxl = tmp_path / "sdxl"
    shutil.copytree(copy, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    assert not is_toy_model(str(sdxl))
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["purple</w>"] = len(tok["model"]["vocab"])
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    assert not is_toy_model(str(other))
    shutil.rmtree(other / "tokenizer")
    assert not is_toy_model(str(other))
    assert not is_toy_model("someone/some-model") and not is_toy_model(str(tmp_path / "missing"))


def test_config_refuses_unknown_words_for_the_toy_model_only(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        GenerateConfig(prompt="a purple dog").check_words()
    assert info.value.field == "prompt"
    assert str(info.value).startswith("--prompt: unknown words for the toy model: purple, dog (it knows: a, and")
    with pytest.raises(ConfigError) as info:
        GenerateConfig(prompt="a red circle", negative_prompt="blurry").check_words()
    assert info.value.field == "negative_prompt" and "--negative-prompt: unknown word" in str(info.value)
    assert GenerateConfig(prompt="A red circle, and a blue square.").check_words().prompt
    # a real model folder is not restricted
    real = tmp_path / "real"
    real.mkdir()
    (real / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert GenerateConfig(prompt="a purple dog", model=str(real)).check_words().model == str(real)
    assert vocabulary.check_prompt("a purple dog", str(real)) is None
