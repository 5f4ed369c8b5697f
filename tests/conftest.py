"""Shared fixtures: hermetic caches, generated clips, shard writing, in-process CLI runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# Small and quick, but every stage real: 3 DDIM steps each way at 32 px short side.
FAST = ["edit.steps=3", "video.size=32", "runtime.log_every_s=1"]


# The test files that take longest, longest first (measured: `pytest --durations`, summed per file). With
# `make test` each parallel worker takes whole files in collection order, so these start first and none of
# them is left running alone at the end.
LONGEST_FILES = ["test_ray_worker_faults.py", "test_ray.py", "test_cli_messages.py", "test_videodirector.py",
                 "test_slurm.py", "test_methods.py", "test_ray_multinode.py", "test_vid2vid_zero.py", "test_models.py",
                 "test_editing.py", "test_pipeline.py", "test_object_storage.py", "test_long_clips.py"]


def pytest_configure(config):
    """One torch thread in every test process and in the processes the tests start (`runtime.threads: auto`
    reads OMP_NUM_THREADS): the tests' tensors are tiny, and `make test` runs several test processes on the
    machine's cores, where OpenMP threads of one process spin waiting for each other (measured on this 2-core
    machine under load: a tiny-model UNet call ~8 s with 2 threads, ~0.8 s with 1)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Model caches and node-local scratch (the inversion cache, staged weights) in a per-session folder,
    never the user's ~/.cache or the machine's shared /tmp."""
    cache = tmp_path_factory.mktemp("vidbatch-cache")
    old = {name: os.environ.get(name) for name in ("VIDBATCH_CACHE", "VIDBATCH_LOCAL_DIR")}
    os.environ["VIDBATCH_CACHE"] = str(cache)
    os.environ["VIDBATCH_LOCAL_DIR"] = str(cache / "local")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield cache
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Short generated clips in several containers: name -> path."""
    from vidbatch.testing.clips import make_test_video

    folder = tmp_path_factory.mktemp("clips")
    made = {
        "pattern": make_test_video(folder / "pattern.mp4", seconds=1, fps=8, size=(96, 64), audio=True),
        "fractal": make_test_video(folder / "fractal.webm", seconds=0.75, fps=8, size=(64, 64), source="mandelbrot"),
        "cells": make_test_video(folder / "cells.mkv", seconds=1, fps=6, size=(80, 48), source="life"),
    }
    return made


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A WebDataset tar from dicts of `__key__` and extension -> bytes/str/dict (dicts become JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False)
        for sample in samples:
            encoded = {}
            for k, v in sample.items():
                if k == "__key__":
                    encoded[k] = v
                elif isinstance(v, dict):
                    encoded[k] = json.dumps(v).encode()
                elif isinstance(v, str):
                    encoded[k] = v.encode()
                else:
                    encoded[k] = v
            writer.write(encoded)
        writer.close()
    return path


def video_sample(key: str, clip: Path, prompt: str | None = "a test clip") -> dict:
    sample = {"__key__": key, clip.suffix.lstrip("."): clip.read_bytes()}
    if prompt is not None:
        sample["txt"] = prompt
    return sample


def read_output(shard: Path) -> dict[str, dict]:
    """An output shard read back with stock webdataset: key -> members."""
    dataset = wds.WebDataset(str(shard), shardshuffle=False, nodesplitter=None, empty_check=False)
    return {s["__key__"]: s for s in dataset}


def run_cli(*args: str) -> int:
    from vidbatch.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pipe():
    """The built-in tiny pipeline, loaded once per test module."""
    from vidbatch.models.loading import load_pipeline

    return load_pipeline("tiny")


def moving_frames(count: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    """A blocky random texture sliding 2 px per frame: (count, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(0, 255, (size // 8, size // 4, 3)), np.ones((8, 8, 1)))
    return np.stack([np.roll(base, 2 * i, axis=1)[:size, :size] for i in range(count)]).astype(np.uint8)


def make_inputs(folder: Path, clip: Path, shards: int, videos: int) -> tuple[str, list[str]]:
    """`shards` input shards of `videos` samples each with unique keys; returns the brace pattern and keys."""
    keys = []
    for i in range(shards):
        names = [f"s{i}v{j}" for j in range(videos)]
        write_shard(folder / f"p{i}.tar", [video_sample(k, clip) for k in names])
        keys += names
    return str(folder / f"p{{0..{shards - 1}}}.tar"), keys


def check_exactly_once(out: Path, shards: int, keys: list[str]) -> None:
    """Every input key once in the output, each shard complete (its keys in input order) and marked done."""
    seen = []
    for i in range(shards):
        samples = read_output(out / "shards" / f"p{i}.tar")
        assert list(samples) == [k for k in keys if k.startswith(f"s{i}v")]
        assert all("watercolor.mp4" in s for s in samples.values())
        marker = json.loads((out / "stats" / f"p{i}.json").read_text())
        assert marker["samples"] == len(samples) and marker["samples_failed"] == 0
        rows = (out / "stats" / f"p{i}.jsonl").read_text().splitlines()
        assert [json.loads(r)["key"] for r in rows] == list(samples)
        seen += list(samples)
    assert sorted(seen) == sorted(keys) and len(seen) == len(set(seen))
    assert not list(out.rglob("*.tmp"))
