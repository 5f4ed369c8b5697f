"""Shared fixtures: hermetic caches, generated clips, shard writing, in-process CLI runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
# Small and quick, but every stage real: 3 DDIM steps each way at 32 px short side.
FAST = ["edit.steps=3", "video.size=32", "runtime.log_every_s=1"]


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Model and inversion caches in a per-session folder, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("vidbatch-cache")
    old = os.environ.get("VIDBATCH_CACHE")
    os.environ["VIDBATCH_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield cache
    if old is None:
        os.environ.pop("VIDBATCH_CACHE", None)
    else:
        os.environ["VIDBATCH_CACHE"] = old


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Short generated clips in several containers: name -> path."""
    from vidbatch.video_io import make_test_video

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
