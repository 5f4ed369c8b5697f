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


# ---------------------------------------------------------------------------- stable formats

# Entries outlive the code that wrote them (a shared cache serves every version of the package that
# runs against it): a change of the key scheme or of the checksum must bump `_KEY_TAG` / FORMAT_VERSION
# and these pinned values together, or every cached inversion silently misses or fails its checksum.
PINNED_FRAMES = np.arange(2 * 3 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 3)
PINNED_PARTS = {"steps": 50, "prompt": "un chat é", "size": [3, 2]}
PINNED_KEY = "89881d00cd65efda6b245cedba6e1162f437e339698bd55eb530e54abd6238ca"
PINNED_CHECKSUM = "blake2b-256:980b3aaaf132ec53e83ab8fc86810e27fb1920388da245fca12b7adea3184265"


def _pinned_tensors() -> dict[str, torch.Tensor]:
    return {"b": torch.arange(6, dtype=torch.int16).reshape(2, 3), "a": torch.tensor([0.5, -2.0])}


def test_key_and_checksum_schemes_are_pinned(tmp_path):
    assert inversion_key(PINNED_FRAMES, PINNED_PARTS) == PINNED_KEY
    assert inversion_key(torch.from_numpy(PINNED_FRAMES), PINNED_PARTS) == PINNED_KEY
    assert tensor_checksum(_pinned_tensors()) == PINNED_CHECKSUM
    cache = InversionCache(tmp_path)
    with safe_open(str(cache.store(PINNED_KEY, _pinned_tensors())), framework="pt") as f:
        meta = f.metadata()
    assert meta["checksum"] == PINNED_CHECKSUM
    assert meta["format"] == "pt"  # what other safetensors readers expect of torch files
    assert json.loads(meta["parts"]) is None  # stored without parts: JSON null


def test_key_of_frames_on_disk_equals_key_of_the_array(tmp_path):
    from vidbatch.io.frames import FrameFile

    frames = _frames(3, shape=(5, 6, 4, 3))
    on_disk = FrameFile.from_array(frames, directory=tmp_path)
    try:
        assert inversion_key(on_disk, BASE_PARTS) == inversion_key(frames, BASE_PARTS)
    finally:
        on_disk.close()


def test_key_ignores_byte_order_and_covers_zero_dimensional_input():
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    big_endian = values.astype(">f4")
    assert big_endian.tobytes() != values.tobytes()
    assert inversion_key(big_endian, BASE_PARTS) == inversion_key(values, BASE_PARTS)
    scalar = np.array(2.5, dtype=np.float32)
    assert inversion_key(scalar, BASE_PARTS) == inversion_key(torch.tensor(2.5), BASE_PARTS)
    assert inversion_key(scalar, BASE_PARTS) != inversion_key(np.array([2.5], dtype=np.float32), BASE_PARTS)


def test_checksum_covers_names_dtypes_and_shapes_not_only_bytes():
    t = torch.arange(6, dtype=torch.int16)
    base = tensor_checksum({"x": t})
    assert tensor_checksum({"y": t}) != base
    assert tensor_checksum({"x": t.view(torch.float16)}) != base  # same bytes, other dtype
    assert tensor_checksum({"x": t.reshape(2, 3)}) != base  # same bytes, other shape
    assert tensor_checksum({"x": t.clone()}) == base


# ---------------------------------------------------------------------------- reading


