"""GenerateConfig: one set of rules for the CLI and the bridge (no torch needed)."""
from __future__ import annotations

import pytest

from capture.config import ConfigError, GenerateConfig, model_source, split_patterns


def test_defaults_match_the_issue():
    c = GenerateConfig(prompt="a red circle").validate()
    assert (c.attention_resolution, c.self_attention_resolution, c.max_dataset_mb) == (32, 16, 200.0)
    assert c.save_latents_noise and c.include_cross_attention and c.include_self_attention
    assert not (c.overwrite_output or c.enforce_size_limit or c.fail_on_shape_error)
    assert (c.device, c.model, c.height, c.width, c.dtype) == ("auto", None, None, None, None)


@pytest.mark.parametrize("changes, field", [
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": -3}, "num_steps"),
    ({"num_steps": 1001}, "num_steps"),
    ({"attention_resolution": 0}, "attention_resolution"),
    ({"attention_resolution": 257}, "attention_resolution"),
    ({"self_attention_resolution": -1}, "self_attention_resolution"),
    ({"max_layers": 0}, "max_layers"),
    ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"cfg_scale": -1.0}, "cfg_scale"),
    ({"max_dataset_mb": 0.0}, "max_dataset_mb"),
    ({"device": "tpu"}, "device"),
    ({"dtype": "int8"}, "dtype"),
    ({"height": 4100}, "height"),
    ({"height": 64, "width": 4}, "width"),
    ({"seed": -1}, "seed"),
    ({"output_dir": " "}, "output_dir"),
])
def test_validate_names_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        GenerateConfig(**{"prompt": "a red circle", **changes}).validate()
    assert err.value.field == field
    assert str(err.value).startswith(f"--{field.replace('_', '-')}:") and "\n" not in str(err.value)


def test_from_mapping_accepts_json_and_checks_types():
    c = GenerateConfig.from_mapping({"prompt": "a red circle", "num-steps": 4, "layers": "up_blocks.*, mid_block*",
                                     "cfg_scale": 5, "include_self_attention": False, "height": 32.0})
    assert c.num_steps == 4 and c.layers == ("up_blocks.*", "mid_block*") and c.cfg_scale == 5.0
    assert c.include_self_attention is False and c.height == 32
    assert GenerateConfig.from_mapping(c.to_dict()) == c


@pytest.mark.parametrize("data, field", [
    ({"prompt": "a", "nmu_steps": 4}, "nmu_steps"),
    ({"prompt": "a", "num_steps": "4"}, "num_steps"),
    ({"prompt": "a", "num_steps": 2.5}, "num_steps"),
    ({"prompt": "a", "num_steps": True}, "num_steps"),
    ({"prompt": "a", "overwrite_output": "yes"}, "overwrite_output"),
    ({"prompt": "a", "layers": [1, 2]}, "layers"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"num_steps": 3}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "attention_resolution": 0}, "attention_resolution"),
])
def test_from_mapping_errors(data, field):
    with pytest.raises(ConfigError) as err:
        GenerateConfig.from_mapping(data)
    assert err.value.field == field


def test_split_patterns():
    assert split_patterns(["a,b", " c ", ""]) == ("a", "b", "c")
    assert split_patterns("x") == ("x",)


def test_paths(tmp_path):
    assert model_source(None) == ("default", "")
    assert model_source("runwayml/stable-diffusion-v1-5") == ("hub", "runwayml/stable-diffusion-v1-5")
    assert model_source(str(tmp_path)) == ("folder", str(tmp_path))
    for bad in (str(tmp_path / "missing"), "./missing-model", "a/b/c"):
        with pytest.raises(ConfigError, match="does not exist"):
            model_source(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        model_source(str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="not a folder"):
        GenerateConfig(prompt="a", output_dir=str(tmp_path / "file")).check_paths()
    (tmp_path / "run").mkdir()
    GenerateConfig(prompt="a", output_dir=str(tmp_path / "run")).check_paths()  # empty folder: fine
    (tmp_path / "run" / "x").write_text("x")
    with pytest.raises(ConfigError, match="overwrite-output"):
        GenerateConfig(prompt="a", output_dir=str(tmp_path / "run")).check_paths()
    GenerateConfig(prompt="a", output_dir=str(tmp_path / "run"), overwrite_output=True).check_paths()
