"""Per-sample seeding where it is used: a run's noise comes from (run seed, sample key, edit name).

Two samples with identical frames but different keys get different noise with a stochastic DDIM
(`edit.eta` > 0); the same key gets the same noise wherever it is edited (another shard, another
position in the run), so reruns and distributed runs reproduce exactly.
"""

from __future__ import annotations

import numpy as np

from conftest import FAST, TINY, read_output, run_cli, video_sample, write_shard
from vidbatch.io.video import decode_video


def edited_frames(out, stem: str) -> dict[str, np.ndarray]:
    return {key: decode_video(s["e.mp4"], "mp4", short_side=None, multiple=2).frames
            for key, s in read_output(out / "shards" / f"{stem}.tar").items()}


def run(tmp_path, name: str, eta: float) -> tuple[dict, dict]:
    """p0 holds keys k1 then k2, p1 holds k1 alone: the same clip each time, one run of the CLI."""
    # Fixed chunks: random chunk borders (drawn from the same per-sample seed) would give the two keys
    # differently sized UNet batches, whose float results may differ in the last bit with several threads.
    sets = [*FAST, "video.max_frames=3", "metrics.clip_model=none", "edit.method=per-frame", "edit.control=none",
            "merge.chunk_order=seq",
            f"edit.eta={eta}", "edit.seed=5", 'edits=[{"name": "e", "prompt": "a watercolor painting"}]']
    out = tmp_path / name
    assert run_cli("run", TINY, "--input", tmp_path / "in" / "p{0..1}.tar", "--output", out,
                   *sum((["--set", s] for s in sets), [])) == 0
    return edited_frames(out, "p0"), edited_frames(out, "p1")


def test_sample_key_seeds_the_stochastic_edit(tmp_path, clips):
    clip = clips["cells"]
    write_shard(tmp_path / "in" / "p0.tar", [video_sample("k1", clip), video_sample("k2", clip)])
    write_shard(tmp_path / "in" / "p1.tar", [video_sample("k1", clip)])

    p0, p1 = run(tmp_path, "stochastic", eta=1.0)
    assert list(p0) == ["k1", "k2"] and list(p1) == ["k1"]
    assert not np.array_equal(p0["k1"], p0["k2"])     # other key, other noise: the frames are the same
    assert np.array_equal(p0["k1"], p1["k1"])         # the same key: the same noise, in another shard and place

    # Without noise the two keys edit identically: the difference above is the per-sample seed's alone.
    p0, _ = run(tmp_path, "deterministic", eta=0.0)
    assert np.array_equal(p0["k1"], p0["k2"])