def test_large_tensors_stream_to_disk_with_the_same_values_and_checksum(tmp_path, monkeypatch):
    """Tensors over STREAM_BYTES are read a block of rows at a time into a file-backed tensor; the values
    and the checksum are those of a whole read, and a flipped byte in a streamed tensor is still caught."""
    from vidbatch.engine import inversion_cache
    from vidbatch.io.disk_tensor import is_disk_tensor

    monkeypatch.setattr(inversion_cache, "STREAM_BYTES", 640)  # 640 // 4 bytes per block
    tensors = {
        "long": torch.arange(11 * 16, dtype=torch.float32).reshape(11, 16),  # 64-byte rows, blocks of 2
        "one_row": torch.arange(200, dtype=torch.float32).reshape(1, 200),  # a single row over the limit
        "at_limit": torch.arange(10 * 16, dtype=torch.float32).reshape(10, 16) + 0.5,  # exactly 640 bytes
        "bf": (torch.arange(40 * 16, dtype=torch.float32).reshape(40, 16) / 3).to(torch.bfloat16),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 16),
    }
    cache = InversionCache(tmp_path)
    path = cache.store(_key(0), tensors)
    loaded = cache.load(_key(0))
    assert loaded is not None
    _assert_same(loaded, tensors)
    assert {name for name, t in loaded.items() if is_disk_tensor(t)} == {"long", "one_row", "bf"}
    ((_, cause),) = cache.verify()
    assert cause is None

    data = bytearray(path.read_bytes())
    _, end = json.loads(data[8:_data_offset(path)])["bf"]["data_offsets"]
    data[_data_offset(path) + end - 3] ^= 0x40  # a byte in the last block of the streamed tensor
    path.write_bytes(bytes(data))
    assert "checksum mismatch" in cache.verify()[0][1]
    assert cache.load(_key(0)) is None and not path.exists()


def test_entries_are_read_without_memory_mapping_them(tmp_path):
    """A file replaced under an mmap on NFS raises SIGBUS: entries are read with pread."""
    from vidbatch.engine.inversion_cache import _safe_open

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    path = InversionCache(tmp_path).store(_key(0), _tensors(0))
    with _safe_open(path) as f:
        assert torch.equal(f.get_tensor("latents"), _tensors(0)["latents"])
        assert str(path) not in maps.read_text()


def test_entries_load_with_a_safetensors_that_has_no_backend_choice(tmp_path, monkeypatch):
    """Older safetensors releases have no `backend` argument: reading falls back to their default."""
    from vidbatch.engine import inversion_cache

    real_safe_open = inversion_cache.safe_open

    def safe_open_without_backend(filename, framework, device="cpu", **kwargs):
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        return real_safe_open(filename, framework=framework, device=device)

    monkeypatch.setattr(inversion_cache, "safe_open", safe_open_without_backend)
    monkeypatch.chdir(tmp_path)  # nothing to find under a relative name: the entry is opened by its path
    cache = InversionCache(tmp_path)
    cache.store(_key(0), _tensors(0))
    loaded = cache.load(_key(0))
    assert loaded is not None
    _assert_same(loaded, _tensors(0))


def test_load_moves_tensors_to_the_requested_device(tmp_path):
    cache = InversionCache(tmp_path)
    cache.store(_key(0), _tensors(0))
    loaded = cache.load(_key(0), device="meta")
    assert loaded is not None and sorted(loaded) == sorted(_tensors(0))
    assert {t.device.type for t in loaded.values()} == {"meta"}


def test_an_unreadable_entry_is_a_miss_that_is_kept_and_reported(tmp_path, caplog):
    """An I/O error (here a folder where the entry file should be) is not corruption: a miss with a
    warning, nothing deleted; verify names it and goes on to the other entries."""
    logger = logging.getLogger("test.inversion_cache.custom")
    cache = InversionCache(tmp_path, logger=logger)
    good = cache.store(_key(1), _tensors(1))
    os.utime(good, (time.time(), time.time()))
    odd = cache.path_for(_key(0))
    odd.mkdir(parents=True)
    os.utime(odd, (time.time() - 100, time.time() - 100))  # listed first
    with caplog.at_level(logging.WARNING):
        assert cache.load(_key(0)) is None
    assert [r.name for r in caplog.records] == [logger.name]  # the cache's own logger
    assert odd.is_dir()
    results = [(e.key, cause) for e, cause in cache.verify()]
    assert [k for k, _ in results] == [_key(0), _key(1)]
    assert results[0][1].startswith("unreadable") and results[1][1] is None


