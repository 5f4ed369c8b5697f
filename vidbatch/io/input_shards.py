"""Reading WebDataset input shards into validated samples.

A sample is `{key}.<video ext>` plus an optional `{key}.json` (`{"prompt": "...", "edits": [...]}`)
or `{key}.txt` (the prompt), an optional `{key}.control.mp4` (control frames) and an optional
`{key}.mask.mp4` (a foreground mask video, for methods that use one). Problems with one
sample are recorded on it (`error`), never raised, so the shard goes on: a member over its size limit
(checked from the tar header, before its bytes are read), a json that does not parse (bad encoding,
nesting too deep), a member or key that appears twice.

Members are grouped into samples as WebDataset does (consecutive members sharing the part of the
name before the basename's first dot), but read with `io.tar_stream`, so a member's bytes are read
only when it is one the sample needs and within its limit.

A work item (`runtime.samples_per_task`) is a `SampleRange` of a shard: samples are numbered by that
grouping, in tar order, from 0; `count_samples` counts them from the headers alone, and `read_samples`
with a range skips the members of the samples outside it unread and stops after its last one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Container, Iterator, Sequence

import braceexpand
from webdataset.gopen import gopen

from vidbatch.core.edits import EDIT_NAME_PATTERN, EditSpec
from vidbatch.core.paths import WEB_SCHEMES, is_url, local_path, url_scheme
from vidbatch.io.object_store import open_input
from vidbatch.io.tar_stream import TarMember, TarStream, open_decompressed

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi", "gif", "m4v")
META_EXTENSIONS = ("json", "txt")
CONTROL_EXTENSION = "control.mp4"
MASK_EXTENSION = "mask.mp4"
# A sample's json or txt is a prompt and a few edits; anything larger is not one.
MAX_META_BYTES = 16 * 2**20


@dataclass(frozen=True)
class InputLimits:
    """Size limits on a sample's members, checked from the tar header before any byte is read.

    `max_video_bytes` (video.max_input_mb) bounds the video, control and mask members, `max_meta_bytes`
    the json and txt; `video_limit_name` is how an error names the video limit.
    """

    max_video_bytes: int | None = None
    max_meta_bytes: int = MAX_META_BYTES
    video_limit_name: str = "video.max_input_mb"


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


@dataclass(frozen=True)
class SampleRange:
    """Samples `first` .. `first + count - 1` of a shard, numbered in tar order from 0 (a work item's share)."""

    first: int
    count: int

    @property
    def end(self) -> int:
        return self.first + self.count


def expand_urls(specs: str | Sequence[str]) -> list[str]:
    """Brace-expands shard specs (`data/part-{000000..000003}.tar`, `pipe:...`), keeping order, no duplicates."""
    if isinstance(specs, str):
        specs = [specs]
    # A dict of those seen keeps this linear in the result (a list's `in` made 30k shards take 20 s) and
    # keeps the first occurrence's order.
    urls: dict[str, None] = {}
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            urls.setdefault(url, None)
    return list(urls)


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
    """The local shard paths among `urls` that do not exist (pipe: and remote URLs are not checked;
    a `file://` URL is a local path)."""
    missing = []
    for url in urls:
        if url.startswith("pipe:") or is_url(url):
            continue
        if not Path(local_path(url)).is_file():
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
    """One WebDataset sample dict (`__key__` and extension -> bytes) as an InputSample.

    Never raises: whatever is wrong with the sample (its json nested too deep, bytes that are not
    UTF-8, no video) becomes its `error`, naming the member and the cause.
    """
    sample = InputSample(key=str(raw.get("__key__")))
    videos = [ext for ext in VIDEO_EXTENSIONS if ext in raw]
    if videos:
        sample.video_ext = videos[0]
        sample.video = raw[videos[0]]
    sample.control_video = raw.get(CONTROL_EXTENSION)
    sample.mask_video = raw.get(MASK_EXTENSION)
    member = "json" if "json" in raw else "txt"
    try:
        if "json" in raw:
            _apply_json(sample, raw["json"])
        elif "txt" in raw:
            sample.prompt = bytes(raw["txt"]).decode("utf-8").strip()
    except RecursionError:
        sample.error = f"bad {sample.key}.{member}: JSON nested too deeply to parse"
        return sample
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        sample.error = f"bad {sample.key}.{member}: {exc}"
        return sample
    except Exception as exc:  # noqa: BLE001 - anything in one sample's metadata fails that sample alone
        sample.error = f"bad {sample.key}.{member}: {type(exc).__name__}: {exc}"
        return sample
    if sample.video is None:
        present = sorted(k for k in raw if not k.startswith("__"))
        sample.error = (f"no video in sample (members: {', '.join(present) or 'none'}; "
                        f"expected one of .{', .'.join(VIDEO_EXTENSIONS)})")
    return sample


def _apply_json(sample: InputSample, data: bytes) -> None:
    meta = json.loads(bytes(data))
    if not isinstance(meta, dict):
        raise ValueError("must be a JSON object")
    prompt = meta.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    sample.prompt = prompt
    if "edits" in meta:
        sample.edits = _parse_edits(meta["edits"])


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """`dir/clip.mp4` -> (`dir/clip`, `mp4`), `a.control.mp4` -> (`a`, `control.mp4`), as WebDataset
    groups members: the key is everything before the basename's first dot; (None, None) without one."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def _member_limit(ext: str, limits: InputLimits) -> tuple[int | None, str] | None:
    """(limit in bytes, its name) for a member the sample uses; None for a member that is not read."""
    if ext in VIDEO_EXTENSIONS or ext in (CONTROL_EXTENSION, MASK_EXTENSION):
        return limits.max_video_bytes, limits.video_limit_name
    if ext in META_EXTENSIONS:
        return limits.max_meta_bytes, f"for a .{ext}"
    return None


class _SampleGrouper:
    """Collects consecutive members of one key into a raw sample dict; notes the first problem."""

    def __init__(self, limits: InputLimits, keys: Container[str] | None = None,
                 sample_range: SampleRange | None = None):
        self.limits = limits
        self.keys = keys
        self.range = sample_range
        self.seen: dict[str, int] = {}   # key -> its sample's position in the shard
        self.position = -1               # the current sample's number in the shard
        self.raw: dict | None = None
        self.error: str | None = None
        self.skip = False

    def start(self, key: str) -> None:
        self.raw, self.error = {"__key__": key}, None
        self.position += 1
        self.skip = ((self.keys is not None and key not in self.keys)
                     or (self.range is not None and self.position < self.range.first))
        if key in self.seen:
            self.error = (f"key {key!r} appears again in the shard (first as sample {self.seen[key] + 1}); "
                          "only its first sample is edited")
        else:
            self.seen[key] = len(self.seen)

    def add(self, member: TarMember, ext: str, stream: TarStream) -> None:
        assert self.raw is not None
        key = self.raw["__key__"]
        if self.skip or self.error is not None:
            self.raw.setdefault(ext, None)   # a sample not wanted, or failed already: nothing more is read
            return
        if ext in self.raw:
            self.error = self.error or f"member {key}.{ext} appears twice in the sample"
            return
        if member.error is not None:
            self.error = self.error or f"member {key}.{ext}: {member.error}"
            return
        limit = _member_limit(ext, self.limits)
        if limit is None:
            self.raw[ext] = b""   # not used: present (a "no video" error lists it), not read
            return
        max_bytes, limit_name = limit
        if max_bytes is not None and member.size > max_bytes:
            self.error = self.error or (f"member {key}.{ext} is {member.size} bytes, over the limit "
                                        f"{limit_name} ({max_bytes} bytes); not read")
            return
        self.raw[ext] = stream.read()

    def finish(self) -> InputSample | None:
        if self.raw is None:
            return None
        raw, error = self.raw, self.error
        self.raw = self.error = None
        if self.skip:
            return None
        if error is not None:
            return InputSample(key=raw["__key__"], error=error)
        return parse_sample(raw)


def _sample_member(member: TarMember) -> tuple[str, str] | None:
    """(key, extension) of a member that belongs to a sample; None for directories, links, names without
    an extension and `__x__` ones (as WebDataset). The one rule both reading and counting follow."""
    key, ext = split_member_name(member.name)
    if key is None or ext is None or ext.startswith("__") or not member.is_file:
        return None
    return key, ext


def iter_tar_samples(stream: TarStream, limits: InputLimits, keys: Container[str] | None = None,
                     sample_range: SampleRange | None = None) -> Iterator[InputSample]:
    """The samples of a tar stream, in order (only those of `keys`, when given, and of `sample_range`); see
    the module docstring. With a range, reading stops at the first member of the sample after it."""
    grouper = _SampleGrouper(limits, keys, sample_range)
    for member in stream.members():
        named = _sample_member(member)
        if named is None:
            continue
        key, ext = named
        if grouper.raw is None or key != grouper.raw["__key__"]:
            done = grouper.finish()
            if done is not None:
                yield done
            if sample_range is not None and grouper.position + 1 >= sample_range.end:
                return   # the rest of the shard is other work items'
            grouper.start(key)
        grouper.add(member, ext, stream)
    done = grouper.finish()
    if done is not None:
        yield done


def _open_shard(url: str) -> BinaryIO:
    """A shard's raw bytes: a path, a `pipe:` command, an http(s) URL as WebDataset's gopen opens them, or
    any other fsspec URL (`s3://bucket/x.tar`), streamed through fsspec."""
    return open_input(url) if is_url(url) and url_scheme(url) not in WEB_SCHEMES else gopen(local_path(url), "rb")


def read_samples(url: str, limits: InputLimits | None = None, keys: Container[str] | None = None,
                 sample_range: SampleRange | None = None) -> Iterator[InputSample]:
    """The samples of one shard, in order (see `_open_shard` for the URLs; gzip, bzip2 or xz compressed or
    not). With `keys`, only those samples: the others' members are skipped unread. With `sample_range`,
    only the samples it numbers (a work item): those before it are skipped unread, and the shard is not
    read past it."""
    raw = _open_shard(url)
    try:
        stream, _ = open_decompressed(raw)
        tar = TarStream(stream)
        yield from iter_tar_samples(tar, limits or InputLimits(), keys, sample_range)
        if sample_range is not None and url.startswith("pipe:"):
            # A command whose output is closed early dies of SIGPIPE, which the pipe reports as an error:
            # read it to its end (the data unread).
            for _ in tar.members():
                pass
    finally:
        raw.close()


def count_samples(url: str) -> int:
    """How many samples a shard holds, grouped as `read_samples` groups them, from its tar headers alone
    (a local file's members are seeked over; a stream is read through once, its data discarded).
    Raises TarFormatError on a damaged tar, OSError when it cannot be opened."""
    raw = _open_shard(url)
    try:
        stream, _ = open_decompressed(raw)
        count, key = 0, None
        for member in TarStream(stream).members():
            named = _sample_member(member)
            if named is not None and named[0] != key:
                count, key = count + 1, named[0]
        return count
    finally:
        raw.close()
