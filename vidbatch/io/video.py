"""Video I/O with the ffmpeg binary shipped by imageio-ffmpeg, driven through ffmpeg-python.

* `probe_video` reads what `ffmpeg -i` prints (this ffmpeg has no ffprobe).
* `decode_video` turns a file's bytes into upright, resized RGB frames `(T, H, W, 3)` uint8 (+ its audio).
* `encode_mp4` turns frames back into a web-playable H.264 mp4.

ffmpeg always runs from an argument list (never a shell); its stderr is drained by a thread while we read
its stdout, otherwise ffmpeg blocks on a full stderr pipe on long videos.

Rotation convention: `rotation` is the clockwise angle (0, 90, 180, 270) by which the stored frames must be
turned to be displayed upright, i.e. the value of the classic mp4 `rotate` tag (phones write 90 for a
portrait clip). ffmpeg prints the display matrix counter-clockwise ("rotation of -90.00 degrees" is our 90).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import subprocess
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterable, Iterator

import ffmpeg
import imageio_ffmpeg
import numpy as np

from vidbatch.core.errors import VideoDecodeError
from vidbatch.io.frames import WINDOW, FrameFile, frame_windows

logger = logging.getLogger(__name__)

__all__ = [
    "VideoInfo",
    "DecodedVideo",
    "ffmpeg_exe",
    "probe_video",
    "output_size",
    "decode_video",
    "encode_mp4",
    "fps_to_rational",
]

# ffmpeg log level while decoding: warnings are needed to notice truncated/corrupt input (ffmpeg exits 0
# on most of them). Module-level so tests can raise it to flood stderr (deadlock test).
_DECODE_LOGLEVEL = "warning"

# stderr fragments that mean the input ended early or is damaged; ffmpeg reports them and still exits 0.
_TRUNCATION_MARKERS = (
    "partial file",
    "ended prematurely",
    "corrupt input packet",
    "invalid nal unit size",
    "error splitting the input into nal units",
    "decoding error",
    "error while decoding",
    "decode failed",
    "truncat",
    "packet corrupt",
    "invalid data found when processing input",
)

# Summary lines ffmpeg prints after the real cause; they say nothing by themselves.
_GENERIC_LINE = re.compile(
    r"^(Error opening input files?\b|Error opening output files?\b|Conversion failed|Exiting normally"
    r"|Guessed Channel Layout|deprecated pixel format|Input #\d|Output #\d|Stream mapping|Press \[q\])",
    re.IGNORECASE,
)
_LOG_PREFIX = re.compile(r"^(\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*)+")


@dataclass(frozen=True)
class VideoInfo:
    """What `ffmpeg -i` tells about a file's first video stream (no ffprobe in imageio-ffmpeg).

    `width`/`height` are the display size: sample aspect ratio and `rotation` already applied.
    """

    width: int
    height: int
    fps: float  # average source frame rate, NTSC rates snapped to n*1000/1001 (29.97 -> 30000/1001)
    rotation: int  # clockwise degrees to display upright: 0, 90, 180 or 270
    duration_s: float | None
    has_audio: bool


@dataclass
class DecodedVideo:
    """Decoded frames and what came with them."""

    frames: np.ndarray | FrameFile  # (T, H, W, 3) uint8 RGB, upright and resized
    fps: float  # output frame rate = source fps / frame_stride
    source: VideoInfo
    audio: bytes | None  # first audio track as AAC in .m4a covering the frames' time span; None without audio


@dataclass(frozen=True)
class _Probe:
    """Internal probe result: the public info plus what the decode command needs."""

    info: VideoInfo
    video_index: int  # index among the file's video streams (`0:v:N`), cover art skipped
    audio_index: int | None  # index among the file's audio streams (`0:a:N`)
    stored_width: int  # coded size, before rotation and aspect correction
    stored_height: int


# --------------------------------------------------------------------------------------------- helpers


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg (it brings no ffprobe)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_args(stream: ffmpeg.nodes.OutputStream, loglevel: str = "error") -> list[str]:
    """ffmpeg-python graph -> argument list; global options go first (ffmpeg ignores trailing options)."""
    args = stream.compile(cmd=ffmpeg_exe())
    return [args[0], "-hide_banner", "-nostdin", "-nostats", "-loglevel", loglevel, *args[1:]]


def file_url(path: str | Path) -> str:
    """`file:` URL so that a path with a colon or a leading dash is never read as a protocol or an option."""
    return "file:" + str(Path(path).resolve())


def fps_to_rational(fps: float) -> str:
    """Frame rate as the exact rational ffmpeg should use: 29.97 -> "30000/1001", 12.5 -> "25/2".

    NTSC rates are printed by ffmpeg with two decimals only, so a non-integer rate within 0.005 of
    n*1000/1001 is taken to be that rational.
    """
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    n = round(fps * 1.001)
    if abs(fps - round(fps)) > 1e-6 and n > 0 and abs(n * 1000 / 1001 - fps) < 0.005:
        return f"{n * 1000}/1001"
    frac = Fraction(fps).limit_denominator(1001)
    return f"{frac.numerator}/{frac.denominator}"


def _snap_fps(fps: float) -> float:
    """29.97 (as printed) -> 30000/1001 exactly; other rates unchanged."""
    num, den = fps_to_rational(fps).split("/")
    snapped = int(num) / int(den)
    return snapped if abs(snapped - fps) < 0.005 else fps


def _parse_rate(value: str, suffix: str) -> float:
    """'29.97' or '1' with suffix 'k' -> float ('1k tbr' is 1000)."""
    rate = float(value)
    return rate * 1000 if suffix == "k" else rate


def _clean_line(line: str) -> str:
    """Strip ffmpeg's `[h264 @ 0x55...]` prefixes."""
    return _LOG_PREFIX.sub("", line.strip()).strip()


