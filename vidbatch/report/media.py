"""The report's media under `OUT/report_media/`: videos beside their sources, or contact sheets.

- up to `max_videos` edited videos: the edited mp4 (copied out of the output shard) beside its
  source, re-encoded to H.264 at the edited size and frame selection so the two play frame for
  frame. A source is shown only when its input shard is a local file now (a `pipe:` or remote URL
  may be unreachable at report time); otherwise the edited video is shown alone.
- more than that: a JPEG contact sheet per (video, edit): a few frames of the source (when
  available) above the same frames of the edit.

The folder is built under a temporary name and swapped in whole (`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import yaml

from vidbatch.core.names import safe_member_stem
from vidbatch.core.atomic import fsync_dir, publish, temporary_path
from vidbatch.core.rows import EditRow
from vidbatch.io.input_shards import read_samples
from vidbatch.io.frames import FrameFile
from vidbatch.io.video import decode_video, encode_mp4
from vidbatch.report.summary import ShardRow, run_items

log = logging.getLogger("vidbatch")

MEDIA_DIR = "report_media"
SHEET_FRAMES = 4
SHEET_HEIGHT = 96


@dataclass
class Media:
    """What the report shows for one (video, edit) row: relative paths under the output folder."""

    edited: str | None = None
    source: str | None = None
    edited_poster: str | None = None  # a still shown before the video plays (its middle frame)
    source_poster: str | None = None
    sheet: str | None = None
    note: str | None = None  # why something is missing


@dataclass
class _Sources:
    """Source videos of one input shard, read lazily once: key -> (bytes, ext), or why not."""

    url: str
    videos: dict[str, tuple[bytes, str]] | None = None
    unavailable: str | None = None
    decoded: dict[tuple[str, int, int, int], FrameFile] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Publishing the folder


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `final`; on normal exit it replaces `final` whole.

    A reader sees the old or the new folder (or, for an instant, none), never a mix of the two or
    a half-written one. On an exception the temporary folder and everything in it are removed.
    """
    tmp = temporary_path(final)
    tmp.mkdir()  # mode 0777 minus the umask: the page is for anyone who can read OUT
    try:
        yield tmp
        _replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(tmp: Path, final: Path) -> None:
    """Moves the complete folder `tmp` to `final`, the old `final` out of the way first (a folder
    cannot be renamed over a non-empty one), then deletes the old one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
        fsync_dir(final.parent)
    publish(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Source videos


def frame_stride(out_dir: Path) -> int:
    """`video.frame_stride` of the run, from OUT/config.yaml (1 when unreadable)."""
    try:
        video = (yaml.safe_load((Path(out_dir) / "config.yaml").read_text()) or {}).get("video") or {}
        return int(video.get("frame_stride") or 1)
    except (OSError, yaml.YAMLError, ValueError, AttributeError):
        return 1


def _read_sources(url: str, keys: set[str]) -> _Sources:
    """The videos of `keys` in a local input shard (only those are kept in memory); a
    `pipe:`/remote/missing shard is reported unavailable."""
    sources = _Sources(url)
    if url.startswith("pipe:") or "://" in url or not Path(url).is_file():
        sources.unavailable = "source not available at report time (input shard is not a local file)"
        return sources
    try:
        # Only the edited samples are read (an input may hold members far over the run's limits).
        sources.videos = {s.key: (s.video, s.video_ext) for s in read_samples(url, keys=keys)
                          if s.video is not None and s.key in keys}
    except Exception as exc:  # noqa: BLE001 - the report goes on without sources
        sources.unavailable = f"source not available: input shard unreadable ({type(exc).__name__})"
    return sources


def _source_frames(sources: _Sources, row: EditRow, stride: int) -> FrameFile | None:
    """The source frames that were edited, at the edited size: `(T, H, W, 3)` uint8 on disk (a clip of
    any length), or None."""
    if sources.videos is None or row.key not in sources.videos:
        return None
    t, h, w = int(row.frames), int(row.height), int(row.width)
    cache_key = (row.key, t, h, w)
    if cache_key not in sources.decoded:
        data, ext = sources.videos[row.key]
        frames = decode_video(data, ext, short_side=min(h, w), multiple=2, max_frames=t, frame_stride=stride,
                              keep="disk").frames
        if frames.shape[1:3] != (h, w):  # the edit rounded its size to the UNet's multiple
            resized = FrameFile(h, w)
            for window in frames.windows():
                resized.append(np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in window]))
            frames = resized
        sources.decoded[cache_key] = frames
    return sources.decoded[cache_key]


# ---------------------------------------------------------------------------------------------
# Images


def _pick(frames: np.ndarray, n: int) -> np.ndarray:
    """`n` evenly spaced frames (first and last included) of `(T, H, W, 3)`."""
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(n, len(frames))).round().astype(int))
    return frames[idx]


def contact_sheet(strips: Sequence[tuple[str, np.ndarray]], *, frames: int = SHEET_FRAMES,
                  height: int = SHEET_HEIGHT) -> np.ndarray:
    """A grid image: one strip per `(label, (T, H, W, 3) uint8)`, `frames` evenly spaced frames each,
    scaled to `height` pixels, with the label in a left margin. Returns `(H', W', 3)` uint8 RGB."""
    gap, margin = 2, 64
    rendered = []
    for label, video in strips:
        picked = _pick(video, frames)
        width = max(1, round(picked.shape[2] * height / picked.shape[1]))
        tiles = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in picked]
        row = np.full((height, margin + len(tiles) * (width + gap), 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            x = margin + i * (width + gap)
            row[:, x:x + width] = tile
        cv2.putText(row, label[:9], (3, height // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (40, 40, 40), 1,
                    cv2.LINE_AA)
        rendered.append(row)
    full_width = max(r.shape[1] for r in rendered)
    padded = [np.pad(r, ((0, gap), (0, full_width - r.shape[1]), (0, 0)), constant_values=255) for r in rendered]
    return np.concatenate(padded)[:-gap]


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"could not encode {path.name}")
    path.write_bytes(data.tobytes())


def _safe(name: str) -> str:
    """A file-name-safe version of a key or edit name (keys may hold '/')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "_"


