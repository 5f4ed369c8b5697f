"""The smaller commands: shard, make-tiny-model, demo; and pipe: inputs."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard


def test_shard_packs_a_folder_with_prompts(tmp_path, clips):
    videos = tmp_path / "videos"
    videos.mkdir()
    for clip in clips.values():
        shutil.copy(clip, videos / clip.name)
    shutil.copy(clips["pattern"], videos / "with.dots.mp4")
    (videos / "notes.txt").write_text("not a video")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"file": "pattern.mp4", "prompt": "a pattern",
                                   "edits": [{"name": "x", "prompt": "y"}]}) + "\n")
    assert run_cli("shard", videos, "--output", tmp_path / "shards", "--prompts", prompts,
                   "--samples-per-shard", "3") == 0
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["part-000000.tar", "part-000001.tar"]
    samples = {**read_output(shards[0]), **read_output(shards[1])}
    assert sorted(samples) == ["cells", "fractal", "pattern", "with_dots"]
    assert json.loads(samples["pattern"]["json"]) == {"prompt": "a pattern", "edits": [{"name": "x", "prompt": "y"}]}
    assert samples["cells"]["mkv"] == clips["cells"].read_bytes()
    assert "json" not in samples["cells"]


def test_shard_rejects_prompts_for_unknown_files(tmp_path, clips, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(clips["pattern"], videos / "pattern.mp4")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"file": "missing.mp4", "prompt": "p"}) + "\n")
    assert run_cli("shard", videos, "--output", tmp_path / "out", "--prompts", prompts) == 2
    assert "missing.mp4" in capsys.readouterr().out


def test_make_tiny_model_loads_offline_with_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert run_cli("make-tiny-model", tmp_path / "tiny") == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert len(pipe.tokenizer("a cat").input_ids) >= 3


def test_pipe_url_input(tmp_path, clips):
    write_shard(tmp_path / "in" / "piped-000003.tar", [video_sample("pattern", clips["pattern"])])
    url = f"pipe:cat {tmp_path / 'in' / 'piped-000003.tar'}"
    assert run_cli("run", TINY, "--input", url, "--output", tmp_path / "out",
                   *sum((["--set", s] for s in FAST), [])) == 0
    assert list(read_output(tmp_path / "out" / "shards" / "piped-000003.tar")) == ["pattern"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    # No timeout of its own (the suite's 600 s guards against a hang): on a loaded machine the demo's time
    # says nothing about its correctness. One thread: the tiny model's ops gain nothing from more.
    assert run_cli("demo", "--output", tmp_path / "demo", "--set", "edit.steps=2", "--set", "video.size=32",
                   "--set", "runtime.threads=1") == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["shards"] == {"total": 2, "done": 2, "failed": 0, "failed_shards": {}}
    assert summary["samples"]["ok"] == 4 and summary["edits"]["ok"] == 8
    assert "summary.json" in capsys.readouterr().out
