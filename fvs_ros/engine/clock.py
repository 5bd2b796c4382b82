"""The stream clock: the one rule that turns frame stamps into the stream's time, and back.

Every frame has two times:
- its *stamp*, the image header's own (seconds). Every stamp the engine reports (an answer's first
  and last stamp, evidence, summaries, watch results) is a frame's own stamp (stamp_of);
- its *stream time*, which never decreases: the memory orders its slots by it and the sampling
  rate (memory_fps) counts it.

A source clock is an offset (stream time = stamp + offset) and the stamp and arrival of its latest
frame. A frame continues the recent source clock it fits: its stamp is not older than that clock's
latest and has not run ahead of it by more than the arrival time since, plus `slack_s`; of several,
the one giving the earliest stream time (a clock left behind the stream, because another one
leapt ahead meanwhile, goes on from where the stream is: a jump, counted). A frame that fits none:
- stamped after the current clock's latest (a pause, a replay faster than real time, one frame
  restamped with another clock): the stream time leaps with the stamps, on a clock of its own
  with the current clock's offset, so the current clock's frames still fit it afterwards;
- stamped before it (a camera clock restarting, one frame delivered late, a second publisher with
  another clock, stamps running backwards): a new source clock starts where the stream is, plus
  the arrival time since the previous frame (a jump, counted). The previous clocks stay known, so
  the frames after one odd frame continue their own clock, and two clocks on one topic each keep
  theirs: the stream time moves at the cameras' pace and memory_fps holds.
A stamp is valid within +-STAMP_LIMIT_S, the range builtin_interfaces/Time holds (int32 seconds).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

STAMP_LIMIT_S = float(2**31)  # |stamp| below this: builtin_interfaces/Time's int32 seconds
MAX_SOURCES = 4  # recent source clocks a frame may continue
MAX_OFFSETS = 1024  # stream time -> stamp offsets kept for reporting (one per change, sampled frames)


@dataclass
class _Source:
    offset: float  # stream time = stamp + offset
    stamp: float  # stamp of its latest frame
    arrival: float  # arrival (now()) of its latest frame


@dataclass(frozen=True)
class Placement:
    """Where a frame stamped `stamp` lands (StreamClock.place); nothing changes until commit()."""

    stamp: float
    time: float  # stream time
    arrival: float
    source: Optional[_Source]  # the clock it continues; None: a new one
    jump: bool  # its stamp went back (a new source clock) or its clock was left behind the stream


class StreamClock:
    """Stream time of each frame, and each reported stream time's own frame stamp (stamp_of)."""

    def __init__(self, slack_s: float = 1.0, now: Callable[[], float] = time.monotonic):
        self.slack_s, self.now = slack_s, now
        self.reset()

    def reset(self) -> None:
        self._sources: list[_Source] = []  # most recently used first
        self._last: Optional[float] = None  # stream time of the newest frame
        self._last_arrival: Optional[float] = None
        self._times: list[float] = []  # stream times where the stamp offset changed (ascending) ...
        self._offsets: list[float] = []  # ... and the offset from there on

    @property
    def last(self) -> Optional[float]:
        """Stream time of the newest frame; None before the first."""
        return self._last

    @staticmethod
    def check(stamp) -> float:
        """The stamp as a float; ValueError unless it is a finite number within +-STAMP_LIMIT_S."""
        try:
            stamp = float(stamp)
        except (TypeError, ValueError):
            raise ValueError(f"stamp must be a number of seconds, got {stamp!r}") from None
        if not math.isfinite(stamp):
            raise ValueError(f"stamp must be finite, got {stamp}")
        if abs(stamp) >= STAMP_LIMIT_S:
            raise ValueError(
                f"stamp {stamp:g} s is outside +-2^31 s, the range a ROS time (int32 seconds) holds"
            )
        return stamp

    def place(self, stamp: float) -> Placement:
        """The stream time of a frame stamped `stamp` arriving now (the module's rule)."""
        arrival = self.now()
        if self._last is None:
            return Placement(stamp, stamp, arrival, None, False)
        fits = [
            s
            for s in self._sources
            if s.stamp <= stamp <= s.stamp + max(0.0, arrival - s.arrival) + self.slack_s
        ]
        here = self._last + max(0.0, arrival - self._last_arrival)  # where the stream is now
        if fits:
            source = min(fits, key=lambda s: stamp + s.offset)
            t = stamp + source.offset
            if t >= self._last:
                return Placement(stamp, t, arrival, source, False)
            # Behind the stream (another clock leapt ahead meanwhile): this clock goes on from here.
            return Placement(stamp, here, arrival, source, True)
        current = self._sources[0]
        t = stamp + current.offset
        if stamp >= current.stamp and t < STAMP_LIMIT_S:  # a leap: a clock of its own, the current offset
            return Placement(stamp, t, arrival, None, False)
        return Placement(stamp, here, arrival, None, True)

    def commit(self, p: Placement) -> None:
        """The stream is now at the frame placed as `p`."""
        source = p.source
        if source is None:
            source = _Source(p.time - p.stamp, p.stamp, p.arrival)
        else:
            self._sources.remove(source)
            source.offset, source.stamp, source.arrival = p.time - p.stamp, p.stamp, p.arrival
        self._sources = [source, *self._sources][:MAX_SOURCES]
        self._last, self._last_arrival = p.time, p.arrival

    def record(self, p: Placement) -> None:
        """A frame placed as `p` enters memory: its stream time must report its own stamp."""
        offset = p.time - p.stamp
        if self._offsets and self._offsets[-1] == offset:
            return
        self._times.append(p.time)
        self._offsets.append(offset)
        if len(self._times) > 2 * MAX_OFFSETS:  # amortized trim: the oldest changes go
            del self._times[:-MAX_OFFSETS], self._offsets[:-MAX_OFFSETS]

    def stamp_of(self, t: Optional[float]) -> Optional[float]:
        """The frame stamp a stream time in memory stands for (a mean of several: on the clock of the
        latest frame entered at or before it); None stays None."""
        if t is None:
            return None
        t = float(t)
        i = bisect.bisect_right(self._times, t) - 1
        offset = self._offsets[max(i, 0)] if self._offsets else 0.0
        return t - offset

    # ----------------------------------------------------------------- saved state

    def state(self) -> dict:
        """JSON-able: the current source clock and the offsets of the stream times in memory."""
        current = self._sources[0] if self._sources else None
        return {
            "last": self._last,
            "source": None if current is None else [current.offset, current.stamp],
            "offsets": [[t, o] for t, o in zip(self._times, self._offsets, strict=True)],
        }

    @classmethod
    def checked_state(cls, state) -> dict:
        """A saved state() checked field by field; ValueError names the first bad one."""
        if not isinstance(state, dict) or set(state) != {"last", "source", "offsets"}:
            raise ValueError(f"clock must be an object with last, source and offsets, got {state!r}")
        if state["last"] is not None:
            _check_time("clock.last", state["last"])
        if state["source"] is not None:
            if not isinstance(state["source"], list) or len(state["source"]) != 2:
                raise ValueError(f"clock.source must be [offset, stamp] or null, got {state['source']!r}")
            _check_time("clock.source offset", state["source"][0], 2 * STAMP_LIMIT_S)
            _check_time("clock.source stamp", state["source"][1])
        if (state["last"] is None) != (state["source"] is None):
            raise ValueError("clock.last and clock.source must both be set or both null")
        offsets = state["offsets"]
        if not isinstance(offsets, list) or len(offsets) > 2 * MAX_OFFSETS:
            raise ValueError(f"clock.offsets must be a list of at most {2 * MAX_OFFSETS} pairs")
        previous = -math.inf
        for pair in offsets:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"clock.offsets holds {pair!r}, not a [time, offset] pair")
            _check_time("clock.offsets time", pair[0])
            _check_time("clock.offsets offset", pair[1], 2 * STAMP_LIMIT_S)
            if pair[0] < previous:
                raise ValueError("clock.offsets times must not decrease")
            previous = pair[0]
        return state

    def restore(self, state: dict) -> None:
        """Continue from a checked_state(): the saved clock counts as just seen."""
        self.reset()
        self._last = state["last"]
        if state["source"] is not None:
            offset, stamp = state["source"]
            self._last_arrival = self.now()
            self._sources = [_Source(float(offset), float(stamp), self._last_arrival)]
        self._times = [float(t) for t, _ in state["offsets"]]
        self._offsets = [float(o) for _, o in state["offsets"]]


def legacy_state(last: Optional[float], stamp_offset: float) -> dict:
    """The clock state of a save written before the stream clock (one offset for all of it)."""
    if last is None:
        return {"last": None, "source": None, "offsets": []}
    return {
        "last": last,
        "source": [stamp_offset, last - stamp_offset],
        "offsets": [[-STAMP_LIMIT_S + 1, stamp_offset]],
    }


def _check_time(name: str, value, limit: float = STAMP_LIMIT_S) -> None:
    """ValueError unless `value` is a finite number of seconds within +-limit (a range rule: 1e300 is
    finite and still no time a stream can hold)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if abs(value) >= limit:
        raise ValueError(f"{name} {value:g} s is outside +-{limit:g} s (a ROS time holds int32 seconds)")
