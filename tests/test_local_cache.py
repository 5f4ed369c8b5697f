"""Node-local caches: where `runtime.local_dir` points, the inversion cache's default folder under it, and the
size index that spares a store with `cache_max_gb` a scan of the whole cache."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vidbatch.batch.module import VideoEditModule
from vidbatch.config.schema import load_config
from vidbatch.core.errors import ConfigError
from vidbatch.core.local_dir import local_dir
from vidbatch.engine.inversion_cache import InversionCache, inversion_cache_dir, inversion_key

from conftest import FAST, TINY

LOCAL_ENV = ("VIDBATCH_LOCAL_DIR", "SLURM_TMPDIR", "TMPDIR")


def _key(i: int) -> str:
    frames = np.full((2, 4, 4, 3), i % 256, dtype=np.uint8)
    return inversion_key(frames, {"i": i})


def _tensors(i: int) -> dict[str, torch.Tensor]:
    """Every entry the same size (so limits can be given in entries), different content."""
    return {"latents": torch.full((4, 8, 8), float(i))}


# --------------------------------------------------------------------------------------- local_dir


def test_local_dir_order(monkeypatch, tmp_path):
    for name in LOCAL_ENV:
        monkeypatch.delenv(name, raising=False)
    assert local_dir() == Path(tempfile.gettempdir())
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    assert local_dir() == tmp_path / "tmpdir"
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    assert local_dir() == tmp_path / "slurm"
    monkeypatch.setenv("VIDBATCH_LOCAL_DIR", str(tmp_path / "ours"))
    assert local_dir() == tmp_path / "ours"
    monkeypatch.setenv("VIDBATCH_LOCAL_DIR", "  ")      # set but empty: not a folder, the next one counts
    assert local_dir() == tmp_path / "slurm"
    assert local_dir(str(tmp_path / "configured")) == tmp_path / "configured"   # the config wins
    with pytest.raises(ConfigError, match="runtime.local_dir"):
        local_dir("s3://bucket/scratch")


def test_config_refuses_a_url_for_local_dir():
    with pytest.raises(ConfigError, match="runtime.local_dir"):
        load_config(TINY, ["runtime.local_dir=gs://bucket/x"])


def test_inversion_cache_defaults_under_local_dir_and_explicit_cache_dir_wins(tmp_path):
    local = tmp_path / "node"
    assert inversion_cache_dir(None, str(local)) == local / "vidbatch-inversions"
    assert inversion_cache_dir(str(tmp_path / "shared"), str(local)) == tmp_path / "shared"
    # What a worker actually opens: the module built from the config.
    module = VideoEditModule(load_config(TINY, [*FAST, f"runtime.local_dir={local}"]), device="cpu")
    assert module.editors.cache.root == local / "vidbatch-inversions"
    module = VideoEditModule(load_config(TINY, [*FAST, f"runtime.local_dir={local}",
                                                f"inversion.cache_dir={tmp_path / 'shared'}"]), device="cpu")
    assert module.editors.cache.root == tmp_path / "shared"


# --------------------------------------------------------------------------------------- size index


class ScanCounter:
    """Counts full listings of a cache folder (`_scan` and every walk over its fan-out folders)."""

    def __init__(self, monkeypatch):
        self.scans = 0
        self.walks = 0
        scan, walk = InversionCache._scan, InversionCache._fanout_dirs

        def counted_scan(cache, with_metadata):
            self.scans += 1
            return scan(cache, with_metadata)

        def counted_walk(cache):
            self.walks += 1
            return walk(cache)

        monkeypatch.setattr(InversionCache, "_scan", counted_scan)
        monkeypatch.setattr(InversionCache, "_fanout_dirs", counted_walk)


def _entry_size(tmp_path: Path) -> int:
    return InversionCache(tmp_path / "probe").store(_key(10_000), _tensors(0)).stat().st_size


def test_store_with_a_limit_does_not_rescan(tmp_path, monkeypatch):
    size = _entry_size(tmp_path)
    counter = ScanCounter(monkeypatch)
    cache = InversionCache(tmp_path / "c", max_bytes=5 * size)
    cache.store(_key(0), _tensors(0))
    first = (counter.scans, counter.walks)
    assert first[0] == 1          # no index yet: one scan builds it
    for i in range(1, 40):        # 40 stores, 35 of them evicting
        cache.store(_key(i), _tensors(i))
    assert (counter.scans, counter.walks) == first
    assert cache.total_bytes() <= 5 * size
    assert sorted(e.key for e in cache.entries()) == sorted(_key(i) for i in range(35, 40))   # the newest five


def test_two_caches_sharing_a_folder_keep_the_limit_together(tmp_path, monkeypatch):
    size = _entry_size(tmp_path)
    counter = ScanCounter(monkeypatch)
    limit = 3 * size + size // 2
    a = InversionCache(tmp_path / "c", max_bytes=limit)
    b = InversionCache(tmp_path / "c", max_bytes=limit)
    for i in range(12):
        (a if i % 2 else b).store(_key(i), _tensors(i))
        assert a.total_bytes() <= limit        # each sees the other's stores through the shared index
    assert sorted(e.key for e in a.entries()) == sorted(_key(i) for i in (9, 10, 11))
    # one scan for both (the index file the first wrote was fresh for the second) plus the checks above
    assert counter.scans == 1 + 12 + 1


def test_a_hit_in_another_cache_is_respected_by_eviction(tmp_path):
    size = _entry_size(tmp_path)
    a = InversionCache(tmp_path / "c", max_bytes=3 * size)
    b = InversionCache(tmp_path / "c", max_bytes=3 * size)
    t0 = time.time() - 1000
    for i in range(3):
        os.utime(a.store(_key(i), _tensors(i)), (t0 + i, t0 + i))
    # a's index still has the store times; b's hit on key 0 moves it to the recent end
    assert b.load(_key(0)) is not None
    a.store(_key(3), _tensors(3))
    a.store(_key(4), _tensors(4))
    assert sorted(e.key for e in a.entries()) == sorted([_key(0), _key(3), _key(4)])


def test_index_is_rebuilt_when_lost_stale_or_damaged(tmp_path, monkeypatch):
    size = _entry_size(tmp_path)
    counter = ScanCounter(monkeypatch)
    cache = InversionCache(tmp_path / "c", max_bytes=3 * size)
    for i in range(3):
        cache.store(_key(i), _tensors(i))
    index = tmp_path / "c" / ".size-index"
    assert index.is_file() and counter.scans == 1
    # Lines that do not parse (a torn append on a network filesystem) are skipped.
    with open(index, "a") as f:
        f.write("+ nothex 12 1.0\n- \n\x00\x01garbage\n+ " + _key(99) + " twelve 1.0\n")
    cache.store(_key(3), _tensors(3))
    assert counter.scans == 1 and cache.total_bytes() == 3 * size
    # An entry removed behind the index's back (by hand): the eviction that picks it forgets it, and
    # that is room enough.
    cache.path_for(_key(1)).unlink()
    cache.store(_key(4), _tensors(4))
    assert sorted(e.key for e in cache.entries()) == sorted(_key(i) for i in (2, 3, 4))
    # The index deleted: the next store scans again and the total is right.
    index.unlink()
    before = counter.scans
    for i in (5, 6):
        cache.store(_key(i), _tensors(i))
    assert counter.scans == before + 1 and cache.total_bytes() == 3 * size
    # Older than rescan_s: scanned again.
    stale = InversionCache(tmp_path / "c", max_bytes=3 * size, rescan_s=0.0)
    before = counter.scans
    stale.store(_key(7), _tensors(7))
    assert counter.scans == before + 1
    assert sorted(e.key for e in cache.entries()) == sorted(_key(i) for i in (5, 6, 7))
