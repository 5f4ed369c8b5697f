"""Tests of vidbatch.io.video with the real ffmpeg of imageio-ffmpeg; clips are generated per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vidbatch.io import video as video_io
from vidbatch.core.errors import VideoDecodeError
from vidbatch.testing.clips import make_test_video
from vidbatch.io.video import (
    VideoInfo,
    decode_video,
    encode_mp4,
    fps_to_rational,
    output_size,
    probe_video,
)

# top half red, bottom half blue: tells which way a frame was turned
TWO_TONE = "color=c=red,drawbox=x=0:y=ih/2:w=iw:h=ih/2:color=blue:t=fill"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


def _smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 smooth moving colour gradients (easy for H.264: small round-trip error)."""
    t = np.arange(count, dtype=np.float32)[:, None, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[None, :, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, None, :]
    r = 127.5 + 100 * np.sin(2 * np.pi * (x + 0.05 * t))
    g = 127.5 + 100 * np.cos(2 * np.pi * (y - 0.05 * t))
    b = 40 + 170 * x * y
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    "size, short_side, multiple, expected",
    [
        ((96, 64), 32, 16, (48, 32)),
        ((64, 96), 32, 16, (32, 48)),
        ((1920, 1080), 512, 8, (912, 512)),  # 910.2 -> 912
        ((1080, 1920), 512, 64, (512, 896)),  # 910.2 -> 896
        ((96, 64), None, 8, (96, 64)),
        ((100, 70), None, 16, (96, 64)),  # 100 -> 96, 70 -> 64 (nearest)
        ((40, 30), None, 16, (48, 32)),  # 40 -> 48 (half rounds up), 30 -> 32
        ((300, 10), 4, 8, (120, 8)),  # never below `multiple`
    ],
)
def test_output_size(size, short_side, multiple, expected):
    assert output_size(*size, short_side, multiple) == expected


def test_output_size_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        output_size(96, 64, 32, 0)
    with pytest.raises(ValueError, match="short_side"):
        output_size(96, 64, 0, 8)


@pytest.mark.parametrize(
    "fps, expected",
    [(30, "30/1"), (29.97, "30000/1001"), (30000 / 1001, "30000/1001"), (23.98, "24000/1001"),
     (59.94, "60000/1001"), (12.5, "25/2"), (8, "8/1"), (8.33, "833/100")],
)
def test_fps_to_rational(fps, expected):
    assert fps_to_rational(fps) == expected


