"""The node's /diagnostics status: counters of the engine and the image intake, and a level that
says whether frames are being lost now (not whether one ever was).

Level: WARN while any frame was dropped (unsupported, malformed, refused by the engine, failed) or
restamped within the last WINDOW_S seconds, or while stamps jumped or frames were resized to the
memory's input size within it (Recent), or after an engine or callback error, or when the memory
file could not be restored, or while the node clock reads 0; ERROR when the engine stopped (a
worker thread that died says why), or when at least ERROR_MIN_FRAMES frames arrived within
WINDOW_S and none of them was usable (the node is blind).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

WINDOW_S = 10.0
ERROR_MIN_FRAMES = 10


class Health:
    """Keeps (time, received, dropped, restamped) samples of the intake counters over WINDOW_S."""

    def __init__(self):
        self._samples: deque = deque()

    def level(self, counters, stopped: bool, problems: list[str]) -> tuple[bytes, str]:
        """(level, message) for the intake counters now; `problems`: other reasons for WARN."""
        now = time.monotonic()
        dropped = counters.unsupported + counters.malformed + counters.rejected + counters.failed
        self._samples.append((now, counters.received, dropped, counters.restamped))
        while now - self._samples[0][0] > WINDOW_S and len(self._samples) > 1:
            self._samples.popleft()
        _, received0, dropped0, restamped0 = self._samples[0]
        received, lost, restamped = (
            counters.received - received0,
            dropped - dropped0,
            counters.restamped - restamped0,
        )
        if received < 0 or lost < 0:  # counters were reset (cleanup, ~/reset): start the window over
            self._samples.clear()
            self._samples.append((now, counters.received, dropped, counters.restamped))
            received = lost = restamped = 0
        if stopped:
            return DiagnosticStatus.ERROR, f"engine stopped: {problems[0]}" if problems else "engine stopped"
        if received >= ERROR_MIN_FRAMES and lost == received:
            return DiagnosticStatus.ERROR, f"all {received} frames of the last {WINDOW_S:g} s were dropped"
        if lost or restamped:
            return DiagnosticStatus.WARN, (
                f"{lost} of {received} frames dropped, {restamped} restamped in the last {WINDOW_S:g} s"
            )
        if problems:
            return DiagnosticStatus.WARN, problems[0]
        return DiagnosticStatus.OK, ""


class Recent:
    """A counter's note while the counter rose within the last WINDOW_S seconds (e.g. stamp jumps):
    a WARN that says what happened and clears once it stops happening."""

    def __init__(self):
        self._count, self._at = 0, -float("inf")

    def problem(self, count: int, note: Optional[str]) -> str:
        now = time.monotonic()
        if count > self._count:
            self._at = now
        self._count = count
        return (note or "") if now - self._at <= WINDOW_S else ""


def status(name: str, hardware_id: str, level: bytes, message: str, values: dict) -> DiagnosticStatus:
    return DiagnosticStatus(
        name=name,
        hardware_id=hardware_id,
        level=level,
        message=message,
        values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
    )


def fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"
