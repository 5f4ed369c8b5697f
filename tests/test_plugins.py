"""A method and a control defined here alone, registered through the registries only, work everywhere:
config choices and sections, `--set`, the engine, the real pipeline end to end, bench's method list."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
import yaml
from rich.console import Console

from conftest import FAST, TINY, make_inputs, read_output
from vidbatch.config.schema import load_config
from vidbatch.core.errors import ConfigError
from vidbatch.core.settings import setting
from vidbatch.api import run
from vidbatch.engine.control import Control
from vidbatch.engine.editor import EditorSettings, VideoEditor
from vidbatch.engine.methods.per_frame import PerFrame
from vidbatch.engine.plugins import control_names, method_names, resolve_control
from vidbatch.engine.registry import CONTROLS, METHODS, register_control, register_method
from vidbatch.tools.bench.main import default_methods


@dataclass
class ReverseConfig:
    """The toy method's section."""

    reverse: bool = setting(True, help="edit the frames in reverse order (the output comes out reversed)")


class ReverseFrames(PerFrame):
    """Per-frame editing of the frames in reverse order: a method in a dozen lines."""

    name = "reverse-frames"
    section = "reverse_frames"
    settings_type = ReverseConfig
    default_control = "none"
    inverted: list[tuple[int, bool]] = []   # (frames, reverse) of every inversion, for the test to see

    def invert(self, editor, frames: np.ndarray, prompt: str):
        ReverseFrames.inverted.append((len(frames), self.config.reverse))
        return editor.invert(np.ascontiguousarray(frames[::-1]) if self.config.reverse else frames, prompt)

    def inversion_parts(self) -> dict:
        return {"reverse_frames": self.config.reverse}   # a reversed inversion is another cache entry


@dataclass
class ToyControlConfig:
    weight: float = setting(0.5, minimum=0, maximum=1, help="how hard the toy control pulls")


class ToyControl(Control):
    name = "toy"
    section = "toy_control"
    settings_type = ToyControlConfig


@pytest.fixture
def plugins():
    register_method(ReverseFrames)
    register_control(ToyControl)
    ReverseFrames.inverted.clear()
    yield
    METHODS.unregister(ReverseFrames.name)
    CONTROLS.unregister(ToyControl.name)


def test_a_registered_method_gets_its_choice_its_section_and_overrides(plugins):
    assert method_names()[-1] == "reverse-frames" and "reverse-frames" in default_methods()
    config = load_config(TINY, ["edit.method=reverse-frames", "reverse_frames.reverse=false"])
    assert config.reverse_frames.reverse is False and config.to_dict()["reverse_frames"] == {"reverse": False}
    assert resolve_control(config.edit.method, config.edit.control) == frozenset()   # its default_control
    with pytest.raises(ConfigError, match="valid keys in 'reverse_frames': reverse"):
        load_config(TINY, ["reverse_frames.bogus=1"])
    with pytest.raises(ConfigError, match="'reverse_frames.reverse' must be true or false"):
        load_config(TINY, ["reverse_frames.reverse=3"])


def test_unregistered_it_is_gone_again():
    assert "reverse-frames" not in method_names()
    with pytest.raises(ConfigError, match="edit.method' must be one of .*'videodirector', got 'reverse-frames'"):
        load_config(TINY, ["edit.method=reverse-frames"])
    assert "reverse_frames" not in load_config(TINY, []).to_dict()


def test_a_registered_method_runs_end_to_end(plugins, tmp_path, clips):
    inputs, keys = make_inputs(tmp_path / "in", clips["pattern"], shards=1, videos=2)
    out = tmp_path / "out"
    config = load_config(TINY, [*FAST, "edit.method=reverse-frames", "reverse_frames.reverse=true",
                                "runtime.backend=local", "video.max_frames=4", "inversion.cache=false",
                                "edits=[{name: rev, prompt: 'a painting'}]"])
    assert run(config, [inputs], out, console=Console(file=io.StringIO())) == 0
    assert ReverseFrames.inverted == [(4, True), (4, True)]   # its hook ran, with the setting given
    samples = read_output(out / "shards" / "p0.tar")
    assert list(samples) == keys and all("rev.mp4" in s for s in samples.values())
    rows = [json.loads(line) for line in (out / "stats" / "p0.jsonl").read_text().splitlines()]
    assert [(r["key"], r["edit"], r["status"]) for r in rows] == [(k, "rev", "ok") for k in keys]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["edit"]["method"] == "reverse-frames" and saved["reverse_frames"] == {"reverse": True}


def test_the_reversed_edit_is_the_per_frame_edit_reversed(plugins, pipe):
    """Per-frame editing edits each frame alone, so editing the reversed video reverses the edit."""
    from conftest import moving_frames

    frames = moving_frames(4)
    base = dict(steps=2, chunk_size=4, control="none")
    plain = VideoEditor(pipe, EditorSettings(method="per-frame", **base)).edit(frames, "s", [("e", "x")], seed=0, key="k")
    reverse = VideoEditor(pipe, EditorSettings(method="reverse-frames", **base)).edit(frames, "s", [("e", "x")],
                                                                                      seed=0, key="k")
    assert np.array_equal(reverse.frames["e"], plain.frames["e"][::-1])
    kept = VideoEditor(pipe, EditorSettings(method="reverse-frames", method_settings=ReverseConfig(reverse=False),
                                            **base)).edit(frames, "s", [("e", "x")], seed=0, key="k")
    assert np.array_equal(kept.frames["e"], plain.frames["e"])


def test_a_registered_control_gets_its_name_and_section(plugins, pipe):
    assert control_names()[-1] == "toy"
    config = load_config(TINY, ["edit.control=pnp+toy", "toy_control.weight=0.25"])
    assert config.toy_control.weight == 0.25
    assert resolve_control(config.edit.method, config.edit.control) == {"pnp", "toy"}
    with pytest.raises(ConfigError, match="toy_control.weight' must be <= 1"):
        load_config(TINY, ["toy_control.weight=2"])
    with pytest.raises(ConfigError, match="one of none, pnp, sdedit, controlnet, toy or several"):
        load_config(TINY, ["edit.control=pnp+nothing"])
    assert VideoEditor(pipe, EditorSettings(method="vidtome", control="toy+pnp")).controls == {"pnp", "toy"}
