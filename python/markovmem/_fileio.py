"""Atomic writes shared by every file and directory markovmem writes from Python.

A file is written to a unique temporary next to its target (``<name>.tmp-<pid>-<hex>``,
the pattern the C++ writer uses too), flushed and fsynced, renamed over the target, and
the directory is fsynced, so a reader sees the old file or the whole new one and a crash
never leaves a torn file.  Temporaries left by a killed writer are removed by the next
write to the same target once their process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_publish_dir", "atomic_write", "remove_stale_temps"]

#: Infix between a target's name and the owner pid in its temporaries.
TMP_INFIX = ".tmp-"


def _temp_name(target: Path) -> Path:
    return target.with_name(f"{target.name}{TMP_INFIX}{os.getpid()}-{secrets.token_hex(6)}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries of ``target`` whose writing process no longer exists.

    Only names ``<target name>.tmp-<pid>-<suffix>`` next to ``target`` are
    considered; those of live processes (a concurrent writer) are kept.

    Returns
    -------
    list of pathlib.Path
        The temporaries removed.
    """
    target = Path(target)
    pattern = re.compile(re.escape(target.name + TMP_INFIX) + r"(\d+)-[0-9A-Za-z]+$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another writer cleaned it first
            continue
        removed.append(Path(entry.path))
    return removed


def _fsync_dir(directory: Path) -> None:
    # Makes a rename durable; some filesystems refuse fsync on directories (best effort).
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], content: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write a file atomically: unique temporary, fsync, rename over ``path``, fsync of the directory.

    The file gets the mode ``open(path, "wb")`` would give a new file
    (``0o666`` less the umask).  Any error leaves ``path`` as it was and
    removes the temporary.

    Parameters
    ----------
    path : path
        File to write; its directory must exist.
    content : bytes or callable
        The bytes, or a function writing them to the binary file object it is given.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    remove_stale_temps(path)
    while True:
        tmp = _temp_name(path)
        try:
            # O_EXCL: the name is ours alone; mode 0o666 lets the umask decide, as open() does.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_publish_dir(path: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name, fsync it, then rename it to ``path``.

    ``fill(tmp_dir)`` writes the contents.  An existing directory at ``path``
    is replaced only when every entry in it is one the new directory also holds
    (a previous export of the same kind: nothing of the user's is lost); the
    swap is one atomic exchange where the OS supports it (Linux), otherwise two
    renames.  Any error leaves ``path`` as it was.

    Raises
    ------
    NotADirectoryError
        ``path`` exists and is not a directory.
    FileExistsError
        ``path`` is a directory holding entries the new one would not replace.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_name(path)
    os.mkdir(tmp, 0o777)  # the umask decides the final mode, as for any new directory
    leftover: Path | None = tmp  # what to remove at the end: the unpublished or the replaced directory
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if path.is_dir():
            extra = sorted(set(os.listdir(path)) - set(os.listdir(tmp)))
            if extra:
                raise FileExistsError(
                    f"{str(path)!r} holds {extra[:5]} that the new directory would not replace; "
                    "remove the directory or choose another path"
                )
            if not _exchange(tmp, path):
                old = _temp_name(path)
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                leftover = old
        else:
            os.rename(tmp, path)
            leftover = None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if leftover is not None:  # after the exchange, tmp names the previous directory
        shutil.rmtree(leftover, ignore_errors=True)
    return path
