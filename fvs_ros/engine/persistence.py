"""Crash-safe files for a saved memory (no ROS, no torch).

A saved memory is a directory holding `engine.json` and the memory file it names
(`memory-<n>.pt`). Every file is written to a temporary name, fsynced and renamed, and the
directory is fsynced after each rename. A save writes a new memory file beside the old one,
then replaces `engine.json` (the commit point), then deletes the old memory file: a process
killed at any point leaves either the previous save or the new one readable, never neither.
A directory that cannot be restored is moved aside (fvs_ros.common.files.move_aside), never
overwritten.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

from fvs_ros.common.files import TMP_PREFIX, atomic_write, fsync_dir
from fvs_ros.engine.watch import WATCH_FILE

INDEX = "engine.json"
COMPANIONS = {WATCH_FILE}  # files saved beside a memory, on their own schedule: not part of a save
_MEMORY_NAME = re.compile(r"memory(-\d+)?\.pt")  # memory.pt: the layout before format 2


class SavedStateError(ValueError):
    """A saved memory directory exists but cannot be read back (unreadable, corrupt, incompatible)."""


class NothingSaved(FileNotFoundError):
    """No saved memory at that path (nothing to restore: not an error)."""


class _WriteErrors:
    """A binary file that remembers the first OSError its write() raised. A serializer that catches
    it and raises its own error instead (torch.save: "[enforce fail at inline_container.cc]
    unexpected pos") would otherwise hide the reason, such as "No space left on device"."""

    def __init__(self, file):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


def _reporting_os_errors(write: Callable) -> Callable:
    """`write(file)` whose failure is the OSError the file raised, if the file raised one."""

    def wrapped(file):
        recorder = _WriteErrors(file)
        try:
            write(recorder)
        except Exception as e:
            if recorder.error is not None and e is not recorder.error:
                raise recorder.error from e
            raise

    return wrapped


def write_saved(path: Path, write_memory: Callable, index: dict) -> Path:
    """Save into directory `path`: a new memory file through `write_memory(file)`, then the index
    (`index` plus the memory file's name) that commits it; older memory files go last. A write the
    file system refuses raises its OSError (ENOSPC: "No space left on device")."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)
    name = f"memory-{time.time_ns()}.pt"
    atomic_write(path / name, _reporting_os_errors(write_memory))
    atomic_write(path / INDEX, lambda f: f.write(json.dumps({**index, "memory_file": name}, indent=1)), "w")
    for old in path.iterdir():
        if old.name != name and (_MEMORY_NAME.fullmatch(old.name) or old.name.startswith(TMP_PREFIX)):
            old.unlink(missing_ok=True)
    return path / name


def read_saved(path: Path) -> tuple[dict, Path]:
    """(index, memory file) of the save in directory `path`.

    Raises NothingSaved when there is nothing at `path` (or an empty directory), SavedStateError
    when something is there but is not a complete save."""
    path = Path(path)
    # The watched conditions (watch.json) may be saved there before the memory ever is.
    if not path.exists() or (path.is_dir() and all(p.name in COMPANIONS for p in path.iterdir())):
        raise NothingSaved(f"no saved engine state in {path} (expected {INDEX} and a memory file)")
    if not (path / INDEX).is_file():
        raise SavedStateError(f"{path} holds no {INDEX}")
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SavedStateError(f"{path / INDEX} is not readable JSON: {e}") from e
    if not isinstance(index, dict):
        raise SavedStateError(f"{path / INDEX} is not a JSON object")
    name = index.get("memory_file", "memory.pt")
    if not isinstance(name, str) or not _MEMORY_NAME.fullmatch(name):
        raise SavedStateError(f"{path / INDEX}: memory_file {name!r} is not a memory file name")
    if not (path / name).is_file():
        raise SavedStateError(f"{path / INDEX} names {name}, which is missing")
    return index, path / name