def test_warnings_go_to_the_module_logger_by_default(tmp_path, caplog):
    cache = InversionCache(tmp_path)
    _flip_data(cache.store(_key(0), _tensors(0)))
    with caplog.at_level(logging.WARNING):
        assert cache.load(_key(0)) is None
    assert [r.name for r in caplog.records] == ["vidbatch.engine.inversion_cache"]


def _write_raw_entry(path: Path, header: bytes, declared_len: int | None = None, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(header) if declared_len is None else declared_len
    path.write_bytes(n.to_bytes(8, "little") + header + data)


def test_listing_survives_damaged_headers(tmp_path):
    """`entries()` reads only the metadata header; what cannot be read gives created/parts None."""
    cache = InversionCache(tmp_path)
    meta = {"__metadata__": {"created": "12.5", "parts": "[1, 2]"}}
    header = json.dumps(meta).encode()
    _write_raw_entry(cache.path_for(_key(0)), header)  # valid, no tensor data: header fills the file
    _write_raw_entry(cache.path_for(_key(1)), header + b"    ", declared_len=len(header) + 8)  # runs past the end
    _write_raw_entry(cache.path_for(_key(2)), b"[]")  # JSON, but not an object
    _flip_data(cache.store(_key(3), _tensors(3)))
    _garbage(cache.path_for(_key(3)))
    listed = {e.key: (e.created, e.parts) for e in cache.entries()}
    assert listed == {_key(0): (12.5, None), _key(1): (None, None), _key(2): (None, None), _key(3): (None, None)}


def test_entry_of_empty_tensors_lists_its_metadata(tmp_path):
    cache = InversionCache(tmp_path)
    path = cache.store(_key(0), {"none": torch.zeros(0, 4)}, parts={"steps": 3})
    assert path.stat().st_size == _data_offset(path)  # no tensor data after the header
    (entry,) = cache.entries()
    assert entry.parts == {"steps": 3} and entry.created is not None
    assert torch.equal(cache.load(_key(0))["none"], torch.zeros(0, 4))


# ---------------------------------------------------------------------------- storing


def test_store_refuses_reserved_and_empty_tensor_names(tmp_path):
    cache = InversionCache(tmp_path)
    for name in ("", "__metadata__"):
        with pytest.raises(ValueError):
            cache.store(_key(0), {name: torch.zeros(2)})
    assert cache.entries() == []


def test_store_keeps_partially_overlapping_views_apart(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    cache = InversionCache(tmp_path)
    cache.store(_key(0), {"head": base[0:8], "tail": base[4:12], "middle": base[8:10]})
    loaded = cache.load(_key(0))
    assert loaded is not None
    assert torch.equal(loaded["head"], base[0:8]) and torch.equal(loaded["tail"], base[4:12])
    assert torch.equal(loaded["middle"], base[8:10])


def test_cache_folder_is_created_with_its_parents_and_again_when_removed(tmp_path):
    import shutil

    root = tmp_path / "a" / "b" / "cache"
    cache = InversionCache(root)
    assert root.is_dir()
    shutil.rmtree(tmp_path / "a")  # e.g. node-local scratch cleaned between jobs
    cache.store(_key(0), _tensors(0))
    assert cache.load(_key(0)) is not None


def test_hit_counters_are_plain_files_for_everyone(tmp_path):
    import stat

    cache = InversionCache(tmp_path)
    cache.store(_key(0), _tensors(0))
    old = os.umask(0o022)
    try:
        assert cache.load(_key(0)) is not None
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / _key(0)[:2] / f"{_key(0)}.hits").stat().st_mode) == 0o644


def test_unlink_quiet_says_whether_it_removed_the_file(tmp_path):
    from vidbatch.engine.inversion_cache import _unlink_quiet

    p = tmp_path / "f"
    p.write_bytes(b"x")
    assert _unlink_quiet(p) is True
    assert _unlink_quiet(p) is False


def test_inversion_cache_dir_default_and_configured(tmp_path, monkeypatch):
    from vidbatch.engine.inversion_cache import inversion_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VIDBATCH_LOCAL_DIR", str(tmp_path / "env"))
    assert inversion_cache_dir(None, str(tmp_path / "node")) == tmp_path / "node" / "vidbatch-inversions"
    assert inversion_cache_dir("", str(tmp_path / "node")) == tmp_path / "node" / "vidbatch-inversions"
    assert inversion_cache_dir("~/shared", str(tmp_path / "node")) == tmp_path / "home" / "shared"


