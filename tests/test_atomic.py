import os, stat
from pathlib import Path
import pytest
from vidbatch.core.atomic import atomic_open, atomic_write, atomic_path

def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]

def test_library_path_write_is_published_only_on_success(tmp_path):
    target = tmp_path / "b.bin"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"y")
    assert target.read_bytes() == b"y"

def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "c", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o644
