"""The node's memory_file: restored at activate, saved crash-safe (fvs_ros.engine.persistence through
StreamEngine.save), and a save that cannot be restored moved aside, never overwritten. A path that
holds something the node did not write (persistence.check_ours) is refused: configure and activate
fail with the reason, and the path is left as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fvs_ros.common.files import move_aside
from fvs_ros.engine.persistence import ForeignPath, NothingSaved, check_ours


def check_memory_file(path: str) -> None:
    """ValueError (ForeignPath) naming the path unless memory_file is '' (off) or may be ours."""
    if path:
        try:
            check_ours(Path(path).expanduser())
        except ForeignPath as e:
            raise ForeignPath(f"memory_file {e}") from None


class MemoryFile:
    """One memory_file directory; `problem` says why it was not restored or cannot be saved."""

    def __init__(self, path: str, logger):
        self.path = Path(path).expanduser()
        self.logger = logger
        self.problem = ""
        self._blocked = ""  # the directory must not be written: it could be neither restored nor moved aside
        self._saved: Optional[tuple] = None  # (memory version, frames in) of the last save or restore

    def restore(self, engine) -> dict:
        """Load the saved memory into `engine`; the caller's `extra` saved with it ({} if none).

        Raises ForeignPath (nothing read, moved or written) when the path is not a memory of ours."""
        try:
            extra = engine.load(self.path)
        except NothingSaved:
            return {}
        except ForeignPath as e:  # checked before anything is read: never moved aside
            raise ForeignPath(f"memory_file {e}") from None
        except Exception as e:  # noqa: BLE001 - an unreadable file must not keep the camera off
            try:
                aside = f"moved aside to {move_aside(self.path)}"
            except OSError as move_error:
                self._blocked = f"{self.path} could be neither restored nor moved aside ({move_error})"
                aside = self._blocked
            self.problem = f"memory_file {self.path} not restored ({e}); {aside}"
            frames = engine.stats().frames_seen
            self.logger.error(f"{self.problem}; going on with the memory in use ({frames} frames)")
            return {}
        s = engine.stats()
        self._saved = (s.memory_version, s.frames_in)
        self.logger.info(f"memory restored from {self.path} ({s.frames_seen} frames seen)")
        return extra

    def save(self, engine, extra: dict, flush: bool) -> tuple[bool, str]:
        """Save now (after flushing queued frames if `flush`); (success, message), logged."""
        if self._blocked:
            message = f"not saving to {self.path}: {self._blocked}"
            self.logger.error(message, throttle_duration_sec=60.0)
            return False, message
        try:
            if flush:
                engine.flush(timeout=5.0)
            s = engine.stats()
            engine.save(self.path, extra=extra)
        except Exception as e:  # noqa: BLE001 - a failed save is reported, intake goes on
            message = f"saving memory to {self.path} failed: {type(e).__name__}: {e}"
            self.problem = message
            self.logger.error(message, throttle_duration_sec=10.0)
            return False, message
        self._saved = (s.memory_version, s.frames_in)
        message = f"memory saved to {self.path} ({s.frames_seen} frames seen)"
        (self.logger.info if flush else self.logger.debug)(message)
        return True, message

    def save_if_changed(self, engine, extra: dict):
        """The periodic save: only when memory or the stream moved on since the last save."""
        s = engine.stats()
        if (s.memory_version, s.frames_in) != self._saved:
            self.save(engine, extra, flush=False)
