"""`vidbatch shard`: packs a folder of videos (and their prompts) into WebDataset input shards."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import webdataset as wds

from vidbatch.core.atomic import atomic_open
from vidbatch.core.edits import EditSpec
from vidbatch.core.errors import ConfigError
from vidbatch.io.input_shards import VIDEO_EXTENSIONS


def sample_key(path: Path, used: set[str]) -> str:
    """A WebDataset key from a file name: no dots (webdataset splits keys at the first dot), unique."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "video"
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}_{n}"
    used.add(candidate)
    return candidate


def read_prompts(path: Path) -> dict[str, dict]:
    """A jsonl file of `{"file": "name.mp4", "prompt": "...", "edits": [...]}` rows, by file name."""
    prompts: dict[str, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("file"), str):
            raise ConfigError(f"{path}:{number}: each row needs a 'file' (the video's file name)")
        prompts[Path(row.pop("file")).name] = row
    return prompts


def list_videos(video_dir: str | Path) -> list[Path]:
    """The video files directly in `video_dir`, sorted by name (the order they are packed in)."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise ConfigError(f"video folder '{video_dir}' not found")
    videos = sorted(p for p in video_dir.iterdir()
                    if p.is_file() and p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS)
    if not videos:
        raise ConfigError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) in '{video_dir}'")
    return videos


def videos_missing_prompts(videos: Sequence[Path], prompts: dict[str, dict], edits: Sequence[EditSpec]) -> list[str]:
    """The names of the videos that will fail for want of a prompt: no prompt of their own, and an edit
    (theirs from the prompts file, else `edits`) that uses `{prompt}`."""
    missing = []
    for video in videos:
        row = prompts.get(video.name, {})
        own_edits = row.get("edits")
        prompts_used = [e.get("prompt", "") for e in own_edits if isinstance(e, dict)] \
            if isinstance(own_edits, list) and own_edits else [e.prompt for e in edits]
        if not row.get("prompt") and any("{prompt}" in str(p) for p in prompts_used):
            missing.append(video.name)
    return missing


def pack_shards(video_dir: str | Path, out_dir: str | Path, *, prompts_file: str | Path | None = None,
                samples_per_shard: int = 100, prefix: str = "part") -> list[Path]:
    """Writes `{prefix}-000000.tar`, ... with one sample per video (sorted by name); returns their paths."""
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    videos = list_videos(video_dir)
    prompts = read_prompts(Path(prompts_file)) if prompts_file else {}
    unknown = sorted(set(prompts) - {v.name for v in videos})
    if unknown:
        raise ConfigError(f"prompts file names videos that are not in '{video_dir}': {', '.join(unknown[:5])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    written = []
    for index, start in enumerate(range(0, len(videos), samples_per_shard)):
        final = out_dir / f"{prefix}-{index:06d}.tar"
        with atomic_open(final, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False)
            for video in videos[start:start + samples_per_shard]:
                sample = {"__key__": sample_key(video, used),
                          video.suffix.lower().lstrip("."): video.read_bytes()}
                meta = prompts.get(video.name)
                if meta is not None:
                    sample["json"] = json.dumps(meta).encode()
                writer.write(sample)
            writer.close()
        written.append(final)
    return written
