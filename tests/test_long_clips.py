"""Host memory does not grow with a clip's length: the whole run (decode to frames on disk, VAE and
encode a window at a time, metrics in windows, report media), and the metrics alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from vidbatch.io.frames import FrameFile
from vidbatch.metrics.flow import warp_error
from vidbatch.metrics.interpolation import interp_psnr
from vidbatch.testing.clips import make_test_video

from conftest import TINY, video_sample, write_shard

# In a child process: the run's peak working memory above the resident memory it starts from. The peak
# is reset before each run (`clear_refs` 5 sets the process's high-water mark to its current RSS), after
# a warm-up run has loaded the model and everything loaded once. The long clip runs before the short
# one, so memory the long run leaves to the allocator can only lower the short run's figure.
WORKING_MEMORY = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from rich.console import Console
    from vidbatch import run
    from vidbatch.config.schema import load_config

    def status_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    tiny, out, warm, *shards = sys.argv[1:4 + 2]
    overrides = sys.argv[4 + 2:]
    config = load_config(tiny, overrides)
    quiet = Console(file=open("/dev/null", "w"))
    assert run(config, [warm], Path(out) / "warm", console=quiet) == 0
    working, peak = {}, {}
    for shard in shards:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = status_kb("VmRSS")
        assert run(config, [shard], Path(out) / Path(shard).stem, console=quiet) == 0
        peak[Path(shard).stem] = status_kb("VmHWM") * 1024
        working[Path(shard).stem] = peak[Path(shard).stem] - before * 1024
    print(json.dumps({"working": working, "peak": peak}))
""")


# glibc raises its mmap threshold after each large free, so where a buffer lands (and whether freeing it
# lowers the RSS) depends on what came before: peaks then vary by ~10 MB from run to run. A fixed
# threshold and two arenas make them repeat within ~1 MB (measured: growths of 2.4, 3.6 and 3.1 MB).
STEADY_MALLOC = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}


def clip_shard(folder: Path, frames: int) -> Path:
    clip = make_test_video(folder / f"clip{frames}.mp4", seconds=frames / 8, fps=8, size=(64, 64))
    return write_shard(folder / f"f{frames}.tar", [video_sample("v", clip)])


