"""Config schema: presets load, overrides apply, every bad key or value is an error naming the key."""

from pathlib import Path

import pytest
import yaml

from vidbatch.config.schema import Config, load_config, save_config
from vidbatch.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", ["default.yaml", "tiny.yaml"])
def test_presets_load(preset):
    config = load_config(CONFIGS / preset)
    assert isinstance(config, Config)
    assert config.edits and config.edit.steps >= 1


def test_default_preset_names_sd15_and_tiny_names_tiny():
    assert "stable-diffusion-v1-5" in load_config(CONFIGS / "default.yaml").model.id
    assert load_config(CONFIGS / "tiny.yaml").model.id == "tiny"


def test_overrides_use_dotted_keys_and_yaml_values():
    config = load_config(CONFIGS / "tiny.yaml", ["edit.steps=20", "video.max_frames=null", "merge.chunk_size=auto",
                                                  "merge.global_merge=false", "edit.guidance=3",
                                                  'edits=[{"name": "a", "prompt": "x"}]'])
    assert config.edit.steps == 20
    assert config.video.max_frames is None
    assert config.merge.chunk_size == "auto"
    assert config.merge.global_merge is False
    assert config.edit.guidance == 3.0 and isinstance(config.edit.guidance, float)
    assert [(e.name, e.prompt) for e in config.edits] == [("a", "x")]


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["edit.stpes=3"])
    message = str(err.value)
    assert "'edit.stpes'" in message
    for valid in ("method", "steps", "guidance", "seed"):
        assert valid in message


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="'modle'"):
        load_config(None, ["modle.id=x"])


@pytest.mark.parametrize("override, words", [
    ("edit.steps=abc", ["'edit.steps'", "integer"]),
    ("edit.steps=0", ["'edit.steps'", ">= 1"]),
    ("edit.method=magic", ["'edit.method'", "'per-frame'", "'vidtome'"]),
    ("merge.local_ratio=1.5", ["'merge.local_ratio'", "<= 1"]),
    ("merge.chunk_size=big", ["'merge.chunk_size'", "'auto'"]),
    ("model.dtype=int8", ["'model.dtype'", "'float16'"]),
    ('edits=[{"name": "a.b", "prompt": "x"}]', ["'edits[0].name'"]),
    ('edits=[{"name": "a", "prompt": "x"}, {"name": "a", "prompt": "y"}]', ["used twice"]),
    ("edits=[]", ["'edits'"]),
    ('model.loras=[{"path": "x.safetensors", "scale": "high"}]', ["'model.loras[0].scale'"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["edit.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")


def test_saved_config_round_trips(tmp_path):
    config = load_config(CONFIGS / "tiny.yaml", ["edit.seed=7"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert again.digest() == config.digest()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["edit"]["seed"] == 7
    assert load_config(None, ["edit.seed=8"]).digest() != load_config(None, ["edit.seed=7"]).digest()