_DUMP = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from '<input>':
  Metadata:
    major_brand     : isom
  Duration: {duration}, start: 0.000000, bitrate: 134 kb/s
  Stream #0:0[0x1](und): Video: mjpeg (Baseline) (jpeg / 0x6765706A), yuvj420p, 300x300, 90k tbr, 90k tbn (attached pic)
  Stream #0:1[0x2](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), 1920x1080 [SAR {sar} DAR 16:9], 5012 kb/s, {rate}, 90k tbn (default)
    Metadata:
      handler_name    : VideoHandler
{side}  Stream #0:2[0x3](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 128 kb/s (default)
At least one output file must be specified
"""


@pytest.mark.parametrize(
    "rate, side, sar, duration, expected",
    [
        ("29.97 fps, 29.97 tbr", "", "1:1", "00:01:02.50",
         VideoInfo(1920, 1080, 30000 / 1001, 0, 62.5, True)),
        ("25 tbr", "    Side data:\n      Display Matrix: rotation of -90.00 degrees\n", "1:1", "N/A",
         VideoInfo(1080, 1920, 25.0, 90, None, True)),
        ("1k tbr", "    Side data:\n      Display Matrix: rotation of 90.00 degrees\n", "1:1", "00:00:01.00",
         VideoInfo(1080, 1920, 1000.0, 270, 1.0, True)),
        ("24 fps, 24 tbr", "    Metadata:\n      rotate          : 180\n", "1:1", "00:00:01.00",
         VideoInfo(1920, 1080, 24.0, 180, 1.0, True)),
        ("23.98 fps, 23.98 tbr", "", "4:3", "01:00:00.00",  # anamorphic: display width 1920*4/3
         VideoInfo(2560, 1080, 24000 / 1001, 0, 3600.0, True)),
    ],
)
def test_parse_ffmpeg_info(rate, side, sar, duration, expected):
    dump = _DUMP.format(rate=rate, side=side, sar=sar, duration=duration)
    probe = video_io._parse_ffmpeg_info(dump)
    assert probe.info.width == expected.width and probe.info.height == expected.height
    assert probe.info.fps == pytest.approx(expected.fps, abs=1e-9)
    assert (probe.info.rotation, probe.info.duration_s, probe.info.has_audio) == (
        expected.rotation, expected.duration_s, expected.has_audio)
    # the cover art (attached pic, video stream 0) is skipped: the video is `0:v:1`, audio `0:a:0`
    assert (probe.video_index, probe.audio_index) == (1, 0)
    assert (probe.stored_width, probe.stored_height) == (1920, 1080)


def test_parse_ffmpeg_info_without_video_or_input():
    audio_only = "Input #0, wav, from '<input>':\n  Stream #0:0: Audio: pcm_s16le, 44100 Hz, mono\n"
    with pytest.raises(VideoDecodeError, match="no video stream"):
        video_io._parse_ffmpeg_info(audio_only)
    with pytest.raises(VideoDecodeError, match="cannot open video.*moov atom not found"):
        video_io._parse_ffmpeg_info(
            "[in#0 @ 0x55] moov atom not found\n"
            "[in#0 @ 0x56] Error opening input: Invalid data found when processing input\n"
            "Error opening input file x.mp4.\n"
        )


# ---------------------------------------------------------------------------------- containers, sizing


@pytest.mark.parametrize(
    "ext, fps",
    [("mp4", 8), ("webm", 8), ("mkv", 8), ("mov", 8), ("avi", 8), ("m4v", 12),
     ("gif", 10)],  # gif stores delays in 1/100 s: 10 fps is exact, 8 fps would read as 8.33
)
def test_containers_decode(clips, ext, fps):
    path = make_test_video(clips / f"clip.{ext}", seconds=1.0, fps=fps, size=(96, 64))
    info = probe_video(path)
    assert (info.width, info.height, info.rotation, info.has_audio) == (96, 64, 0, False)
    assert info.fps == pytest.approx(fps)
    decoded = decode_video(path.read_bytes(), ext, short_side=None)
    assert decoded.frames.shape == (fps, 64, 96, 3)
    assert decoded.frames.dtype == np.uint8
    assert decoded.fps == pytest.approx(fps)
    assert decoded.audio is None
    # testsrc2 moves: consecutive frames differ, i.e. we did not read one frame repeatedly
    assert np.abs(decoded.frames[1].astype(int) - decoded.frames[0]).mean() > 1


def test_resize_short_side_and_multiple(clips):
    path = make_test_video(clips / "resize.mp4", seconds=0.5, fps=8, size=(96, 64))
    data = path.read_bytes()
    assert decode_video(data, "mp4", short_side=32, multiple=16).frames.shape == (4, 32, 48, 3)
    assert decode_video(data, ".MP4", short_side=48, multiple=8).frames.shape == (4, 48, 72, 3)
    # upscaling works too
    assert decode_video(data, "mp4", short_side=128, multiple=8).frames.shape == (4, 128, 192, 3)


def test_max_frames_and_stride(clips):
    path = make_test_video(clips / "long.mkv", seconds=2.5, fps=8, size=(64, 48), source="mandelbrot")
    data = path.read_bytes()
    full = decode_video(data, "mkv", short_side=None)
    assert full.frames.shape == (20, 48, 64, 3)

    strided = decode_video(data, "mkv", short_side=None, frame_stride=3)
    assert len(strided.frames) == 7  # frames 0, 3, ..., 18
    assert strided.fps == pytest.approx(8 / 3)
    np.testing.assert_array_equal(strided.frames, full.frames[::3])

    limited = decode_video(data, "mkv", short_side=None, frame_stride=2, max_frames=4)
    assert limited.fps == pytest.approx(4.0)
    np.testing.assert_array_equal(limited.frames, full.frames[0:8:2])

    with pytest.raises(ValueError, match="frame_stride"):
        decode_video(data, "mkv", short_side=None, frame_stride=0)


# ------------------------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("ext", ["mp4", "webm"])
@pytest.mark.parametrize(
    "rotation, red_half",
    # stored frames: red on top. Turned clockwise by `rotation` for display.
    [(90, "right"), (180, "bottom"), (270, "left")],
)
def test_rotation_decodes_upright(clips, ext, rotation, red_half):
    path = make_test_video(
        clips / f"rot{rotation}.{ext}", seconds=0.25, fps=8, size=(96, 64), source=TWO_TONE, rotation=rotation
    )
    info = probe_video(path)
    assert info.rotation == rotation
    expected_hw = (64, 96) if rotation == 180 else (96, 64)
    assert (info.height, info.width) == expected_hw

    frames = decode_video(path.read_bytes(), ext, short_side=None).frames
    assert frames.shape == (2, *expected_hw, 3)
    h, w = expected_hw
    halves = {
        "top": frames[:, : h // 2], "bottom": frames[:, h // 2 :],
        "left": frames[:, :, : w // 2], "right": frames[:, :, w // 2 :],
    }
    opposite = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[red_half]
    red, blue = halves[red_half].reshape(-1, 3).mean(0), halves[opposite].reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[2] < 50, red
    assert blue[2] > 200 and blue[0] < 50, blue

    # resizing applies to the upright size: short side is the width now
    if rotation == 90:
        resized = decode_video(path.read_bytes(), ext, short_side=32, multiple=16).frames
        assert resized.shape == (2, 48, 32, 3)


def test_rotation_rejected_where_container_cannot_store_it(clips):
    with pytest.raises(ValueError, match="rotation"):
        make_test_video(clips / "rot.avi", rotation=90)


# ------------------------------------------------------------------------------------- encode, round trip


def test_round_trip_preserves_count_size_fps_and_pixels():
    frames = _smooth_frames(12, 48, 64)
    mp4 = encode_mp4(frames, 30000 / 1001)
    assert mp4[4:8] == b"ftyp"
    # +faststart: the index (moov) comes before the media data (mdat)
    assert 0 <= mp4.find(b"moov") < mp4.find(b"mdat")
    decoded = decode_video(mp4, "mp4", short_side=None)
    assert decoded.frames.shape == frames.shape
    assert decoded.fps == pytest.approx(30000 / 1001, abs=1e-9)
    assert decoded.source.fps == pytest.approx(30000 / 1001, abs=1e-9)
    diff = np.abs(decoded.frames.astype(np.int16) - frames).mean()
    assert diff < 3, diff  # measured ~1.4 at crf 18


def test_encode_rejects_bad_frames():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 33, 32, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 32, 32, 3), np.float32), 8)
    with pytest.raises(ValueError, match="empty"):
        encode_mp4(np.zeros((0, 32, 32, 3), np.uint8), 8)


def test_audio_is_carried_through(clips, tmp_path):
    path = make_test_video(clips / "audio.mp4", seconds=2.0, fps=8, size=(64, 48), audio=True)
    assert probe_video(path).has_audio
    decoded = decode_video(path.read_bytes(), "mp4", short_side=None, frame_stride=2, max_frames=5)
    assert len(decoded.frames) == 5 and decoded.fps == pytest.approx(4.0)
    assert decoded.audio is not None and decoded.audio[4:8] == b"ftyp"
    audio_path = tmp_path / "a.m4a"
    audio_path.write_bytes(decoded.audio)
    # audio covers the decoded frames' span: 5 frames * stride 2 / 8 fps = 1.25 s (not the clip's 2 s)
    audio_dump = video_io.subprocess.run(
        [video_io.ffmpeg_exe(), "-hide_banner", "-i", str(audio_path)], capture_output=True, text=True
    ).stderr
    duration = video_io._DURATION_RE.search(audio_dump)
    assert duration and float(duration.group(3)) == pytest.approx(1.25, abs=0.05)

    out = tmp_path / "out.mp4"
    out.write_bytes(encode_mp4(decoded.frames, decoded.fps, audio=decoded.audio))
    info = probe_video(out)
    assert info.has_audio and info.fps == pytest.approx(4.0)
    again = decode_video(out.read_bytes(), "mp4", short_side=None)
    assert len(again.frames) == 5  # -shortest did not cut a video frame
    assert again.audio is not None


def test_no_audio_gives_none(clips):
    path = make_test_video(clips / "silent.webm", seconds=0.5, fps=8, size=(64, 48))
    assert decode_video(path.read_bytes(), "webm", short_side=None).audio is None


def test_webm_audio(clips):
    path = make_test_video(clips / "audio.webm", seconds=0.5, fps=8, size=(64, 48), audio=True)
    decoded = decode_video(path.read_bytes(), "webm", short_side=None)
    assert len(decoded.frames) == 4 and decoded.audio is not None


# ---------------------------------------------------------------------------------------------- errors


def test_error_empty_input():
    with pytest.raises(VideoDecodeError, match="empty"):
        decode_video(b"", "mp4", short_side=None)


def test_error_random_bytes():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(VideoDecodeError, match="cannot open video") as err:
        decode_video(data, "mp4", short_side=None)
    assert "Invalid data found" in str(err.value)  # ffmpeg's own words are kept
    assert "vidbatch-decode" not in str(err.value)  # the temporary path is not


def test_error_truncated_mp4(clips):
    path = make_test_video(clips / "trunc.mp4", seconds=2.0, fps=8, size=(96, 64))
    data = path.read_bytes()
    # index at the end: the first half has no index at all
    with pytest.raises(VideoDecodeError, match="moov atom not found"):
        decode_video(data[: len(data) // 2], "mp4", short_side=None)
    # index in front (faststart, like our own output): some frames decode, then the data ends
    fast = encode_mp4(decode_video(data, "mp4", short_side=None).frames, 8)
    with pytest.raises(VideoDecodeError, match=r"truncated or corrupt: decoding failed after \d+ frame"):
        decode_video(fast[: len(fast) * 2 // 3], "mp4", short_side=None)


def test_error_too_few_frames(clips):
    path = make_test_video(clips / "one.mp4", seconds=0.125, fps=8, size=(64, 48))
    data = path.read_bytes()
    assert len(decode_video(data, "mp4", short_side=None).frames) == 1
    with pytest.raises(VideoDecodeError, match=r"video has 1 frame\(s\), at least 2 needed"):
        decode_video(data, "mp4", short_side=None, min_frames=2)


def test_error_too_few_frames_after_stride(clips):
    path = make_test_video(clips / "four.mp4", seconds=0.5, fps=8, size=(64, 48))
    with pytest.raises(VideoDecodeError, match=r"video has 2 frame\(s\), at least 3 needed"):
        decode_video(path.read_bytes(), "mp4", short_side=None, frame_stride=3, min_frames=3)


def test_error_limits(clips):
    path = make_test_video(clips / "limits.mp4", seconds=0.25, fps=8, size=(96, 64))
    data = path.read_bytes()
    with pytest.raises(VideoDecodeError, match="input too large"):
        decode_video(data, "mp4", short_side=None, max_input_bytes=len(data) - 1)
    with pytest.raises(VideoDecodeError, match=r"resolution too large: 96x64 = 6144 pixels"):
        decode_video(data, "mp4", short_side=None, max_source_pixels=96 * 64 - 1)
    # exactly at the limits is fine
    ok = decode_video(data, "mp4", short_side=None, max_input_bytes=len(data), max_source_pixels=96 * 64)
    assert len(ok.frames) == 2


def test_error_no_video_stream(tmp_path):
    path = tmp_path / "tone.m4a"
    video_io.run_ffmpeg(
        [video_io.ffmpeg_exe(), "-f", "lavfi", "-i", "sine=duration=0.5", "-c:a", "aac", str(path)], "write audio"
    )
    with pytest.raises(VideoDecodeError, match="no video stream"):
        decode_video(path.read_bytes(), "m4a", short_side=None)


# ------------------------------------------------------------------------------------------ long video


@pytest.mark.timeout(60)
def test_long_clip_with_verbose_stderr_does_not_deadlock(clips, monkeypatch):
    # 'trace' makes ffmpeg write more than a pipe buffer (64 KiB) to stderr while we read its stdout:
    # without the draining thread ffmpeg would block on stderr and we on stdout, forever.
    drains = []

    class CountingDrain(video_io._StderrDrain):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drains.append(self)

    monkeypatch.setattr(video_io, "_DECODE_LOGLEVEL", "trace")
    monkeypatch.setattr(video_io, "_StderrDrain", CountingDrain)
    path = make_test_video(clips / "long.mp4", seconds=10, fps=30, size=(64, 64), source="life")
    decoded = decode_video(path.read_bytes(), "mp4", short_side=None)
    assert decoded.frames.shape == (300, 64, 64, 3)
    assert decoded.fps == pytest.approx(30.0)
    assert len(drains) == 1 and drains[0].bytes_read > 65536


@pytest.mark.parametrize("source", ["life", "cellauto"])
def test_random_generators_are_seeded_so_clips_repeat(tmp_path, source):
    """The demo's life/cellauto clips must be the same on every run, or its outputs cannot be compared."""
    a = make_test_video(tmp_path / "a.mp4", seconds=0.5, fps=8, size=(64, 48), source=source)
    b = make_test_video(tmp_path / "b.mp4", seconds=0.5, fps=8, size=(64, 48), source=source)
    assert a.read_bytes() == b.read_bytes()
    c = make_test_video(tmp_path / "c.mp4", seconds=0.5, fps=8, size=(64, 48), source=f"{source}=seed=1")
    assert c.read_bytes() != a.read_bytes()   # another seed, another clip: the check can fail
