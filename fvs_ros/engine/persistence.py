"""Crash-safe files for a saved memory (no ROS, no torch).

A saved memory is a directory holding `engine.json` and the memory file it names
(`memory-<n>.pt`). Every file is written to a temporary name, fsynced and renamed, and the
directory is fsynced after each rename. A save writes a new memory file beside the old one,
then replaces `engine.json` (the commit point), then deletes the old memory file: a process
killed at any point leaves either the previous save or the new one readable, never neither.
A directory that cannot be restored is moved aside (fvs_ros.common.files.move_aside), never
overwritten.

Only a directory of ours is ever read, moved or written: one holding the marker file (`MARKER`),
written when a save or the watcher (`watch.json`, the node's standing conditions) first writes
into a directory, or, for directories saved before the marker existed, an `engine.json` or
`watch.json` of our formats. A missing path or an empty directory becomes ours at the first
write. Anything else (a mistyped `memory_file` naming /etc or someone's file) raises ForeignPath
and is left as it is. `engine.json` is the commit point: a directory of ours without it holds no
saved memory yet (conditions only, or a first save killed before its commit).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

from fvs_ros.common.files import TMP_PREFIX, atomic_write, fsync_dir

INDEX = "engine.json"
WATCH_FILE = "watch.json"  # the standing conditions (fvs_ros.engine.watch), beside the memory
MARKER = ".fvs_ros-memory"
_MARKER_TEXT = "A memory directory of fvs_ros (Flash-VStream node): engine.json, memory-*.pt, watch.json.\n"
_OWN_TEMPS = (f"{TMP_PREFIX}{INDEX}.", f"{TMP_PREFIX}memory")  # what a killed save leaves behind
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


class ForeignPath(ValueError):
    """The path holds something fvs_ros did not write: it is never read, moved aside or written."""


def check_ours(path: Path) -> None:
    """ForeignPath unless `path` is missing, an empty directory or a memory directory of ours."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    advice = "give memory_file a new or empty directory, or one fvs_ros saved into"
    if not path.is_dir():
        raise ForeignPath(f"{path} is a file, not a memory directory: fvs_ros leaves it as it is; {advice}")
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise ForeignPath(f"{path} cannot be listed ({e}): fvs_ros leaves it as it is; {advice}") from e
    if not names or MARKER in names and (path / MARKER).is_file():
        return
    if _our_json(path / INDEX, "counters") or _our_json(path / WATCH_FILE, "conditions"):
        return  # saved before the marker existed
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    raise ForeignPath(
        f"{path} holds no memory of fvs_ros (no {MARKER} marker, no {INDEX} or {WATCH_FILE} of ours; "
        f"it holds {shown}): fvs_ros leaves it as it is; {advice} (a save of an older version "
        f"with a damaged {INDEX}: add an empty {MARKER} file to it)"
    )


def claim(path: Path) -> Path:
    """Make `path` a memory directory of ours before writing into it: create it if missing and write
    the marker; ForeignPath (nothing written) if it holds something else."""
    path = Path(path)
    check_ours(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent)
    if not (path / MARKER).is_file():
        atomic_write(path / MARKER, lambda f: f.write(_MARKER_TEXT), "w")
    return path


def _our_json(path: Path, key: str) -> bool:
    """Whether `path` is a JSON object with an integer `format` and `key`: a file of ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("format"), int) and key in data


def write_saved(path: Path, write_memory: Callable, index: dict) -> Path:
    """Save into directory `path` (claimed first): a new memory file through `write_memory(file)`,
    then the index (`index` plus the memory file's name) that commits it; older memory files and
    what killed saves left behind go last."""
    path = claim(path)
    name = f"memory-{time.time_ns()}.pt"
    atomic_write(path / name, _reporting_os_errors(write_memory))
    atomic_write(path / INDEX, lambda f: f.write(json.dumps({**index, "memory_file": name}, indent=1)), "w")
    for old in path.iterdir():
        if old.name != name and (_MEMORY_NAME.fullmatch(old.name) or old.name.startswith(_OWN_TEMPS)):
            old.unlink(missing_ok=True)
    return path / name


def read_saved(path: Path) -> tuple[dict, Path]:
    """(index, memory file) of the save in directory `path`.

    Raises ForeignPath when `path` is not ours (check_ours), NothingSaved when nothing is saved
    there (no path, an empty directory, or one of ours without the commit point engine.json),
    SavedStateError when a save is there but cannot be read back."""
    path = Path(path)
    check_ours(path)
    if not (path / INDEX).exists() and not (path / INDEX).is_symlink():
        raise NothingSaved(f"no saved engine state in {path} (no {INDEX})")
    if not (path / INDEX).is_file():
        raise SavedStateError(f"{path / INDEX} is not a regular file")
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
