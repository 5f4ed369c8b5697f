"""Node-local caches: where `runtime.local_dir` points, the inversion cache's default folder under it, the
size index that spares a store with `cache_max_gb` a scan of the whole cache, and model weights staged to
local disk once per node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vidbatch.batch.module import VideoEditModule
from vidbatch.config.schema import load_config
from vidbatch.core.errors import ConfigError, ModelLoadError
from vidbatch.core.local_dir import local_dir
from vidbatch.engine.inversion_cache import InversionCache, inversion_cache_dir, inversion_key
from vidbatch.models import staging
from vidbatch.models.builtin import tiny_model_dir
from vidbatch.models.loading import load_pipeline, model_fingerprint
from vidbatch.models.staging import NETWORK_FILESYSTEMS, filesystem_type, stage_model

from conftest import FAST, REPO, TINY

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


# --------------------------------------------------------------------------------------- staged weights


@pytest.fixture()
def shared_model(tmp_path) -> Path:
    """The tiny model folder, copied to a folder of this test (standing for the shared filesystem)."""
    return Path(shutil.copytree(tiny_model_dir(), tmp_path / "shared" / "tiny-model"))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_staging_copies_once_and_the_copy_loads_the_same_weights(tmp_path, shared_model):
    node = tmp_path / "node"
    first = stage_model(shared_model, "always", node, "tiny-model")
    assert first.copied and first.path.parent.parent == node / "vidbatch-models"
    assert first.path.name == "tiny-model" and _tree(first.path) == _tree(shared_model)
    again = stage_model(shared_model, "always", node, "tiny-model")
    assert again == type(first)(first.path, False)                 # reused, not copied again
    assert stage_model(shared_model, "never", node, "x").path == shared_model
    assert stage_model(first.path, "always", node, "x").path == first.path     # already local: as it is

    in_place = load_pipeline(str(shared_model), stage_local="never")
    staged = load_pipeline(str(shared_model), stage_local="always", local_dir=str(node))
    assert Path(staged.config._name_or_path) == first.path      # loaded from the staged copy
    assert model_fingerprint(staged) == model_fingerprint(in_place)


def test_a_changed_source_is_staged_again_and_single_files_keep_their_name(tmp_path, shared_model):
    node = tmp_path / "node"
    first = stage_model(shared_model, "always", node, "m")
    config = shared_model / "model_index.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    second = stage_model(shared_model, "always", node, "m")
    assert second.copied and second.path != first.path
    weights = next(shared_model.rglob("*.safetensors"))
    single = stage_model(weights, "always", node, "w")
    assert single.copied and single.path.name == weights.name and single.path.read_bytes() == weights.read_bytes()


def test_auto_stages_only_from_network_filesystems(tmp_path, shared_model):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path / 'shared'} nfs4 rw 0 0\n"
                      f"/dev/sdb1 {tmp_path / 'shared' / 'tiny-model' / 'unet'} xfs rw 0 0\n")
    assert filesystem_type(shared_model, str(mounts)) == "nfs4"
    assert filesystem_type(shared_model / "unet" / "x", str(mounts)) == "xfs"    # the longest mount point
    assert filesystem_type(tmp_path / "sharedother", str(mounts)) == "ext4"       # a prefix is not a parent
    # This machine's real mount table decides for the test's folder.
    staged = stage_model(shared_model, "auto", tmp_path / "node", "m")
    assert staged.copied == (filesystem_type(shared_model) in NETWORK_FILESYSTEMS)


def test_staging_without_room(tmp_path, shared_model, monkeypatch):
    monkeypatch.setattr(staging, "_FREE_MARGIN_BYTES", 1 << 62)
    with pytest.raises(ModelLoadError, match="stage_local"):
        stage_model(shared_model, "always", tmp_path / "node", "tiny-model")
    assert not list((tmp_path / "node" / "vidbatch-models").glob("*/"))    # nothing half-copied left


# A stager process: imports only the staging module (fast to start), waits for the go file, stages, prints.
STAGER = """
import json, os, sys, time
from pathlib import Path
from vidbatch.models.staging import stage_model
source, node, go = sys.argv[1:]
Path(go + "." + str(os.getpid())).touch()
while not os.path.exists(go):
    time.sleep(0.005)
staged = stage_model(Path(source), "always", Path(node), "tiny-model")
print(json.dumps([str(staged.path), staged.copied]))
"""


def test_concurrent_stagers_leave_one_complete_copy(tmp_path, shared_model):
    node, go = tmp_path / "node", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", STAGER, str(shared_model), str(node), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("go.*"))) < len(procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()     # all start staging at once
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), [err for _, err in outs]
    got = [json.loads(out) for out, _ in outs]
    assert len({path for path, _ in got}) == 1 and sum(copied for _, copied in got) == 1
    staged = node / "vidbatch-models"
    folders = [p.name for p in staged.iterdir() if p.is_dir()]
    assert len(folders) == 1 and not folders[0].startswith(".")      # one copy, no temporary left
    assert _tree(Path(got[0][0])) == _tree(shared_model)
