"""What a local input shard holds, read from its tar headers and small members only (no video bytes).

Used before a run starts: the total number of videos (progress bars and ETA), the plan of `--dry-run`
(samples, edits, prompts), and a few videos to probe for their length. `pipe:` and remote URLs cannot
be read ahead without consuming them: their index is None.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from vidbatch.core.edits import EditSpec
from vidbatch.io.input_shards import VIDEO_EXTENSIONS, parse_sample

# A member's sample key and extension as webdataset splits them: the key ends at the first dot of the
# file name (`dir/clip.control.mp4` -> `dir/clip`, `control.mp4`).
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# Members read for their content: the prompt and per-sample edits.
_SMALL_MEMBERS = ("json", "txt")


@dataclass
class IndexedSample:
    """One sample of a shard as its headers and small members tell it."""

    key: str
    video_member: str | None       # the tar member holding the video, if any
    video_bytes: int
    prompt: str | None
    edits: list[EditSpec] | None   # the sample's own edits, replacing the config's
    error: str | None              # what `parse_sample` already finds wrong (no video, bad json)


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def index_shard(url: str) -> list[IndexedSample] | None:
    """The samples of a local shard, in order; None for a `pipe:` or remote URL or an unreadable tar."""
    if not is_local(url) or not Path(url).is_file():
        return None
    raws: dict[str, dict] = {}
    members: dict[str, tuple[str, int]] = {}
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                match = _KEY_EXT.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, ext = match.groups()
                raw = raws.setdefault(key, {"__key__": key})
                if ext in _SMALL_MEMBERS:
                    handle = tar.extractfile(member)
                    raw[ext] = handle.read() if handle is not None else b""
                elif ext in VIDEO_EXTENSIONS:
                    raw[ext] = b""   # the bytes are not read; parse_sample only needs to see one
                    members.setdefault(key, (member.name, member.size))
                else:
                    raw[ext] = b""
    except (tarfile.TarError, OSError, EOFError):
        return None
    samples = []
    for key, raw in raws.items():
        parsed = parse_sample(raw)
        member, size = members.get(key, (None, 0))
        samples.append(IndexedSample(key=key, video_member=member, video_bytes=size, prompt=parsed.prompt,
                                     edits=parsed.edits, error=parsed.error))
    return samples


def read_member(url: str, name: str) -> bytes:
    """One member's bytes from a local shard."""
    with tarfile.open(url) as tar:
        handle = tar.extractfile(name)
        if handle is None:
            raise KeyError(name)
        return handle.read()
