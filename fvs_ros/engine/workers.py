"""Engine worker threads that cannot die unnoticed.

Each worker loop catches the failure of one job itself (the job fails with its reason, the loop
goes on). What still escapes a loop (a bug in the loop, an error raised while reporting an error)
ends that thread: WorkerWatch records which worker stopped and why, and calls `on_death` so the
engine fails the requests waiting on it and refuses new ones with the reason (stats().worker_failure;
the node goes ERROR in /diagnostics).
"""

from __future__ import annotations

import threading
import traceback
from typing import Callable, Optional


class WorkerWatch:
    """Starts worker threads and remembers the first one that died."""

    def __init__(self, on_death: Callable[[str], None]):
        self._on_death = on_death
        self._lock = threading.Lock()
        self._failure: Optional[str] = None

    @property
    def failure(self) -> Optional[str]:
        """'<worker> stopped: <error>' of the first worker that died; None while all run."""
        return self._failure

    def thread(self, name: str, loop: Callable[[], None]) -> threading.Thread:
        """A daemon thread running `loop`; an exception that ends it is recorded, not lost."""
        return threading.Thread(
            target=self._run, args=(name, loop), name=f"fvs-{name.lower().replace(' ', '-')}", daemon=True
        )

    def _run(self, name: str, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # noqa: BLE001 - whatever ended the thread is the reason
            reason = f"the {name} stopped: {type(e).__name__}: {e}"
            with self._lock:
                first = self._failure is None
                if first:
                    self._failure = reason
            if first:
                traceback.print_exception(e)  # logging itself may be what failed
                self._on_death(reason)