def test_limits_must_be_non_negative_ints(tmp_path):
    assert InversionCache(tmp_path, max_bytes=0).max_bytes == 0
    for bad in (True, 1.5, "10", -1):
        with pytest.raises(ConfigError):
            InversionCache(tmp_path, max_bytes=bad)
        with pytest.raises(ValueError):
            InversionCache(tmp_path).prune(bad)


# ---------------------------------------------------------------------------- listing, pruning, stats


def test_listing_skips_stray_files_links_and_misplaced_entries(tmp_path):
    outside = tmp_path / "outside"
    elsewhere = InversionCache(outside)
    linked = elsewhere.store(_key(0), _tensors(0))
    cache = InversionCache(tmp_path / "c")
    (cache.root / "zz").write_bytes(b"a two-letter file, not a folder")
    (cache.root / _key(0)[:2]).symlink_to(linked.parent)  # a fan-out folder that is a link: not ours
    good = cache.store(_key(1), _tensors(1))
    for i in range(20):  # junk beside a real entry, whatever order the folder lists them in
        (good.parent / f"{good.parent.name}-junk{i}.safetensors").write_bytes(b"x")
    misplaced = cache.root / "ff" / good.name  # a real entry file in the wrong fan-out folder
    misplaced.parent.mkdir()
    misplaced.write_bytes(good.read_bytes())
    assert [e.key for e in cache.entries()] == [_key(1)]
    assert cache.stats()["entries"] == 1
    cache.prune(0)
    assert linked.exists() and misplaced.exists()  # prune never reaches through a link or into junk


def test_prune_evicts_exactly_down_to_the_limit_and_skips_what_it_cannot_remove(tmp_path, caplog):
    cache = InversionCache(tmp_path)
    t0 = time.time() - 1000
    stuck = cache.path_for(_key(9))
    stuck.mkdir(parents=True)  # cannot be unlinked: skipped with a warning
    os.utime(stuck, (t0 - 10, t0 - 10))
    for i in range(4):
        os.utime(cache.store(_key(i), _tensors(i)), (t0 + i, t0 + i))
    size = cache.path_for(_key(0)).stat().st_size
    assert cache.load(_key(3)) is not None
    with caplog.at_level(logging.WARNING):
        evicted = cache.prune(stuck.stat().st_size + size)
    assert [e.key for e in evicted] == [_key(0), _key(1), _key(2)]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert sorted(e.key for e in cache.entries()) == sorted([_key(9), _key(3)])
    assert {e.key: e.hits for e in cache.entries()}[_key(3)] == 1  # a kept entry keeps its counter


def test_prune_removes_only_writer_temporaries(tmp_path):
    cache = InversionCache(tmp_path)
    d = cache.store(_key(0), _tensors(0)).parent
    old = time.time() - 7200
    others = [d / "notes.tmp", d / ".keep"]  # not core.atomic temporaries (those are hidden *.tmp)
    for p in others:
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    cache.prune(10**9)
    assert all(p.exists() for p in others)


def test_stats_reports_root_and_oldest_and_newest_use(tmp_path):
    cache = InversionCache(tmp_path)
    empty = cache.stats()
    assert empty["root"] == str(tmp_path) and empty["oldest_use"] is None and empty["newest_use"] is None
    for i, t in enumerate((3000.0, 1000.0, 2000.0)):
        os.utime(cache.store(_key(i), _tensors(i)), (t, t))
    stats = cache.stats()
    assert (stats["oldest_use"], stats["newest_use"]) == (1000.0, 3000.0)
    assert stats["root"] == str(tmp_path)


def test_verify_lists_entries_with_their_metadata(tmp_path):
    cache = InversionCache(tmp_path)
    cache.store(_key(0), _tensors(0), parts={"steps": 7})
    ((entry, cause),) = cache.verify()
    assert cause is None and entry.parts == {"steps": 7} and entry.created is not None