# ---------------------------------------------------------------------------------------------
# The media of every row


@dataclass
class _ShardFiles:
    """The open output shards and the current input shard's sources, as rows go shard by shard."""

    out_dir: Path
    urls: dict[str, str]  # output stem (a shard or work item) -> its input shard's URL
    wanted: dict[str, set[str]]  # output stem -> keys of its successful edits
    tars: dict[str, tarfile.TarFile | None] = field(default_factory=dict)
    sources: dict[str, _Sources] = field(default_factory=dict)

    def edited_mp4(self, stem: str, key: str, edit: str) -> bytes | None:
        """The bytes of the edit's mp4 in `shards/{stem}.tar` (member `{safe_member_stem(key)}.{edit}.mp4`),
        or None when it is not there."""
        if stem not in self.tars:
            path = self.out_dir / "shards" / f"{stem}.tar"
            try:
                self.tars[stem] = tarfile.open(path) if path.is_file() else None
            except (OSError, tarfile.TarError):
                self.tars[stem] = None
        tar = self.tars[stem]
        try:
            member = tar.extractfile(f"{safe_member_stem(key)}.{edit}.mp4") if tar is not None else None
        except KeyError:
            member = None
        return member.read() if member is not None else None

    def sources_of(self, stem: str) -> _Sources:
        """The sources of input shard `stem`; only one shard's sources are kept in memory."""
        if stem not in self.sources:
            self.sources.clear()
            self.sources[stem] = (_read_sources(self.urls[stem], self.wanted[stem]) if stem in self.urls
                                  else _Sources("", unavailable="source not available (input shard unknown)"))
        return self.sources[stem]

    def close(self) -> None:
        for tar in self.tars.values():
            if tar is not None:
                tar.close()


