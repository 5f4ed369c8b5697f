"""Reading WebDataset input shards into validated samples.

A sample is `{key}.<video ext>` plus an optional `{key}.json` (`{"prompt": "...", "edits": [...]}`)
or `{key}.txt` (the prompt), an optional `{key}.control.mp4` (control frames) and an optional
`{key}.mask.mp4` (a foreground mask video, for methods that use one). Problems with one
sample are recorded on it (`error`), never raised, so the shard goes on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import webdataset as wds

from vidbatch.core.edits import EDIT_NAME_PATTERN, EditSpec

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "gif", "m4v")


@dataclass
class InputSample:
    key: str
    video: bytes | None = None
    video_ext: str | None = None
    prompt: str | None = None
    edits: list[EditSpec] | None = None      # the sample's own edits, replacing the config's
    control_video: bytes | None = None
    mask_video: bytes | None = None          # {key}.mask.mp4: white = foreground
    error: str | None = None                 # why this sample cannot be edited, if it cannot


def expand_urls(specs: str | Sequence[str]) -> list[str]:
    """Brace-expands shard specs (`data/part-{000000..000003}.tar`, `pipe:...`), keeping order, no duplicates."""
    if isinstance(specs, str):
        specs = [specs]
    urls: list[str] = []
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            if url not in urls:
                urls.append(url)
    return urls


def shard_stem(url: str) -> str:
    """The name an input shard's outputs are stored under: `data/part-000001.tar` -> `part-000001`.

    For a `pipe:` URL the last word that looks like a tar file names it; failing that, a hash of the URL.
    """
    candidates = url[len("pipe:"):].split() if url.startswith("pipe:") else [url]
    for word in reversed(candidates):
        name = Path(word.rstrip("/")).name
        match = re.match(r"^(.+?)\.tar(\.\w+)?$", name)
        if match:
            return re.sub(r"[^A-Za-z0-9_.-]", "_", match.group(1))
    return "shard-" + hashlib.sha256(url.encode()).hexdigest()[:12]


def check_local_urls(urls: Sequence[str]) -> list[str]:
    """The local shard paths among `urls` that do not exist (pipe: and remote URLs are not checked)."""
    missing = []
    for url in urls:
        if url.startswith("pipe:") or "://" in url:
            continue
        if not Path(url).is_file():
            missing.append(url)
    return missing


EDIT_KEYS = {"name", "prompt", "method", "control", "set"}


def _parse_edits(value: object) -> list[EditSpec]:
    if not isinstance(value, list) or not value:
        raise ValueError("'edits' must be a non-empty list of {name, prompt}")
    edits = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - EDIT_KEYS or "name" not in item or "prompt" not in item:
            raise ValueError(f"edits[{i}] must be a mapping with the keys name and prompt, and optionally "
                             "method, control and set")
        name, prompt = item["name"], item["prompt"]
        if not isinstance(name, str) or not EDIT_NAME_PATTERN.match(name):
            raise ValueError(f"edits[{i}].name must be letters, digits, _ or -, got {name!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"edits[{i}].prompt must be a non-empty string")
        for key in ("method", "control"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise ValueError(f"edits[{i}].{key} must be a string, got {item[key]!r}")
        overrides = item.get("set", {})
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise ValueError(f"edits[{i}].set must be a mapping of dotted config keys to values")
        # The values are checked against the config when the edit is resolved (a failed row names them).
        edits.append(EditSpec(name=name, prompt=prompt, method=item.get("method"), control=item.get("control"),
                              set=overrides))
    if len({e.name for e in edits}) != len(edits):
        raise ValueError("edit names must be unique")
    return edits


def parse_sample(raw: dict) -> InputSample:
    """One WebDataset sample dict (`__key__` and extension -> bytes) as an InputSample."""
    sample = InputSample(key=str(raw.get("__key__")))
    videos = [ext for ext in VIDEO_EXTENSIONS if ext in raw]
    if videos:
        sample.video_ext = videos[0]
        sample.video = raw[videos[0]]
    sample.control_video = raw.get("control.mp4")
    sample.mask_video = raw.get("mask.mp4")
    try:
        if "json" in raw:
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict):
                raise ValueError("must be a JSON object")
            prompt = meta.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError("'prompt' must be a string")
            sample.prompt = prompt
            if "edits" in meta:
                sample.edits = _parse_edits(meta["edits"])
        elif "txt" in raw:
            sample.prompt = raw["txt"].decode("utf-8").strip()
    except (ValueError, UnicodeDecodeError) as exc:
        member = "json" if "json" in raw else "txt"
        sample.error = f"bad {sample.key}.{member}: {exc}"
        return sample
    if sample.video is None:
        present = sorted(k for k in raw if not k.startswith("__"))
        sample.error = (f"no video in sample (members: {', '.join(present) or 'none'}; "
                        f"expected one of .{', .'.join(VIDEO_EXTENSIONS)})")
    return sample


def read_samples(url: str) -> Iterator[InputSample]:
    """The samples of one shard, in order, read with stock webdataset (path or `pipe:` URL)."""
    dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for raw in dataset:
        yield parse_sample(raw)