# ---------------------------------------------------------------------------- the size index


def _size(tmp_path: Path) -> int:
    """The file size of every `_tensors(i)` entry (they differ only in values)."""
    return InversionCache(tmp_path / "probe").store(_key(99), _tensors(0)).stat().st_size


def _journal(root: Path) -> Path:
    return root / ".size-index"


def _on_disk(cache: InversionCache) -> set[str]:
    return {e.key for e in cache.entries()}


def test_limit_equal_to_the_total_keeps_everything_then_evicts_only_the_lru(tmp_path, caplog):
    size = _size(tmp_path)
    cache = InversionCache(tmp_path / "c", max_bytes=3 * size)
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            cache.store(_key(i), _tensors(i))
        assert _on_disk(cache) == {_key(0), _key(1), _key(2)} and cache._index.total == 3 * size
        cache.store(_key(3), _tensors(3))
        assert _on_disk(cache) == {_key(1), _key(2), _key(3)} and cache._index.total == 3 * size
    assert not caplog.records  # under the limit: no warning


def _cache_holding_three(tmp_path, others: int = 0) -> tuple[InversionCache, int, list[InversionCache]]:
    """A cache object limited to three entries that has stored entries 0, 1 and 2, and `others` more objects on
    its folder, made before those stores (so what they know of them comes from the journal)."""
    size = _size(tmp_path)
    cache = InversionCache(tmp_path / "c", max_bytes=3 * size)
    more = [InversionCache(tmp_path / "c", max_bytes=3 * size) for _ in range(others)]
    for i in range(3):
        cache.store(_key(i), _tensors(i))
    return cache, size, more


def test_a_second_cache_follows_the_first_through_the_journal(tmp_path):
    """Each object reads what the others appended (stores and evictions) instead of rescanning."""
    a, size, (b,) = _cache_holding_three(tmp_path, others=1)
    journal = _journal(a.root)
    inode = journal.stat().st_ino
    b.store(_key(3), _tensors(3))  # b learns 0, 1, 2 from a's journal and evicts 0
    assert _on_disk(a) == {_key(1), _key(2), _key(3)}
    a.store(_key(4), _tensors(4))  # a learns b's store and eviction, evicts 1
    assert _on_disk(a) == {_key(2), _key(3), _key(4)}
    assert a._index.sizes == {_key(i): size for i in (2, 3, 4)} and a._index.total == 3 * size
    b.store(_key(5), _tensors(5))
    assert _on_disk(a) == {_key(3), _key(4), _key(5)}
    assert b._index.sizes == {_key(i): size for i in (3, 4, 5)}
    assert journal.stat().st_ino == inode  # appended to, never rebuilt


def test_journal_lines_that_do_not_parse_are_skipped(tmp_path):
    cache = InversionCache(tmp_path)
    index = cache._index
    k = [f"{i:02x}" * 8 for i in range(13)]  # 16 hex characters: valid keys
    now = time.time()
    lines = [
        f"# vidbatch.inversion_cache_index/1 scanned={now:.6f}",
        f"+ {k[1]} 100 1.5", f"+ {k[2]} 200 2.5", f"+ {k[3]} 0 3.5",
        f"+ {k[4]} -5 4.5", f"+ {k[5]} 10 inf", f"+ {k[6]} twelve 1.0", f"+ {k[7]} 300 4.0",
        f"? {k[8]} 10 1.0", f"x {k[1]}", f"+ {k[1]}", f"- {k[2]}", f"- {k[9]}",
        "", "garbage", "- nothex", "+ nothex 12 1.0",
    ]
    journal = _journal(tmp_path)
    journal.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n" + f"+ {k[11]} 50 5.0\n".encode()
                        + f"+ {k[12]} 70 6.0".encode())  # the last line is still being appended

    def no_scan():
        raise AssertionError("the journal is fresh and short: no rescan")

    index.refresh(no_scan, no_scan)
    assert index.sizes == {k[1]: 100, k[3]: 0, k[7]: 300, k[11]: 50}
    assert index.used == {k[1]: 1.5, k[3]: 3.5, k[7]: 4.0, k[11]: 5.0}
    assert index.total == 450 and index.scanned == pytest.approx(now)
    with open(journal, "ab") as f:
        f.write(b"\n" + f"- {k[1]}\n".encode())
    index.refresh(no_scan, no_scan)
    assert index.sizes == {k[3]: 0, k[7]: 300, k[11]: 50, k[12]: 70} and index.total == 420
    assert sorted(index.used) == sorted(index.sizes)
    index.touch(k[3], 99.0)  # a hit in this process survives a refresh with nothing new
    index.refresh(no_scan, no_scan)
    assert index.used[k[3]] == 99.0
    assert [index.pop_lru() for _ in range(5)] == [k[7], k[11], k[12], k[3], None]


