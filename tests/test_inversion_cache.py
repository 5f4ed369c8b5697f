"""Tests of vidbatch.engine.inversion_cache: keys, round trips, corruption handling, concurrency, LRU eviction."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vidbatch.core.errors import ConfigError
from vidbatch.engine.inversion_cache import (
    FORMAT_VERSION,
    InversionCache,
    cache_max_bytes,
    canonical_json,
    inversion_key,
    tensor_checksum,
)

BASE_PARTS = {
    "max_frames": 32,
    "stride": 1,
    "size": [512, 512],
    "model": "sha256:0123abcd",
    "loras": [{"name": "ink", "scale": 0.8}],
    "scheduler": {"name": "DDIMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1},
    "steps": 50,
    "prompt": "a cat on a sofa",
    "control": "pnp",
    "dtype": "float16",
}

# One different value for every part the engine passes: each must change the key.
CHANGED_PARTS = {
    "max_frames": 16,
    "stride": 2,
    "size": [512, 768],
    "model": "sha256:0123abce",
    "loras": [{"name": "ink", "scale": 0.9}],
    "scheduler": {"name": "DDIMScheduler", "beta_schedule": "linear", "steps_offset": 1},
    "steps": 51,
    "prompt": "a dog on a sofa",
    "control": "controlnet-depth",
    "dtype": "float32",
}


def _frames(seed: int = 0, shape: tuple[int, ...] = (4, 8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _key(i: int) -> str:
    return inversion_key(_frames(i), BASE_PARTS)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(3, 4, 8, 8, generator=g),
        "trajectory": torch.randn(5, 2, 4, 8, 8, generator=g).to(torch.float16),
        "noise_pred": torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16),
        "timesteps": torch.arange(5, dtype=torch.int64) * 200,
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _stray_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------- keys


def test_key_is_hex_digest_and_deterministic():
    k = inversion_key(_frames(), BASE_PARTS)
    assert len(k) == 64 and int(k, 16) >= 0
    assert inversion_key(_frames(), dict(BASE_PARTS)) == k


def test_key_same_for_reordered_parts_and_for_torch_input():
    reordered = {name: BASE_PARTS[name] for name in reversed(list(BASE_PARTS))}
    reordered["scheduler"] = dict(reversed(list(BASE_PARTS["scheduler"].items())))
    assert list(reordered) != list(BASE_PARTS)
    assert inversion_key(_frames(), reordered) == inversion_key(_frames(), BASE_PARTS)
    # the same pixels as a tensor, or as a non-contiguous array, are the same content
    assert inversion_key(torch.from_numpy(_frames()), BASE_PARTS) == inversion_key(_frames(), BASE_PARTS)
    f = _frames()
    strided = np.asfortranarray(f)
    assert not strided.flags.c_contiguous
    assert inversion_key(strided, BASE_PARTS) == inversion_key(f, BASE_PARTS)


def test_key_changes_with_frame_content_shape_and_dtype():
    f = _frames()
    base = inversion_key(f, BASE_PARTS)
    one_pixel = f.copy()
    one_pixel[2, 3, 4, 1] ^= 1
    assert inversion_key(one_pixel, BASE_PARTS) != base
    assert inversion_key(f.reshape(8, 4, 8, 3), BASE_PARTS) != base  # same bytes, other shape
    assert inversion_key(f.view(np.int8), BASE_PARTS) != base  # same bytes, other dtype
    assert inversion_key(_frames(1), BASE_PARTS) != base


@pytest.mark.parametrize("name", sorted(BASE_PARTS))
def test_key_changes_with_each_part(name):
    assert BASE_PARTS[name] != CHANGED_PARTS[name]
    changed = dict(BASE_PARTS, **{name: CHANGED_PARTS[name]})
    assert inversion_key(_frames(), changed) != inversion_key(_frames(), BASE_PARTS)


def test_key_changes_when_a_part_is_added_or_removed():
    base = inversion_key(_frames(), BASE_PARTS)
    without = {k: v for k, v in BASE_PARTS.items() if k != "control"}
    assert inversion_key(_frames(), without) != base
    assert inversion_key(_frames(), dict(BASE_PARTS, control=None)) != base


def test_key_rejects_non_json_values_naming_the_key():
    with pytest.raises(TypeError, match="'size'"):
        inversion_key(_frames(), dict(BASE_PARTS, size={512, 512}))
    with pytest.raises(TypeError, match=r"loras\[0\]\.scale"):
        inversion_key(_frames(), dict(BASE_PARTS, loras=[{"name": "ink", "scale": object()}]))
    with pytest.raises(TypeError, match="'dtype'"):
        inversion_key(_frames(), dict(BASE_PARTS, dtype=torch.float16))
    with pytest.raises(TypeError, match="'guidance'"):
        inversion_key(_frames(), dict(BASE_PARTS, guidance=float("nan")))


def test_canonical_json_is_sorted_and_compact():
    assert canonical_json({"b": 1, "a": [1, 2], "c": {"z": 0, "y": "é"}}) == '{"a":[1,2],"b":1,"c":{"y":"é","z":0}}'


# ---------------------------------------------------------------------------- round trip


def test_store_load_round_trip_and_metadata(tmp_path):
    cache = InversionCache(tmp_path)
    key = _key(0)
    assert cache.load(key) is None  # miss
    tensors = _tensors(0)
    before = time.time()
    path = cache.store(key, tensors, parts=BASE_PARTS)
    assert path == tmp_path / key[:2] / f"{key}.safetensors" and path.is_file()

    loaded = cache.load(key)
    assert loaded is not None
    _assert_same(loaded, tensors)

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["vidbatch_format"] == FORMAT_VERSION
    assert meta["key"] == key
    assert json.loads(meta["parts"]) == BASE_PARTS
    assert meta["checksum"] == tensor_checksum(tensors)
    assert before - 1 <= float(meta["created"]) <= time.time() + 1

    (entry,) = cache.entries()
    assert entry.key == key and entry.path == path
    assert entry.size_bytes == path.stat().st_size
    assert entry.parts == BASE_PARTS
    assert entry.created == pytest.approx(float(meta["created"]))
    assert entry.hits == 1
    assert entry.as_dict()["path"] == str(path)
    assert cache.total_bytes() == path.stat().st_size
    assert cache.load(_key(1)) is None  # another key is still a miss


def test_store_accepts_non_contiguous_grad_and_aliased_tensors(tmp_path):
    cache = InversionCache(tmp_path)
    base = torch.randn(4, 6, requires_grad=True)
    tensors = {"t": base.t(), "same": base, "alias": base}  # non-contiguous, requires grad, shared memory
    cache.store(_key(0), tensors)
    loaded = cache.load(_key(0))
    assert loaded is not None
    assert torch.equal(loaded["t"], base.detach().t())
    assert torch.equal(loaded["same"], base.detach()) and torch.equal(loaded["alias"], base.detach())


def test_store_rejects_bad_keys_and_empty_payload(tmp_path):
    cache = InversionCache(tmp_path)
    for bad in ["../../etc/passwd", "ABCDEF0123456789", "abc"]:
        with pytest.raises(ValueError, match="invalid inversion cache key"):
            cache.store(bad, _tensors())
    with pytest.raises(ValueError, match="no tensors"):
        cache.store(_key(0), {})
    assert list(tmp_path.rglob("*.safetensors")) == []


# ---------------------------------------------------------------------------- corruption


def _flip_data(path: Path) -> None:
    off = _data_offset(path) + 17
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(4)
        f.seek(off)
        f.write(bytes(x ^ 0xFF for x in b))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _foreign(path: Path) -> None:
    # a valid safetensors file that is not one of our entries (no metadata)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(path))


@pytest.mark.parametrize("corrupt", [_flip_data, _truncate, _garbage, _foreign])
def test_corrupt_entry_is_logged_once_deleted_and_replaceable(tmp_path, caplog, corrupt):
    cache = InversionCache(tmp_path)
    key = _key(0)
    path = cache.store(key, _tensors(0))
    corrupt(path)

    with caplog.at_level(logging.DEBUG):
        assert cache.load(key) is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert str(path) in warnings[0].getMessage()
    assert not path.exists()

    caplog.clear()
    assert cache.load(key) is None  # now a plain miss: no second warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    fresh = _tensors(5)
    cache.store(key, fresh)
    loaded = cache.load(key)
    assert loaded is not None
    _assert_same(loaded, fresh)


def test_checksum_mismatch_is_named_as_cause(tmp_path, caplog):
    cache = InversionCache(tmp_path)
    path = cache.store(_key(0), _tensors(0))
    _flip_data(path)
    with caplog.at_level(logging.WARNING):
        assert cache.load(_key(0)) is None
    assert "checksum mismatch" in caplog.records[0].getMessage()


def test_verify_reports_bad_entries_without_deleting(tmp_path):
    cache = InversionCache(tmp_path)
    good = cache.store(_key(0), _tensors(0))
    bad = cache.store(_key(1), _tensors(1))
    trunc = cache.store(_key(2), _tensors(2))
    _flip_data(bad)
    _truncate(trunc)
    results = {e.key: err for e, err in cache.verify()}
    assert results[_key(0)] is None
    assert "checksum mismatch" in results[_key(1)]
    assert results[_key(2)] is not None
    assert good.exists() and bad.exists() and trunc.exists()
    assert cache.stats()["hits"] == 0  # verifying is not using


# ---------------------------------------------------------------------------- hits, stats, eviction


def test_stats_counts_entries_bytes_and_hits(tmp_path):
    cache = InversionCache(tmp_path, max_bytes=10**9)
    assert cache.stats()["entries"] == 0 and cache.stats()["hits"] == 0
    a = cache.store(_key(0), _tensors(0))
    b = cache.store(_key(1), _tensors(1))
    for _ in range(3):
        assert cache.load(_key(0)) is not None
    assert cache.load(_key(1)) is not None
    assert cache.load(_key(2)) is None  # a miss is not a hit
    stats = cache.stats()
    assert stats["entries"] == 2
    assert stats["bytes"] == a.stat().st_size + b.stat().st_size
    assert stats["hits"] == 4
    assert stats["max_bytes"] == 10**9
    assert {e.key: e.hits for e in cache.entries()} == {_key(0): 3, _key(1): 1}


def _store_abc(cache: InversionCache, t0: float) -> tuple[str, str, str]:
    """Store A, B, C with explicit, increasing mtimes (no dependence on clock resolution)."""
    keys = (_key(0), _key(1), _key(2))
    for i, k in enumerate(keys):
        p = cache.store(k, _tensors(i))
        os.utime(p, (t0 + 10 * i, t0 + 10 * i))
    return keys


def test_prune_evicts_least_recently_used_first(tmp_path):
    cache = InversionCache(tmp_path)
    a, b, c = _store_abc(cache, time.time() - 1000)
    assert [e.key for e in cache.entries()] == [a, b, c]  # LRU order
    assert cache.load(a) is not None  # a hit makes A the most recently used
    assert [e.key for e in cache.entries()] == [b, c, a]

    sizes = {e.key: e.size_bytes for e in cache.entries()}
    evicted = cache.prune(sizes[a] + sizes[c])
    assert [e.key for e in evicted] == [b]
    assert evicted[0].parts is None and evicted[0].created is not None
    assert {e.key for e in cache.entries()} == {a, c}
    assert cache.load(b) is None

    assert [e.key for e in cache.prune(sizes[a])] == [c]
    assert [e.key for e in cache.prune(0)] == [a]
    assert cache.entries() == [] and cache.total_bytes() == 0
    assert list(tmp_path.rglob("*.hits")) == []  # counters go with their entries


def test_max_bytes_is_enforced_on_store(tmp_path):
    probe = InversionCache(tmp_path / "probe").store(_key(9), _tensors(0))
    size = probe.stat().st_size
    cache = InversionCache(tmp_path / "cache", max_bytes=2 * size + size // 2)  # room for two entries
    t0 = time.time() - 1000
    a, b = _key(0), _key(1)
    for i, k in enumerate((a, b)):
        os.utime(cache.store(k, _tensors(i)), (t0 + 10 * i, t0 + 10 * i))
    assert cache.load(a) is not None  # A is now more recent than B
    c = _key(2)
    cache.store(c, _tensors(2))
    assert {e.key for e in cache.entries()} == {a, c}
    assert cache.total_bytes() <= cache.max_bytes


def test_entry_larger_than_max_bytes_is_kept_with_a_warning(tmp_path, caplog):
    cache = InversionCache(tmp_path, max_bytes=100)
    cache.store(_key(0), _tensors(0))
    with caplog.at_level(logging.WARNING):
        path = cache.store(_key(1), _tensors(1))
    assert path.exists() and not cache.path_for(_key(0)).exists()
    assert [e.key for e in cache.entries()] == [_key(1)]
    assert any("over its limit" in r.getMessage() for r in caplog.records)


def test_prune_removes_only_stale_temp_files(tmp_path):
    cache = InversionCache(tmp_path)
    key = _key(0)
    cache.store(key, _tensors(0))
    d = tmp_path / key[:2]
    old = d / f".{key}.123.deadbeef.tmp"
    young = d / f".{key}.124.cafebabe.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    orphan_hits = d / f"{_key(1)}.hits"
    orphan_hits.write_bytes(b"\n\n")
    assert cache.prune(10**9) == []
    assert not old.exists() and young.exists()
    assert not orphan_hits.exists()
    assert [e.key for e in cache.entries()] == [key]  # temp files are never listed as entries


def test_cache_max_bytes():
    assert cache_max_bytes(None) is None
    assert cache_max_bytes(2) == 2_000_000_000
    assert cache_max_bytes(0.5) == 500_000_000
    assert cache_max_bytes(0) == 0
    for bad in (-1, float("nan"), float("inf"), "3", True):
        with pytest.raises(ConfigError):
            cache_max_bytes(bad)
    with pytest.raises(ConfigError):
        InversionCache("/tmp/unused-never-created", max_bytes=-5)


# ---------------------------------------------------------------------------- concurrency

N_WRITERS = 4
ROUNDS = 3
BIG = 1 << 20  # 4 MiB of fp32 per payload, plus fp16 and bf16 tensors


def _payload(writer: int, rnd: int) -> dict[str, torch.Tensor]:
    offset = float(writer * 100 + rnd)
    return {
        "latents": torch.arange(BIG, dtype=torch.float32) + offset,
        "half": torch.full((256, 256), offset, dtype=torch.float16),
        "bf": torch.full((64, 64), offset, dtype=torch.bfloat16),
    }


def _matches_one_of(got: dict[str, torch.Tensor], rnd: int) -> int | None:
    for w in range(N_WRITERS):
        want = _payload(w, rnd)
        if sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want):
            return w
    return None


def _writer(root: str, key: str, writer: int, start, done, results) -> None:
    """Child process: each round, wait for everyone, store this writer's payload, read the key back."""
    cache = InversionCache(root)
    for rnd in range(ROUNDS):
        start.wait(timeout=120)
        try:
            cache.store(key, _payload(writer, rnd))
            got = cache.load(key)
            # every writer of this round has at least started; whoever renamed last, the entry is one
            # of this round's payloads, never a mixture and never missing
            status = "ok" if got is not None and _matches_one_of(got, rnd) is not None else f"bad load {got!r:.80}"
        except BaseException as e:  # report, so the parent's assertion shows the cause
            status = f"error {e!r}"
        results.put((writer, rnd, status))
        done.wait(timeout=120)


