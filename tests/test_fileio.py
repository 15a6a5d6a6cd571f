"""markovmem._fileio: atomic file writes and directory publishes, the mode they give,
and the removal of temporaries left by killed writers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from markovmem._fileio import TMP_INFIX, atomic_publish_dir, atomic_write, remove_stale_temps


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_atomic_write_bytes_and_callback(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_mode_follows_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "f", b"x")
        atomic_publish_dir(tmp_path / "d", lambda d: (d / "a").write_bytes(b"x"))
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "f").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "f.safetensors"
    dead = tmp_path / f"f.safetensors{TMP_INFIX}{dead_pid()}-abc123"
    dead.write_bytes(b"x" * 100)
    dead_dir = tmp_path / f"f.safetensors{TMP_INFIX}{dead_pid()}-def456"
    dead_dir.mkdir()
    (dead_dir / "inner").write_bytes(b"y")
    live = tmp_path / f"f.safetensors{TMP_INFIX}{os.getpid()}-fff000"
    live.write_bytes(b"mine")
    other = tmp_path / f"g.safetensors{TMP_INFIX}{dead_pid()}-abc123"
    other.write_bytes(b"another target's")
    atomic_write(path, b"new")
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, live.name, other.name])
    assert remove_stale_temps(tmp_path / "g.safetensors") == [other]


def test_kill_during_save_leaves_old_file_and_next_save_cleans(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"old")
    # A writer killed by SIGKILL in the middle of its callback.
    code = (
        "import os, signal, sys; from markovmem._fileio import atomic_write\n"
        "def half(f):\n    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(path)!r}, half)\n"
    )
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code], check=False, timeout=120)
        assert proc.returncode == -9
    assert path.read_bytes() == b"old"
    # Each save removed the temporary of the writer killed before it: at most one is left.
    assert len(os.listdir(tmp_path)) == 2
    atomic_write(path, b"new")
    assert os.listdir(tmp_path) == ["f"]
    assert path.read_bytes() == b"new"


def test_publish_dir_replaces_only_a_directory_it_rewrites(tmp_path):
    path = tmp_path / "export"

    def fill(d):
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"w")

    atomic_publish_dir(path, fill)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    (path / "model.safetensors").write_bytes(b"old")
    atomic_publish_dir(path, fill)
    assert (path / "model.safetensors").read_bytes() == b"w"
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        atomic_publish_dir(path, fill)
    assert (path / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["export"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        atomic_publish_dir(tmp_path / "file", fill)


def test_failed_publish_leaves_the_old_directory(tmp_path):
    path = tmp_path / "export"
    atomic_publish_dir(path, lambda d: (d / "a").write_text("old"))

    def boom(d):
        (d / "a").write_text("half")
        raise RuntimeError("no space")

    with pytest.raises(RuntimeError, match="no space"):
        atomic_publish_dir(path, boom)
    assert (path / "a").read_text() == "old"
    assert os.listdir(tmp_path) == ["export"]
