"""Crash-safe files (no ROS, no torch): written to a temporary name, fsynced and renamed, the
directory fsynced after each rename; and a path moved aside, never overwritten."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

TMP_PREFIX = ".tmp-"


def atomic_write(path: Path, write: Callable, mode: str = "wb") -> None:
    """Write `path` through `write(file)` to a temporary name, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