def _meaningful_lines(lines: Iterable[str], n: int = 2) -> str:
    """The last `n` distinct informative stderr lines, oldest first, joined with '; '."""
    picked: list[str] = []
    for raw in reversed(list(lines)):
        line = _clean_line(raw)
        if not line or _GENERIC_LINE.search(line) or line in picked:
            continue
        picked.append(line)
        if len(picked) == n:
            break
    return "; ".join(reversed(picked)) or "(ffmpeg printed no error)"


class _StderrDrain(threading.Thread):
    """Reads a process's stderr to the end so that ffmpeg never blocks on a full pipe.

    Keeps the last lines (for error messages) and every line that signals truncation or corruption.
    """

    def __init__(self, stream: IO[bytes], keep: int = 64):
        super().__init__(daemon=True)
        self._stream = stream
        self.tail: deque[str] = deque(maxlen=keep)
        self.damage: list[str] = []
        self.bytes_read = 0

    def run(self) -> None:
        for raw in iter(self._stream.readline, b""):
            self.bytes_read += len(raw)
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            low = line.lower()
            if len(self.damage) < 16 and any(m in low for m in _TRUNCATION_MARKERS):
                self.damage.append(line)
        self._stream.close()


@contextlib.contextmanager
def _ffmpeg_process(args: list[str], *, stdin: int, stdout: int) -> Iterator[tuple[subprocess.Popen, _StderrDrain]]:
    """Starts ffmpeg with its stderr drained in a thread; on leaving, a process still running is killed
    and reaped (an exception mid-stream must not leave ffmpeg behind) and its pipes are closed."""
    proc = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    drain = _StderrDrain(proc.stderr)
    drain.start()
    try:
        yield proc, drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join()
        if proc.stdout is not None:
            proc.stdout.close()


def run_ffmpeg(args: list[str], what: str) -> subprocess.CompletedProcess:
    """Run an ffmpeg command that writes files (no pipes to read); RuntimeError naming `what` on failure."""
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        err = _meaningful_lines(proc.stderr.decode("utf-8", errors="replace").splitlines())
        raise RuntimeError(f"ffmpeg failed to {what} (exit code {proc.returncode}): {err}")
    return proc


# ----------------------------------------------------------------------------------------------- probe

