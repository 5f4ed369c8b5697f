"""What a new user sees: each ordinary mistake ends in one line naming the cause and the fix (exit 2, and
the same line in OUT/run.log); Ctrl-C and SIGTERM end in one "interrupted" line (130 / 143) on both
backends; no third-party noise; the CLI conventions (--version, --dry-run, --limit, config show|validate,
help for every argument). Through the real `vidbatch` command in a subprocess, so what is checked is
everything the user would see.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import FAST, TINY, read_output, video_sample, write_shard

SETS = sum((["--set", s] for s in FAST), [])
# Third-party lines that must not reach a vidbatch console.
NOISE = ("GPU available", "TPU available", "litlogger", "torchvision", "Token authentication", "Traceback",
         "Started a local Ray instance")


def cli(*args: object, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m vidbatch.cli ARGS`, stdout and stderr together, as a user's terminal would show them."""
    return subprocess.run([sys.executable, "-m", "vidbatch.cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit `code`, exactly one line of output holding every word, no traceback, no advice to rerun."""
    out = lines(result.stdout)
    assert result.returncode == code, result.stdout
    assert len(out) == 1, result.stdout
    for word in words:
        assert word in out[0], out[0]
    assert "Traceback" not in out[0] and "rerun" not in out[0]
    return out[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, clips) -> Path:
    """Two input shards of one short clip each, with prompts."""
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "p0.tar", [video_sample("a0", clips["cells"])])
    write_shard(folder / "p1.tar", [video_sample("b0", clips["cells"])])
    return folder


# -- usage, input and model mistakes ---------------------------------------------------------------------


def test_a_video_given_as_input_is_one_line_before_any_model_loads(tmp_path, clips):
    result = cli("run", TINY, "--input", clips["pattern"], "--output", tmp_path / "out", *SETS)
    line = assert_one_line(result, 2, "usage error", "is a video file", "vidbatch shard")
    assert line in (tmp_path / "out" / "run.log").read_text()
    assert not (tmp_path / "out" / "shards").exists()   # stopped before any shard started


def test_a_folder_given_as_input_points_to_vidbatch_shard(tmp_path, clips):
    result = cli("run", TINY, "--input", clips["pattern"].parent, "--output", tmp_path / "out", *SETS)
    line = assert_one_line(result, 2, "is a folder", f"vidbatch shard {clips['pattern'].parent}")
    assert "not found" not in line
    assert line in (tmp_path / "out" / "run.log").read_text()


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path, shards, where):
    (tmp_path / "taken").write_text("not a folder")
    output = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "out"
    assert_one_line(cli("run", TINY, "--input", shards / "p0.tar", "--output", output, *SETS), 2,
                    "usage error", "is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_a_hub_model_that_is_not_here_names_hf_download(tmp_path, shards):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = cli("run", TINY, "--input", shards / "p0.tar", "--output", tmp_path / "out",
                 "--set", "model.id=someone/not-downloaded", *SETS, env=env)
    line = assert_one_line(result, 2, "model error", "someone/not-downloaded", "hf download someone/not-downloaded")
    assert "huggingface-cli" not in line
    assert line in (tmp_path / "out" / "run.log").read_text()


def test_a_config_typo_suggests_the_key(tmp_path, shards):
    result = cli("run", TINY, "--input", shards / "p0.tar", "--output", tmp_path / "out", "--set", "edit.stepz=3")
    line = assert_one_line(result, 2, "config error", "edit.stepz", "did you mean 'edit.steps'?")
    assert line in (tmp_path / "out" / "run.log").read_text()


def test_cache_prune_without_max_gb_is_a_usage_message(tmp_path):
    assert_one_line(cli("cache", "prune", "--dir", tmp_path / "cache"), 2, "usage error", "--max-gb")


# -- stopping a run ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,signum", [("local", signal.SIGINT), ("local", signal.SIGTERM),
                                            ("ray", signal.SIGINT), ("ray", signal.SIGTERM)])
