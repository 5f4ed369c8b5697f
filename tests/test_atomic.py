import os, stat
from pathlib import Path
import pytest
from vidbatch.core.atomic import (atomic_open, atomic_path, atomic_write, umask_by_setting, umask_file_mode,
                                 umask_from_proc)

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


@pytest.fixture
def umask():
    """Sets the process umask for a test and puts the old one back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_umask_file_mode_is_the_mode_open_gives_a_new_file(tmp_path, umask, mask, mode):
    umask(mask)
    with open(tmp_path / "new", "w"):
        pass
    assert umask_file_mode() == stat.S_IMODE((tmp_path / "new").stat().st_mode) == mode


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_both_ways_of_reading_the_umask_agree_and_leave_it_as_it_was(umask, mask):
    umask(mask)
    assert umask_by_setting() == mask
    assert umask_from_proc() in (mask, None)        # None: no /proc (not Linux)
    assert umask(mask) == mask                      # still set as it was


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_umask_file_mode_reads_proc_and_never_sets_the_umask(umask, monkeypatch):
    """Setting the umask to read it is process-wide: a thread creating a file at that moment would get
    the wrong mode. Where /proc shows the umask, it is read from there."""
    umask(0o027)
    calls = []

    def watched_umask(mask: int) -> int:
        calls.append(mask)
        return umask(mask)

    monkeypatch.setattr(os, "umask", watched_umask)
    assert umask_from_proc() == 0o027 and umask_file_mode() == 0o640
    assert calls == []
