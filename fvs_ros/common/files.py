"""Crash-safe files (no ROS, no torch): written to a temporary file created exclusively under a
random name, fsynced and renamed, the directory fsynced after each rename; and a path moved aside,
never overwritten."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

TMP_PREFIX = ".tmp-"


def atomic_write(path: Path, write: Callable, mode: str = "wb") -> None:
    """Write `path` through `write(file)` to a temporary file, fsync, rename, fsync the directory.

    The temporary file is created by tempfile.mkstemp in the same directory: a random name opened
    with O_CREAT | O_EXCL | O_NOFOLLOW, so nothing planted in the directory (a symlink at a name the
    writer might pick) is ever written through. The rename replaces the directory entry at `path`,
    a symlink there included, so `path` is always a regular file of ours afterwards. The file is
    readable by its owner only (mkstemp's mode 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_aside(path: Path, reason: str = "unreadable") -> Optional[Path]:
    """Rename `path` to `<path>.<reason>-<UTC time>` so nothing writes over it; None if it is not there."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target