def _write_videos(item: Media, folder: Path, rel: str, row: EditRow, edited_bytes: bytes,
                  source: FrameFile | None) -> None:
    """The edited mp4 and its poster, and (once per sample) the re-encoded source and its poster."""
    key, edit = row.key, row.edit
    stem_name = f"{safe_member_stem(key)}.{_safe(edit)}"
    (folder / f"{stem_name}.mp4").write_bytes(edited_bytes)
    item.edited = f"{rel}/{stem_name}.mp4"
    edited = decode_video(edited_bytes, "mp4", short_side=None, multiple=2, keep="disk").frames
    _write_jpeg(folder / f"{stem_name}.jpg", edited[len(edited) // 2])
    item.edited_poster = f"{rel}/{stem_name}.jpg"
    if source is not None:
        src_name = f"{safe_member_stem(key)}.source"
        if not (folder / f"{src_name}.mp4").exists():
            (folder / f"{src_name}.mp4").write_bytes(encode_mp4(source, float(row.fps), crf=23))
            _write_jpeg(folder / f"{src_name}.jpg", source[len(source) // 2])
        item.source = f"{rel}/{src_name}.mp4"
        item.source_poster = f"{rel}/{src_name}.jpg"


def _write_sheet(item: Media, folder: Path, rel: str, row: EditRow, edited_bytes: bytes,
                 source: FrameFile | None) -> None:
    """A contact sheet: source frames (when available) above the same frames of the edit."""
    key, edit = row.key, row.edit
    edited = decode_video(edited_bytes, "mp4", short_side=None, multiple=2, keep="disk").frames
    if source is not None and len(source) != len(edited):
        source = source[:len(edited)]
    strips = ([("source", source)] if source is not None else []) + [(edit, edited)]
    name = f"{safe_member_stem(key)}.{_safe(edit)}.jpg"
    _write_jpeg(folder / name, contact_sheet(strips))
    item.sheet = f"{rel}/{name}"


def _row_media(files: _ShardFiles, shard_row: ShardRow, media_dir: Path, stride: int, as_videos: bool) -> Media:
    """The media of one successful edit; a problem becomes the Media's note, never an exception."""
    row = shard_row.row
    stem, key, edit = shard_row.shard, row.key, row.edit
    item = Media()
    sources = files.sources_of(stem)
    folder = media_dir / _safe(stem)
    folder.mkdir(exist_ok=True)
    rel = f"{MEDIA_DIR}/{_safe(stem)}"
    edited_bytes = files.edited_mp4(stem, key, edit)
    if edited_bytes is None:
        item.note = f"{safe_member_stem(key)}.{edit}.mp4 is not in shards/{stem}.tar"
        return item
    try:
        source = _source_frames(sources, row, stride)
    except Exception as exc:  # noqa: BLE001 - show the edit alone
        source = None
        sources.unavailable = f"source not decodable ({type(exc).__name__})"
    if source is None:
        item.note = sources.unavailable or "source not in its input shard"
    try:
        write = _write_videos if as_videos else _write_sheet
        write(item, folder, rel, row, edited_bytes, source)
    except Exception as exc:  # noqa: BLE001 - one broken video must not lose the report
        log.warning("report: no media for %s/%s: %s: %s", key, edit, type(exc).__name__, exc)
        item.note = f"no preview: {type(exc).__name__}: {exc}"
    return item


def build_media(out_dir: Path, summary: dict, rows: list[ShardRow], media_dir: Path, *,
                max_videos: int = 50, max_sheets: int = 500) -> dict[int, Media]:
    """Writes the media of `rows` into `media_dir` (an empty folder); returns row index -> Media.

    Paths in the Media are relative to `out_dir`, as if `media_dir` were `out_dir/report_media`.
    A sample whose media cannot be made gets a note instead; nothing here raises for one sample.
    """
    ok = [i for i, r in enumerate(rows) if r.row.ok]
    as_videos = len(ok) <= max_videos
    stride = frame_stride(out_dir)
    wanted: dict[str, set[str]] = {}
    for i in ok:
        wanted.setdefault(rows[i].shard, set()).add(rows[i].row.key)
    files = _ShardFiles(Path(out_dir), dict(run_items(Path(out_dir), summary)), wanted)
    media: dict[int, Media] = {}
    try:
        for n, i in enumerate(ok):
            if not as_videos and n >= max_sheets:
                media[i] = Media(note=f"no preview: only the first {max_sheets} edits get a contact sheet")
            else:
                media[i] = _row_media(files, rows[i], media_dir, stride, as_videos)
    finally:
        files.close()
    return media
