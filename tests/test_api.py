"""The Python API as the README shows it, the thread setting, and the checks made before a model loads."""

from __future__ import annotations

import io
import logging
import os

import pytest
import torch
from rich.console import Console

from conftest import FAST, TINY, read_output, video_sample, write_shard


def test_the_readme_example_runs_and_writes_run_log(tmp_path, clips):
    from vidbatch import load_config, run

    write_shard(tmp_path / "data" / "part-000000.tar", [video_sample("a", clips["cells"])])
    threads_before = torch.get_num_threads()
    try:
        config = load_config(TINY, [*FAST, "runtime.threads=1"])
        code = run(config, [str(tmp_path / "data" / "part-{000000..000000}.tar")], tmp_path / "out",
                   console=Console(file=io.StringIO()))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads_before)
    assert code == 0
    assert list(read_output(tmp_path / "out" / "shards" / "part-000000.tar")) == ["a"]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "shard part-000000 done" in log and "progress: shards 1/1 done" in log
    # The handler the API added for this run is gone again: a later run elsewhere does not write here.
    # (Only this run's file is checked: an in-process CLI test run earlier in this process keeps its own
    # run.log handler until the next CLI call replaces it.)
    assert not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(tmp_path / "out" / "run.log")
                   for h in logging.getLogger("vidbatch").handlers)


def test_an_api_error_is_raised_with_one_line_and_logged(tmp_path, clips):
    from vidbatch import load_config, run
    from vidbatch.core.errors import UsageError

    with pytest.raises(UsageError, match="is a video file") as raised:
        run(load_config(TINY, FAST), [str(clips["pattern"])], tmp_path / "out", console=Console(file=io.StringIO()))
    assert "\n" not in str(raised.value)
    assert f"usage error: {raised.value}" in (tmp_path / "out" / "run.log").read_text()


def test_auto_threads_are_the_cpus_given_to_the_process_divided_among_workers(monkeypatch):
    from vidbatch.config.schema import load_config
    from vidbatch.dispatch.preflight import resolve_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    auto = load_config(None)
    assert auto.runtime.threads == "auto"
    assert resolve_threads(auto) == 6
    assert resolve_threads(auto, local_workers=4) == 1
    assert resolve_threads(auto, local_workers=10) == 1
    assert resolve_threads(load_config(TINY, ["runtime.threads=3"]), local_workers=4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")   # the user's own limit wins over the CPU count
    assert resolve_threads(auto) == 2


def test_a_hub_id_offline_and_not_cached_fails_before_loading(tmp_path, monkeypatch):
    from vidbatch.core.errors import ModelLoadError
    from vidbatch.models.availability import check_model_available

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError, match=r"hf download org/model") as raised:
        check_model_available("org/model", offline=True)
    assert "huggingface-cli" not in str(raised.value)
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        check_model_available(str(tmp_path / "missing-model"), offline=True)
    check_model_available("tiny", offline=True)
    (tmp_path / "folder").mkdir()
    check_model_available(str(tmp_path / "folder"), offline=True)   # what is inside is the loader's question


def test_the_cpu_warning_names_the_plan(monkeypatch):
    from vidbatch.config.schema import load_config
    from vidbatch.dispatch import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    warning = preflight.cpu_warning(load_config(None, ["model.id=org/sd"]), threads=1)
    assert "no GPU" in warning and "'org/sd'" in warning and "512 px" in warning and "configs/tiny.yaml" in warning
    assert preflight.cpu_warning(load_config(TINY), threads=1) is None