def test_a_long_clip_edits_at_the_host_memory_of_a_short_one(tmp_path):
    """1,000 frames against 100 at 64x64, through the real run (decode, inversion, edit, encode, warp
    error, interpolation PSNR, CLIP scores, report): the run's working memory grows by less than the
    900 added frames' decoded bytes (11 MB: one whole-clip copy of the frames anywhere fails it), and the
    process's peak stays within 25% of the short run's. Before the frames were kept on disk, 1,000 frames
    took 39 MB more working memory than 100 (2.4x)."""
    shards = [clip_shard(tmp_path, n) for n in (16, 1000, 100)]
    overrides = ["video.max_frames=null", "video.size=64", "edit.steps=1", "edit.method=per-frame",
                 "edit.control=none"]
    child = subprocess.run([sys.executable, "-c", WORKING_MEMORY, str(TINY), str(tmp_path / "out"),
                            *map(str, shards), *overrides],
                           capture_output=True, text=True, env={**os.environ, **STEADY_MALLOC})
    assert child.returncode == 0, child.stderr[-2000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    long, short = measured["working"]["f1000"], measured["working"]["f100"]
    added_frame_bytes = 900 * 64 * 64 * 3
    assert long - short < added_frame_bytes, measured
    rows = [json.loads(line) for line in (tmp_path / "out" / "f1000" / "stats" / "f1000.jsonl").read_text().splitlines()]
    assert [(r["status"], r["frames"]) for r in rows] == [("ok", 1000)], rows
    assert rows[0]["metrics"]["warp_error"] is not None and rows[0]["metrics"]["interp_psnr"] is not None
    assert measured["peak"]["f1000"] <= 1.25 * measured["peak"]["f100"], measured


def test_frame_files_read_like_arrays_and_remove_their_file(tmp_path):
    """A `FrameFile` returns exactly what the same frames in an array return (indices, slices, index
    arrays, windows, iteration), hands its file over through pickling, and removes it when closed."""
    import pickle

    frames = np.random.default_rng(0).integers(0, 256, (37, 6, 10, 3), dtype=np.uint8)
    stored = FrameFile(6, 10, directory=tmp_path)
    for start in range(0, 37, 5):
        stored.append(frames[start:start + 5])
    assert stored.shape == frames.shape and len(stored) == 37 and stored.nbytes == frames.nbytes
    assert np.array_equal(stored[3], frames[3]) and np.array_equal(stored[-1], frames[-1])
    assert np.array_equal(stored[4:30:3], frames[4:30:3]) and np.array_equal(stored[[5, 0, 36]], frames[[5, 0, 36]])
    assert np.array_equal(np.concatenate(list(stored.windows(8))), frames)
    assert np.array_equal(np.stack(list(stored)), frames) and np.array_equal(np.asarray(stored), frames)
    with pytest.raises(IndexError):
        stored[37]
    with pytest.raises(ValueError, match="whole number"):
        stored.append_bytes(b"\0" * 7)
    received = pickle.loads(pickle.dumps(stored))
    assert np.array_equal(np.asarray(received), frames)
    path = Path(received.path)
    del stored  # the sender handed the file over: dropping it keeps the file
    assert path.exists()
    received.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def peak_bytes(fn, *args) -> int:
    """Peak bytes numpy and Python allocate while `fn(*args)` runs (its inputs not counted)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("metric", ["interp_psnr", "warp_error"])
def test_metric_memory_does_not_grow_with_the_clip(metric):
    """1,000 frames against 100 at 48x64: the peak working memory grows by less than 5% of the 900
    added frames' bytes (one number per frame is kept). Before, it was the whole clip in
    float32/float64: ~8x (warp error) and ~24x (interpolation PSNR) the added frames' bytes."""
    rng = np.random.default_rng(0)
    long = rng.integers(0, 256, (1000, 48, 64, 3), dtype=np.uint8)
    short = long[:100].copy()
    fn = {"interp_psnr": lambda v: interp_psnr(v), "warp_error": lambda v: warp_error(v, v)}[metric]
    short_peak, long_peak = peak_bytes(fn, short), peak_bytes(fn, long)
    assert long_peak - short_peak < 0.05 * (long.nbytes - short.nbytes), (long_peak, short_peak)


def test_an_inversion_lives_on_disk_and_streams_through_the_cache(tmp_path, monkeypatch, pipe):
    """The inversion's trajectory and clean latents are memory-mapped files; a cached trajectory larger
    than the cache's streaming threshold loads a block of rows at a time into such a file, bit-identical
    to what was stored, and a byte flipped in it is still caught by the checksum. The frames' key is the
    same from a `FrameFile` as from the array."""
    from vidbatch.engine import inversion_cache
    from vidbatch.engine.editor import VideoEditor
    from vidbatch.engine.method import EditorSettings
    from vidbatch.io.disk_tensor import is_disk_tensor
    from vidbatch.models.loading import model_fingerprint

    from conftest import moving_frames

    frames = moving_frames(12, 32)
    cache = inversion_cache.InversionCache(tmp_path / "cache")
    editor = VideoEditor(pipe, EditorSettings(method="per-frame", control="none", steps=3, chunk_size=4),
                         cache=cache, model_identity=model_fingerprint(pipe, []))
    fresh, status = editor.cached_invert(frames, "a clip")
    assert status == "miss" and is_disk_tensor(fresh.trajectory) and is_disk_tensor(fresh.clean)
    assert editor.inversion_key(FrameFile.from_array(frames), "a clip") == editor.inversion_key(frames, "a clip")

    row_bytes = fresh.trajectory[0:1].numel() * fresh.trajectory.element_size()
    monkeypatch.setattr(inversion_cache, "STREAM_BYTES", row_bytes)  # the trajectory (3 rows) streams
    loaded, status = editor.cached_invert(frames, "a clip")
    assert status == "hit" and is_disk_tensor(loaded.trajectory) and not is_disk_tensor(loaded.timesteps)
    assert torch.equal(loaded.trajectory, fresh.trajectory) and torch.equal(loaded.clean, fresh.clean)

    entry = cache.path_for(editor.inversion_key(frames, "a clip"))
    data = bytearray(entry.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + header_len])["trajectory"]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0xFF  # a byte in the middle of the streamed trajectory
    entry.write_bytes(bytes(data))
    assert cache.load(editor.inversion_key(frames, "a clip")) is None and not entry.exists()