_INPUT_RE = re.compile(r"^Input #0, ", re.MULTILINE)
_DURATION_RE = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_STREAM_RE = re.compile(r"^\s*Stream #0:\d+\S*?:\s*(Video|Audio|Subtitle|Data|Attachment):\s*(.*)$")
# '0x31637661' (codec tags) must not read as a size: sides start with a non-zero digit.
_SIZE_RE = re.compile(r"(?<![\w.])([1-9]\d*)x([1-9]\d*)(?![\w.])")
_SAR_RE = re.compile(r"SAR (\d+):(\d+)")
_FPS_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(k?) fps\b")
_TBR_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(k?) tbr\b")
_MATRIX_RE = re.compile(r"Display Matrix: rotation of (-?\d+(?:\.\d+)?) degrees")
_ROTATE_TAG_RE = re.compile(r"^\s*rotate\s*:\s*(-?\d+)\s*$")


def _parse_ffmpeg_info(stderr: str) -> _Probe:
    """Parse the input dump of `ffmpeg -i FILE` (stderr). Raises VideoDecodeError when there is no video."""
    if not _INPUT_RE.search(stderr):
        raise VideoDecodeError(
            "cannot open video: not a video file, corrupt or truncated; ffmpeg: "
            + _meaningful_lines(stderr.splitlines())
        )
    lines = stderr.splitlines()
    duration = None
    m = _DURATION_RE.search(stderr)
    if m:
        duration = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))

    video: dict | None = None
    n_video = n_audio = 0
    audio_index = None
    for i, line in enumerate(lines):
        sm = _STREAM_RE.match(line)
        if not sm:
            continue
        kind, desc = sm.groups()
        if kind == "Audio":
            if audio_index is None:
                audio_index = n_audio
            n_audio += 1
            continue
        if kind != "Video":
            continue
        index = n_video
        n_video += 1
        # Cover art (mp3/m4a/mp4 "attached pic") is a one-frame video stream, not the video.
        if video is not None or "attached pic" in desc:
            continue
        size = _SIZE_RE.search(desc)
        if not size:
            continue
        rate = _FPS_RE.search(desc) or _TBR_RE.search(desc)
        # The stream's side data and metadata follow on indented lines until the next stream.
        rotation = 0
        for follow in lines[i + 1 :]:
            if _STREAM_RE.match(follow) or not follow.startswith("    "):
                break
            mm = _MATRIX_RE.search(follow)
            if mm:  # display matrix is counter-clockwise
                rotation = round(-float(mm.group(1)) / 90) * 90 % 360
                break
            mt = _ROTATE_TAG_RE.match(follow)
            if mt:  # legacy tag (older ffmpeg builds) is clockwise
                rotation = round(int(mt.group(1)) / 90) * 90 % 360
        sar = _SAR_RE.search(desc)
        video = dict(
            index=index,
            width=int(size.group(1)),
            height=int(size.group(2)),
            fps=_parse_rate(*rate.groups()) if rate else None,
            rotation=rotation,
            sar=(int(sar.group(1)), int(sar.group(2))) if sar else (1, 1),
        )
    if video is None:
        raise VideoDecodeError("no video stream in the input (audio-only or data file?)")

    fps = video["fps"]
    if not fps or fps <= 0:
        # ffmpeg itself assumes 25 for streams without timing.
        logger.warning("video frame rate unknown; assuming 25 fps")
        fps = 25.0
    width, height = video["width"], video["height"]
    sar_num, sar_den = video["sar"]
    if sar_num > 0 and sar_den > 0 and sar_num != sar_den:  # anamorphic: display width = width * SAR
        disp_w = max(1, round(width * sar_num / sar_den))
    else:
        disp_w = width
    disp_h = height
    if video["rotation"] in (90, 270):
        disp_w, disp_h = disp_h, disp_w
    info = VideoInfo(
        width=disp_w,
        height=disp_h,
        fps=_snap_fps(fps),
        rotation=video["rotation"],
        duration_s=duration,
        has_audio=audio_index is not None,
    )
    return _Probe(info, video["index"], audio_index, width, height)


def _probe(path: str | Path) -> _Probe:
    args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", file_url(path)]
    proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True)
    # Without an output file ffmpeg always exits non-zero: the dump on stderr is what matters.
    stderr = proc.stderr.decode("utf-8", errors="replace").replace(file_url(path), "<input>")
    return _parse_ffmpeg_info(stderr)


