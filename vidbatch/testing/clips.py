"""Synthetic test clips made by ffmpeg's lavfi generators, in every container the decoder reads."""

from __future__ import annotations

import tempfile
from fractions import Fraction
from pathlib import Path

import ffmpeg

from vidbatch.io.video import ffmpeg_args, file_url, fps_to_rational, run_ffmpeg

# suffix -> (video codec options, audio codec options or None when the container takes no audio)
_CLIP_CODECS: dict[str, tuple[dict, dict | None]] = {
    ".mp4": ({"vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast"}, {"acodec": "aac"}),
    ".m4v": ({"vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast"}, {"acodec": "aac"}),
    ".mov": ({"vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast"}, {"acodec": "aac"}),
    ".mkv": ({"vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast"}, {"acodec": "aac"}),
    ".webm": (
        {"vcodec": "libvpx-vp9", "pix_fmt": "yuv420p", "deadline": "realtime", "cpu-used": 8, "crf": 32,
         "video_bitrate": 0, "row-mt": 1},
        {"acodec": "libopus"},
    ),
    ".avi": ({"vcodec": "mjpeg", "pix_fmt": "yuvj420p", "q:v": 3}, {"acodec": "pcm_s16le"}),
    ".gif": ({"vcodec": "gif"}, None),
}
# containers that store a display matrix
_ROTATABLE = {".mp4", ".m4v", ".mov", ".mkv", ".webm"}


# Generators that fill their first frame at random: seeded, so a clip (and everything made from it,
# the demo's outputs included) is the same on every run.
_SEEDED_GENERATORS = ("life", "cellauto")


def _lavfi_source(source: str, size: tuple[int, int], rate: str) -> str:
    """'testsrc2' or 'color=c=red,drawbox=...' -> generator with size and rate, then any extra filters."""
    generator, _, rest = source.partition(",")
    sep = ":" if "=" in generator else "="
    spec = f"{generator}{sep}size={size[0]}x{size[1]}:rate={rate}"
    if generator.split("=")[0] in _SEEDED_GENERATORS and "seed=" not in generator:
        spec += ":seed=0"
    return f"{spec},{rest}" if rest else spec


def make_test_video(
    path: str | Path,
    *,
    seconds: float = 1.0,
    fps: float = 8,
    size: tuple[int, int] = (96, 64),
    source: str = "testsrc2",
    audio: bool = False,
    rotation: int = 0,
) -> Path:
    """Write a synthetic clip of `round(seconds * fps)` frames made by ffmpeg's lavfi generators.

    Args:
        path: output file; its suffix picks container and codec: .mp4/.m4v/.mov/.mkv (H.264 + AAC),
            .webm (VP9 + Opus), .avi (MJPEG + PCM), .gif (no audio).
        size: stored (width, height) before rotation.
        source: a lavfi video generator (testsrc2, mandelbrot, life, cellauto, color...), optionally with
            its own options and extra filters: "color=c=red,drawbox=y=ih/2:h=ih/2:color=blue:t=fill".
        audio: add a 440 Hz sine track of the same duration.
        rotation: clockwise display rotation (0/90/180/270) stored as a display matrix
            (mp4, m4v, mov, mkv, webm only); a player, and `decode_video`, show the frames turned by it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CLIP_CODECS:
        raise ValueError(f"unsupported test clip suffix {suffix!r}; use one of {sorted(_CLIP_CODECS)}")
    if rotation % 90 or not 0 <= rotation < 360:
        raise ValueError(f"rotation must be 0, 90, 180 or 270, got {rotation}")
    if rotation and suffix not in _ROTATABLE:
        raise ValueError(f"{suffix} cannot store a display rotation; use one of {sorted(_ROTATABLE)}")
    video_opts, audio_opts = _CLIP_CODECS[suffix]
    if audio and audio_opts is None:
        raise ValueError(f"{suffix} clips cannot carry audio")
    count = max(1, round(seconds * fps))
    rate = fps_to_rational(fps)
    duration = count / Fraction(rate)

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vidbatch-clip-") as tmp:
        target = Path(tmp) / ("raw" + suffix) if rotation else path
        streams = [ffmpeg.input(_lavfi_source(source, size, rate), format="lavfi")["v"]]
        opts = dict(video_opts, **{"frames:v": count})
        if audio:
            sine = f"sine=frequency=440:sample_rate=44100:duration={float(duration):.6f}"
            streams.append(ffmpeg.input(sine, format="lavfi")["a"])
            opts.update(audio_opts)
        stream = ffmpeg.output(*streams, file_url(target), format=_muxer(suffix), **opts).overwrite_output()
        run_ffmpeg(ffmpeg_args(stream), f"write test clip {path.name}")
        if rotation:
            # Stream copy with a new display matrix (counter-clockwise in ffmpeg): no re-encoding.
            src = ffmpeg.input(file_url(target), **{"display_rotation:v:0": -rotation})
            stream = ffmpeg.output(
                src, file_url(path), format=_muxer(suffix), codec="copy", map=0
            ).overwrite_output()
            run_ffmpeg(ffmpeg_args(stream), f"set rotation of test clip {path.name}")
    return path


def _muxer(suffix: str) -> str:
    return {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
            ".avi": "avi", ".gif": "gif"}[suffix]
