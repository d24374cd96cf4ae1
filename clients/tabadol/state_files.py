"""Small state files a process keeps for itself (the newest CRL it took): written so that a
local writer of the directory cannot turn the write against another file, read only when
they are what they claim to be."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class StateFileRefused(OSError):
    """The path holds something other than a regular file (a symlink, a directory...)."""


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` in one step: a new temporary file in the same directory
    (created exclusively, so a planted symlink is never followed), its mode set on the
    descriptor, synced, then renamed over ``path`` (which replaces a symlink, not its target)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)  # the rename itself survives a crash


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that names created, renamed or removed in it survive a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the data itself is synced
    finally:
        os.close(fd)


def read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symlink): FileNotFoundError when
    there is nothing there, StateFileRefused when something else is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if path.is_symlink():
            raise StateFileRefused(f"{path} is a symbolic link, not the file kept here") from e
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StateFileRefused(f"{path} is not a regular file")
        return f.read()
