"""What a local input shard holds, read from its tar headers and small members only (no video bytes).

Used before a run starts: the total number of videos (progress bars and ETA), the plan of `--dry-run`
(samples, edits, prompts), and a few videos to probe for their length. `pipe:` and remote URLs cannot
be read ahead without consuming them: their index is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vidbatch.core.edits import EditSpec
from vidbatch.io.input_shards import MAX_META_BYTES, VIDEO_EXTENSIONS, parse_sample, split_member_name
from vidbatch.io.tar_stream import TarFormatError, TarStream, open_decompressed

# Members read for their content: the prompt and per-sample edits (at most MAX_META_BYTES each).
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
        # The input reader's streaming tar (sizes from the headers, oversized headers skipped unread), so
        # a hostile shard costs the index no more memory than it costs the run.
        with open(url, "rb") as raw_file:
            stream, _ = open_decompressed(raw_file)
            tar = TarStream(stream)
            for member in tar.members():
                key, ext = split_member_name(member.name)
                if not member.is_file or member.error or key is None:
                    continue
                raw = raws.setdefault(key, {"__key__": key})
                if ext in _SMALL_MEMBERS and member.size <= MAX_META_BYTES:
                    raw[ext] = bytes(tar.read())
                elif ext in VIDEO_EXTENSIONS:
                    raw[ext] = b""   # the bytes are not read; parse_sample only needs to see one
                    members.setdefault(key, (member.name, member.size))
                else:
                    raw[ext] = b""
    except (TarFormatError, OSError, EOFError):
        return None
    samples = []
    for key, raw in raws.items():
        parsed = parse_sample(raw)
        member, size = members.get(key, (None, 0))
        samples.append(IndexedSample(key=key, video_member=member, video_bytes=size, prompt=parsed.prompt,
                                     edits=parsed.edits, error=parsed.error))
    return samples


def read_member(url: str, name: str, max_bytes: int | None = None) -> bytes:
    """One member's bytes from a local shard; KeyError when it has none called `name`, ValueError when it is
    over `max_bytes` (its size is read from its header first)."""
    with open(url, "rb") as raw_file:
        stream, _ = open_decompressed(raw_file)
        tar = TarStream(stream)
        for member in tar.members():
            if member.name == name and member.is_file and not member.error:
                if max_bytes is not None and member.size > max_bytes:
                    raise ValueError(f"member {name} is {member.size} bytes, over {max_bytes}")
                return bytes(tar.read())
    raise KeyError(name)