def test_a_replaced_journal_is_read_from_its_start(tmp_path):
    from vidbatch.core.atomic import atomic_write

    cache = InversionCache(tmp_path)
    index = cache._index
    k = [f"{i:02x}" * 8 for i in range(4)]
    header = f"# vidbatch.inversion_cache_index/1 scanned={time.time():.6f}\n"
    journal = _journal(tmp_path)
    journal.write_text(header + f"+ {k[0]} 10 1.0\n")
    index.refresh(None, None)
    assert index.sizes == {k[0]: 10}
    atomic_write(journal, header + "".join(f"+ {key} 20 2.0\n" for key in k[1:]))  # a new snapshot
    index.refresh(None, None)
    assert index.sizes == {key: 20 for key in k[1:]} and index.total == 60
    journal.write_text(header + f"+ {k[0]} 5 3.0\n")  # the same file rewritten shorter
    index.refresh(None, None)
    assert index.sizes == {k[0]: 5} and index.total == 5


@pytest.mark.parametrize("event_lines, rebuilt", [(1004, False), (1005, True)])
def test_a_journal_much_longer_than_its_entries_is_rebuilt(tmp_path, event_lines, rebuilt):
    """Rebuilt by a scan when it has more event lines than 2 x entries + 1000 (here 2 entries: 1004)."""
    cache = InversionCache(tmp_path, max_bytes=10**9)
    for i in range(2):
        cache.store(_key(i), _tensors(i))
    journal = _journal(tmp_path)
    text = journal.read_text()
    events = len(text.splitlines()) - 1  # after the snapshot header
    gone = "0123456789abcdef"  # evictions of an entry long gone (they pile up in a long-lived journal)
    with open(journal, "a") as f:
        f.write(f"- {gone}\n" * (event_lines - events - 1) + text.splitlines(keepends=True)[-1])
    InversionCache(tmp_path, max_bytes=10**9).store(_key(2), _tensors(2))  # reads it all, then decides
    after = journal.read_text()
    assert (gone not in after) is rebuilt
    assert after.startswith(text) is not rebuilt
    assert {e.key for e in cache.entries()} == {_key(0), _key(1), _key(2)}


def test_a_lost_or_headerless_journal_is_rebuilt_by_a_scan(tmp_path):
    size = _size(tmp_path)
    cache = InversionCache(tmp_path / "c", max_bytes=3 * size)
    for i in range(3):
        cache.store(_key(i), _tensors(i))
    journal = _journal(cache.root)
    journal.unlink()  # removed by hand: the next store writes a new snapshot
    cache.store(_key(3), _tensors(3))
    assert journal.is_file() and _on_disk(cache) == {_key(1), _key(2), _key(3)}
    journal.write_text(f"+ {_key(1)} 1 1.0\n")  # no snapshot header: not to be trusted
    cache.store(_key(4), _tensors(4))
    assert journal.read_text().startswith("# vidbatch.inversion_cache_index/1 scanned=")
    assert _on_disk(cache) == {_key(2), _key(3), _key(4)} and cache._index.total == 3 * size