def test_concurrent_writers_of_one_key_leave_one_valid_entry(tmp_path, caplog):
    ctx = mp.get_context("spawn")
    key = _key(0)
    start, done = ctx.Barrier(N_WRITERS + 1), ctx.Barrier(N_WRITERS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(str(tmp_path), key, w, start, done, results), daemon=True)
        for w in range(N_WRITERS)
    ]
    for p in procs:
        p.start()
    cache = InversionCache(tmp_path)
    try:
        for rnd in range(ROUNDS):
            start.wait(timeout=120)
            done.wait(timeout=120)
            statuses = sorted(results.get(timeout=60) for _ in range(N_WRITERS))
            assert statuses == [(w, rnd, "ok") for w in range(N_WRITERS)]
            files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".hits"))
            assert files == [f"{key}.safetensors"], files  # one entry, no temp files left
            (checked,) = cache.verify()
            assert checked[1] is None
            with caplog.at_level(logging.WARNING):
                got = cache.load(key)
            assert got is not None and _matches_one_of(got, rnd) is not None
            assert not caplog.records
    except BaseException:
        # release the children now instead of letting them wait out their barrier timeouts
        start.abort()
        done.abort()
        raise
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    assert [p.exitcode for p in procs] == [0] * N_WRITERS
    assert _stray_files(tmp_path) == []