def probe_video(path: str | Path) -> VideoInfo:
    """Size (display, rotation applied), frame rate, rotation, duration and audio presence of a video file.

    Raises VideoDecodeError if the file cannot be opened or has no video stream.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such video file: {path}")
    return _probe(path).info


# ---------------------------------------------------------------------------------------------- decode


def output_size(width: int, height: int, short_side: int | None, multiple: int) -> tuple[int, int]:
    """Output (width, height): short side scaled to `short_side` keeping the aspect ratio, then both sides
    rounded to the nearest multiple of `multiple` (at least `multiple`). `short_side=None` keeps the size.

    >>> output_size(96, 64, 32, 16)
    (48, 32)
    """
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if short_side is None:
        w, h = float(width), float(height)
    else:
        if short_side < 1:
            raise ValueError(f"short_side must be >= 1 or None, got {short_side}")
        scale = short_side / min(width, height)
        w, h = width * scale, height * scale

    def snap(x: float) -> int:
        # round half up (Python's round() is half-to-even, which would make 40 -> 32 with multiple 16)
        return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)

    return snap(w), snap(h)


def _safe_suffix(ext: str) -> str:
    """'.MP4' / 'mp4' -> '.mp4'; anything odd -> '.bin' (ffmpeg probes the content anyway)."""
    ext = ext.strip().lstrip(".").lower()
    return "." + ext if re.fullmatch(r"[a-z0-9]{1,8}", ext) else ".bin"


def _read_all(stream: IO[bytes], chunk: int = 1 << 20) -> bytearray:
    """Read a pipe to EOF into a bytearray (writable, so numpy can view it without a copy)."""
    buf = bytearray()
    while True:
        data = stream.read(chunk)
        if not data:
            return buf
        buf += data


def _stream_into(stream: IO[bytes], frames: FrameFile) -> None:
    """Read a pipe of raw frames to EOF into `frames`, a window at a time (a trailing partial frame,
    which only a killed ffmpeg leaves, is dropped)."""
    window = frames.frame_bytes * WINDOW
    pending = bytearray()
    while True:
        data = stream.read(window)
        if not data:
            return
        pending += data
        whole = len(pending) - len(pending) % frames.frame_bytes
        if whole:
            frames.append_bytes(memoryview(pending)[:whole])
            del pending[:whole]


def _decode_frames(
    path: Path, probe: _Probe, size: tuple[int, int], max_frames: int | None, frame_stride: int,
    keep: str,
) -> tuple[np.ndarray | FrameFile, int, _StderrDrain]:
    """Run ffmpeg: selected frames of the first video stream as (T, H, W, 3) rgb24, autorotated and scaled,
    in memory (`keep` "memory") or streamed into a `FrameFile` ("disk").

    Returns (frames, ffmpeg exit code, drained stderr).
    """
    width, height = size
    video = ffmpeg.input(file_url(path))[f"v:{probe.video_index}"]
    # ffmpeg autorotates by default, before our filters: the scale target is in display orientation.
    if frame_stride > 1:
        video = video.filter("select", f"not(mod(n,{frame_stride}))")
    upscale = width * height > probe.info.width * probe.info.height
    # One swscale pass resizes and converts to RGB (format=rgb24 right after it); accurate rounding and
    # full chroma interpolation cut the YUV->RGB error from ~2.8 to ~0.5 mean abs (measured, smooth content).
    flags = ("bicubic" if upscale else "area") + "+accurate_rnd+full_chroma_int"
    video = video.filter("scale", width, height, flags=flags).filter("format", "rgb24").filter("setsar", 1)
    out_opts: dict = {"format": "rawvideo", "pix_fmt": "rgb24", "fps_mode": "passthrough"}
    if max_frames is not None:
        out_opts["frames:v"] = max_frames  # ffmpeg stops reading and decoding once it has these
    args = ffmpeg_args(ffmpeg.output(video, "pipe:", **out_opts), loglevel=_DECODE_LOGLEVEL)

    on_disk = FrameFile(height, width) if keep == "disk" else None
    with _ffmpeg_process(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as (proc, drain):
        if on_disk is None:
            buf = _read_all(proc.stdout)
        else:
            _stream_into(proc.stdout, on_disk)
        returncode = proc.wait()
    if returncode < 0:
        # Killed by a signal (preemption, scancel, OOM killer): the job is ending, the video is not
        # at fault, so this must not become a "corrupt video" row in a committed shard.
        raise RuntimeError(f"ffmpeg was killed by signal {-returncode} while decoding")
    if on_disk is not None:
        return on_disk, returncode, drain
    frame_bytes = width * height * 3
    count = len(buf) // frame_bytes
    del buf[count * frame_bytes :]  # a partial frame can only come from a killed ffmpeg
    frames = np.frombuffer(buf, dtype=np.uint8).reshape(count, height, width, 3)
    return frames, returncode, drain


def _extract_audio(path: Path, audio_index: int, seconds: float, workdir: Path) -> bytes:
    """First `seconds` of audio stream `audio_index` as AAC in an .m4a (re-encoded: sample-accurate cut)."""
    out = workdir / "audio.m4a"
    audio = ffmpeg.input(file_url(path))[f"a:{audio_index}"]
    stream = ffmpeg.output(
        audio, file_url(out), format="mp4", acodec="aac", audio_bitrate="128k", t=f"{seconds:.6f}",
        movflags="+faststart",
    ).overwrite_output()
    try:
        run_ffmpeg(ffmpeg_args(stream), "extract the audio track")
    except RuntimeError as exc:
        raise VideoDecodeError(f"audio track could not be extracted: {exc}") from None
    return out.read_bytes()


def decode_video(
    data: bytes,
    ext: str,
    *,
    short_side: int | None,
    multiple: int = 8,
    max_frames: int | None = None,
    frame_stride: int = 1,
    min_frames: int = 1,
    max_input_bytes: int | None = None,
    max_source_pixels: int | None = None,
    keep: str = "memory",
) -> DecodedVideo:
    """Decode a video file's bytes into upright RGB frames of `output_size(...)`.

    Args:
        data: the file's bytes (e.g. from a tar shard); written to a temporary file because mp4 with the
            index at the end needs a seekable input.
        ext: the file's extension (mp4, webm, mkv, mov, avi, gif, m4v...), with or without the dot.
        short_side, multiple: output size, see `output_size` (applied to the upright display size).
        max_frames: keep at most this many frames; ffmpeg stops decoding once it has them.
        frame_stride: keep source frames 0, stride, 2*stride, ... (output fps = source fps / stride).
        min_frames: fewer frames than this after selection is an error.
        max_input_bytes, max_source_pixels: refuse inputs larger than this (bytes / width*height).
        keep: "memory" (frames as one array) or "disk" (a `FrameFile`, streamed from ffmpeg a window
            at a time: a clip of any length decodes at bounded host memory).

    Returns:
        DecodedVideo with frames `(T, H, W, 3)` uint8 and, when the source has audio, the audio of
        `[0, T * frame_stride / source_fps)` as AAC .m4a bytes.

    Raises:
        VideoDecodeError naming the cause: empty input, too large, not a video / corrupt, no video stream,
        too many source pixels, too few frames, or truncated. A file that decodes partly and then fails
        (ffmpeg exits non-zero, or reports a partial file / corrupt packet / decoding error) raises too,
        even if enough frames came out: a clear failure is better than a silently shortened video. With
        `max_frames`, damage well past the last frame needed is not read and so not reported. An audio
        track that cannot be extracted also raises (rather than silently dropping the sound).
    """
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    if keep not in ("memory", "disk"):
        raise ValueError(f"keep must be 'memory' or 'disk', got {keep!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if max_frames is not None and max_frames < min_frames:
        raise ValueError(f"max_frames={max_frames} is smaller than min_frames={min_frames}")
    if len(data) == 0:
        raise VideoDecodeError("empty input: the video file has 0 bytes")
    if max_input_bytes is not None and len(data) > max_input_bytes:
        raise VideoDecodeError(
            f"input too large: {len(data)} bytes > max_input_bytes={max_input_bytes}"
        )

    with tempfile.TemporaryDirectory(prefix="vidbatch-decode-") as tmp:
        workdir = Path(tmp)
        path = workdir / ("input" + _safe_suffix(ext))
        path.write_bytes(data)
        probe = _probe(path)
        info = probe.info
        pixels = probe.stored_width * probe.stored_height
        if max_source_pixels is not None and pixels > max_source_pixels:
            raise VideoDecodeError(
                f"source resolution too large: {probe.stored_width}x{probe.stored_height} = {pixels} pixels "
                f"> max_source_pixels={max_source_pixels}"
            )
        size = output_size(info.width, info.height, short_side, multiple)
        frames, returncode, drain = _decode_frames(path, probe, size, max_frames, frame_stride, keep)
        count = len(frames)
        cause = _meaningful_lines(drain.damage or drain.tail).replace(file_url(path), "<input>")
        if count == 0:
            raise VideoDecodeError(
                f"no frame could be decoded (corrupt or truncated video, ffmpeg exit code {returncode}): {cause}"
            )
        if returncode != 0 or drain.damage:
            raise VideoDecodeError(
                f"video is truncated or corrupt: decoding failed after {count} frame(s) "
                f"(ffmpeg exit code {returncode}): {cause}"
            )
        if count < min_frames:
            raise VideoDecodeError(
                f"video has {count} frame(s), at least {min_frames} needed"
                + (f" (frame_stride={frame_stride}, {max_frames=})" if frame_stride > 1 or max_frames else "")
            )
        audio = None
        if probe.audio_index is not None:
            audio = _extract_audio(path, probe.audio_index, count * frame_stride / info.fps, workdir)
    return DecodedVideo(frames=frames, fps=info.fps / frame_stride, source=info, audio=audio)


# ---------------------------------------------------------------------------------------------- encode


def encode_mp4(frames: np.ndarray | FrameFile, fps: float, *, audio: bytes | None = None, crf: int = 18) -> bytes:
    """Encode `(T, H, W, 3)` uint8 RGB frames (an array or a `FrameFile`, fed to ffmpeg a window at a
    time) into a web-playable mp4 and return its bytes.

    H.264 (libx264), yuv420p tagged BT.601, `+faststart`; exactly T frames at exactly `fps` (NTSC rates as
    n*1000/1001). `audio` (the .m4a bytes of `DecodedVideo.audio`) is muxed without re-encoding, cut to
    the video's duration (T / fps) on input; not with `-shortest`, which loses video frames.
    H and W must be even (4:2:0 chroma).
    """
    if not isinstance(frames, FrameFile):
        frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got shape {frames.shape} dtype {frames.dtype}")
    count, height, width, _ = frames.shape
    if count == 0:
        raise ValueError("frames is empty: nothing to encode")
    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
    rate = fps_to_rational(fps)

    with tempfile.TemporaryDirectory(prefix="vidbatch-encode-") as tmp:
        workdir = Path(tmp)
        out_path = workdir / "out.mp4"
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", video_size=(width, height), framerate=rate)
        streams = [video["v"]]
        opts: dict = {
            "format": "mp4",
            "vcodec": "libx264",
            "crf": crf,
            "pix_fmt": "yuv420p",
            # swscale converts RGB with the BT.601 matrix: say so, players then convert back correctly
            "colorspace": "smpte170m",
            "color_primaries": "smpte170m",
            "color_trc": "smpte170m",
            "color_range": "tv",
            "movflags": "+faststart",
            "fps_mode": "passthrough",
        }
        if audio is not None:
            audio_path = workdir / "audio.m4a"
            audio_path.write_bytes(audio)
            # Cut the audio to the video's duration on input instead of `-shortest`: ffmpeg's -shortest
            # drops the last 1-2 video frames (all of them for a 1-frame clip) because of the AAC priming
            # offset and the encoder delay. Stream copy cuts at packet granularity (~23 ms at 44.1 kHz).
            seconds = count / Fraction(rate)
            streams.append(ffmpeg.input(file_url(audio_path), t=f"{float(seconds):.6f}")["a:0"])
            opts.update(acodec="copy")
        args = ffmpeg_args(ffmpeg.output(*streams, file_url(out_path), **opts).overwrite_output())

        with _ffmpeg_process(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as (proc, drain):
            try:
                for window in frame_windows(frames, 8):
                    proc.stdin.write(memoryview(np.ascontiguousarray(window)).cast("B"))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg quit early; its exit code and stderr say why
            returncode = proc.wait()
        if returncode != 0:
            raise RuntimeError(f"ffmpeg failed to encode mp4 (exit code {returncode}): {_meaningful_lines(drain.tail)}")
        return out_path.read_bytes()