def _three_old_entries(tmp_path) -> tuple[InversionCache, int]:
    """An unlimited cache object holding entries 0, 1, 2, used in that order 1000 s ago."""
    size = _size(tmp_path)
    unlimited = InversionCache(tmp_path / "c")
    t0 = time.time() - 1000
    for i in range(3):
        os.utime(unlimited.store(_key(i), _tensors(i)), (t0 + i, t0 + i))
    return unlimited, size


def test_the_first_limited_store_counts_the_entries_already_there(tmp_path):
    unlimited, size = _three_old_entries(tmp_path)
    InversionCache(tmp_path / "c", max_bytes=2 * size).store(_key(3), _tensors(3))
    assert _on_disk(unlimited) == {_key(2), _key(3)}


@pytest.mark.parametrize("damage", ["loop", "folder"])
def test_an_unusable_journal_is_reported_and_the_limit_still_holds(tmp_path, caplog, damage):
    """A journal that cannot be read (a symlink loop: replaced by a new snapshot) or not even replaced (a
    folder in its place: the cache keeps its own view in memory) never breaks a store or the limit."""
    size = _size(tmp_path)
    logger = logging.getLogger("test.inversion_cache.index")
    cache = InversionCache(tmp_path / "c", max_bytes=2 * size, logger=logger)
    cache.store(_key(0), _tensors(0))
    journal = _journal(cache.root)
    journal.unlink()
    if damage == "loop":
        journal.symlink_to(journal.name)
    else:
        journal.mkdir()
    with caplog.at_level(logging.WARNING):
        for i in range(1, 4):
            cache.store(_key(i), _tensors(i))
    assert _on_disk(cache) == {_key(2), _key(3)} and cache._index.total == 2 * size
    assert caplog.records and {r.name for r in caplog.records} == {logger.name}
    if damage == "loop":
        assert journal.is_file() and not journal.is_symlink()


def test_a_hit_seen_by_another_cache_object_is_respected_by_eviction(tmp_path):
    unlimited, size = _three_old_entries(tmp_path)
    a = InversionCache(tmp_path / "c", max_bytes=4 * size)
    a.store(_key(3), _tensors(3))  # a's index (a scan) has 0, 1, 2 at their old times
    assert unlimited.load(_key(0)) is not None  # a does not know: 0 is still its least recently used
    a.store(_key(4), _tensors(4))
    assert _on_disk(a) == {_key(0), _key(2), _key(3), _key(4)} and a._index.total == 4 * size
    a.store(_key(5), _tensors(5))
    assert _on_disk(a) == {_key(0), _key(3), _key(4), _key(5)}


def test_a_victim_rewritten_by_another_process_is_measured_again(tmp_path):
    a, size, _ = _cache_holding_three(tmp_path)
    p = a.path_for(_key(0))
    st = p.stat()
    InversionCache(tmp_path / "c").store(_key(0), {"latents": torch.zeros(2)})  # another size, same key
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime as before
    a.store(_key(3), _tensors(3))  # measured again, and still the least recently used: evicted
    assert _on_disk(a) == {_key(1), _key(2), _key(3)} and a._index.total == 3 * size


def test_the_entry_just_stored_is_kept_even_when_others_look_newer(tmp_path, caplog):
    """Entries with mtimes in the future (another node's clock): the new entry is the least recently used
    by the clock, but its own store never evicts it; the next ones go instead."""
    size = _size(tmp_path)
    unlimited = InversionCache(tmp_path / "c")
    future = time.time() + 1000
    for i in range(3):
        os.utime(unlimited.store(_key(i), _tensors(i)), (future + i, future + i))
    cache = InversionCache(tmp_path / "c", max_bytes=2 * size)
    with caplog.at_level(logging.WARNING):
        cache.store(_key(3), _tensors(3))
        assert _on_disk(cache) == {_key(2), _key(3)} and cache._index.total == 2 * size
        cache.store(_key(4), _tensors(4))
    assert _on_disk(cache) == {_key(2), _key(4)} and cache._index.total == 2 * size
    assert not caplog.records


