"""`core.paths.looks_like_path`: hub ids stay hub ids, paths are paths, whatever the loader."""

from __future__ import annotations

import pytest

from vidbatch.models import loading as models
from vidbatch.metrics import clip
from vidbatch.core.paths import looks_like_path


@pytest.mark.parametrize("hub_id", [
    "openai/clip-vit-large-patch14",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "lllyasviel/sd-controlnet-canny",
    "bert-base-uncased",            # a legacy id without an organisation
    "org/model.v2_final",           # dots and underscores are allowed in hub names
])
def test_hub_ids_are_not_paths(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # nothing of that name exists here
    assert not looks_like_path(hub_id)


@pytest.mark.parametrize("path", [
    "/models/sd15", "./sd15", "../models/sd15", "~/models/sd15", ".\\models\\sd15", ".hidden",
    "models/sd/v1",                 # two slashes: no hub id has them
    "C:\\models\\sd15",             # a backslash
    "my models/sd15",               # a space
])
def test_paths_are_paths_even_when_missing(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_path(path)


def test_an_existing_folder_with_the_shape_of_a_hub_id_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("models/sd15")
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    assert looks_like_path("models/sd15")


def test_empty_text_is_not_a_path():
    assert not looks_like_path("") and not looks_like_path("  ")


def test_models_and_metrics_use_the_one_rule():
    assert not hasattr(models, "_looks_like_path") and not hasattr(clip, "_looks_like_path")  # the copies are gone
    assert clip.looks_like_path is looks_like_path