def test_a_stopped_run_says_how_far_it_got_in_one_line(tmp_path, shards, backend, signum):
    """The signal comes once the first of two shards is done; the second's work is abandoned cleanly."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vidbatch.cli", "run", str(TINY), "--input", str(shards / "p{0,1}.tar"),
         "--output", str(out), *SETS, "--set", f"runtime.backend={backend}", "--set", "video.max_frames=4",
         "--set", "inversion.cache=false", "--set", "runtime.log_every_s=1000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first = out / "stats" / "p0.json"
    while not first.exists() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signum)
    text, _ = process.communicate()
    assert process.returncode == 128 + signum, text
    done = 2 if (out / "stats" / "p1.json").exists() else 1   # the second shard may finish first
    expected = f"interrupted: {done} of 2 shards done; rerun the same command to resume"
    assert lines(text)[-1] == expected, text
    assert not any(noise in text for noise in NOISE), text
    assert expected in (out / "run.log").read_text()
    for tar in (out / "shards").glob("*.tar"):   # a file under its final name is complete
        if backend == "local":   # the commit holds the signals: its files and marker appear together
            assert (out / "stats" / f"{tar.stem}.json").exists()
        else:   # Ray SIGKILLs its workers, maybe between the renames and the marker: whole, but not done
            with tarfile.open(tar) as archive:
                assert archive.getmembers()
    if backend == "local":   # the shard in progress removed its temporaries; Ray SIGKILLs its workers
        assert not list(out.rglob("*.tmp"))     # (a rerun removes theirs, see test_ray.py)


# -- the run's output: quiet, progress every log_every_s, --limit ------------------------------------------


def test_limit_runs_the_first_shards_quietly_with_status_lines_and_a_rerun_does_the_rest(tmp_path, shards):
    out = tmp_path / "out"
    args = ["run", TINY, "--input", shards / "p{0,1}.tar", "--output", out, *SETS,
            "--set", "runtime.log_every_s=0.1", "--set", "runtime.threads=1", "--set", "inversion.cache=false"]
    first = cli(*args, "--limit", "1")
    assert first.returncode == 0, first.stdout
    assert not any(noise in first.stdout for noise in NOISE), first.stdout
    assert "--limit 1: running 1 of the 2 shard(s) still to do" in first.stdout
    assert (out / "stats" / "p0.json").exists() and not (out / "stats" / "p1.json").exists()
    log = (out / "run.log").read_text()
    status = [l for l in log.splitlines() if "progress: shards" in l]
    # Without a terminal: a line every log_every_s, with the known total of videos and the step in the video.
    assert len(status) >= 2, log
    assert any(re.search(r"videos 0/1 .*now a0: (invert|edit watercolor) \d+/3;", l) for l in status), status
    assert "1 torch thread(s)" in log
    second = cli(*args)
    assert second.returncode == 0, second.stdout
    assert list(read_output(out / "shards" / "p1.tar")) == ["b0"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, clips):
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("a", clips["pattern"]), video_sample("b", clips["cells"])])
    write_shard(tmp_path / "in" / "p1.tar", [video_sample("c", clips["pattern"], prompt=None),
                                            {"__key__": "d", "json": {"prompt": "x", "edits": [
                                                {"name": "one", "prompt": "a"}, {"name": "two", "prompt": "b"}]},
                                             "mp4": clips["pattern"].read_bytes()}])
    result = cli("run", TINY, "--input", tmp_path / "in" / "p{0,1}.tar", "--output", tmp_path / "out",
                 "--dry-run", "--set", "video.max_frames=5")
    assert result.returncode == 0, result.stdout
    text = result.stdout
    assert "shards: 2 (2 to do, 0 already done)" in text
    assert "samples: 4 " in text
    assert "edits: 5 " in text                        # 3 samples x 1 config edit + 2 of the sample's own
    assert "1 sample(s) have no prompt but an edit uses {prompt}" in text
    assert "about 5 per video" in text                # every clip has more than video.max_frames frames
    assert "estimated GPU-hours: " in text and "TFLOP" in text
    assert not (tmp_path / "out").exists()


# -- the CLI's conventions ---------------------------------------------------------------------------------


def test_every_argument_of_every_command_has_help():
    from vidbatch.cli import build_parser

    def walk(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from walk(sub, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                yield name, action

    missing = [f"{name} {action.dest}" for name, action in walk(build_parser(), "vidbatch")
               if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []


def test_version():
    from vidbatch import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vidbatch {__version__}"


def test_config_show_prints_the_resolved_config_and_validate_checks_it():
    shown = cli("config", "show", TINY, "--set", "edit.steps=7")
    assert shown.returncode == 0, shown.stdout
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["edit"]["steps"] == 7 and resolved["runtime"]["threads"] == 1
    assert resolved["model"]["id"] == "tiny"
    defaults = cli("config", "show")
    assert yaml.safe_load(defaults.stdout)["runtime"]["threads"] == "auto"
    assert_one_line(cli("config", "validate", TINY), 0, "ok")
    assert_one_line(cli("config", "validate", TINY, "--set", "runtime.backend=rey"), 2,
                    "runtime.backend", "did you mean 'ray'?")


def test_shard_warns_about_videos_an_edit_needs_a_prompt_for(tmp_path, clips):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("one.mp4", "two.mp4"):
        (videos / name).write_bytes(clips["pattern"].read_bytes())
    (tmp_path / "prompts.jsonl").write_text('{"file": "one.mp4", "prompt": "a test pattern"}\n')
    result = cli("shard", videos, "--output", tmp_path / "shards", "--prompts", tmp_path / "prompts.jsonl")
    assert result.returncode == 0, result.stdout
    assert "1 video(s) have no prompt" in result.stdout and "two.mp4" in result.stdout
    assert "one.mp4" not in result.stdout
    (tmp_path / "prompts.jsonl").write_text('{"file": "one.mp4", "prompt": "a"}\n{"file": "two.mp4", "prompt": "b"}\n')
    quiet = cli("shard", videos, "--output", tmp_path / "shards2", "--prompts", tmp_path / "prompts.jsonl")
    assert "no prompt" not in quiet.stdout