def test_eviction_forgets_vanished_victims(tmp_path):
    size = _size(tmp_path)
    cache = InversionCache(tmp_path / "c", max_bytes=3 * size)
    for i in range(3):
        cache.store(_key(i), _tensors(i))
    cache.path_for(_key(0)).unlink()  # deleted by hand: forgetting it is room enough
    cache.store(_key(3), _tensors(3))
    assert _on_disk(cache) == {_key(1), _key(2), _key(3)} and cache._index.total == 3 * size
    cache.path_for(_key(1)).unlink()  # deleted by hand, but the new entry is larger: 2 is evicted too
    big = cache.store(_key(4), {"latents": torch.ones(48, 8, 8)}).stat().st_size
    assert size < big <= 2 * size
    assert _on_disk(cache) == {_key(3), _key(4)} and cache._index.total == size + big


def test_eviction_skips_a_victim_it_cannot_stat(tmp_path, caplog):
    size = _size(tmp_path)
    cache = InversionCache(tmp_path / "c", max_bytes=3 * size)
    for i in range(3):
        cache.store(_key(i), _tensors(i))
    looped = cache.path_for(_key(0))
    looped.unlink()
    looped.symlink_to(looped.name)  # cannot even be stat-ed
    with caplog.at_level(logging.WARNING):
        cache.store(_key(3), _tensors(3))
    assert looped.is_symlink() and _on_disk(cache) == {_key(2), _key(3)}  # (the loop is no entry)
    # (a victim put back can be met twice in one store when the journal restated it: warned each time)
    assert caplog.records and all(str(looped) in r.getMessage() for r in caplog.records)
    assert cache._index.total == 3 * size  # the unstatable one is still counted


def test_eviction_skips_an_entry_it_cannot_remove(tmp_path, caplog):
    size = _size(tmp_path)
    root = tmp_path / "c"
    stuck = root / _key(9)[:2] / f"{_key(9)}.safetensors"
    stuck.mkdir(parents=True)  # found by the scan, but unlink refuses a folder
    os.utime(stuck, (time.time() - 100, time.time() - 100))
    cache = InversionCache(root, max_bytes=stuck.stat().st_size + 2 * size)
    with caplog.at_level(logging.WARNING):
        for i in range(4):
            cache.store(_key(i), _tensors(i))
    assert _on_disk(cache) == {_key(9), _key(2), _key(3)}
    assert caplog.records and all(str(stuck) in r.getMessage() for r in caplog.records)


def test_the_lru_order_stays_right_and_bounded_under_many_hits(tmp_path):
    cache = InversionCache(tmp_path)
    index = cache._index
    keys = [f"{i:02x}" * 8 for i in range(3)]
    for i, k in enumerate(keys):
        index.set(k, 10, float(i))
    for t in range(1, 1500):  # hits leave stale items behind in the heap, which is compacted
        index.touch(keys[0], 10.0 + t)
        assert len(index._heap) <= 2 * len(index.sizes) + 1000 + 1
    assert index.total == 30
    assert [index.pop_lru() for _ in range(4)] == [keys[1], keys[2], keys[0], None]


def test_pruning_a_limited_cache_is_journaled_for_the_other_objects(tmp_path):
    a, size, (b,) = _cache_holding_three(tmp_path, others=1)
    b.store(_key(3), _tensors(3))  # b's index: 1, 2, 3
    assert [e.key for e in a.prune(size)] == [_key(1), _key(2)]
    b.store(_key(4), _tensors(4))  # b reads a's evictions: room for both without evicting
    assert _on_disk(a) == {_key(3), _key(4)} and b._index.total == 2 * size


def test_a_hit_moves_the_entry_to_the_recent_end_of_this_objects_order(tmp_path):
    """The order in memory, not only the entry's mtime: a hit stays recent for this object even if the file's
    time is set back afterwards (a copy or restore that keeps times)."""
    cache, size, _ = _cache_holding_three(tmp_path)
    first = cache.path_for(_key(0))
    st = first.stat()
    assert cache.load(_key(0)) is not None
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    cache.store(_key(3), _tensors(3))
    assert _on_disk(cache) == {_key(0), _key(2), _key(3)}
