"""Standing queries: conditions watched on every memory update, events when they become true or false.

No ROS and no model here: the engine computes each condition's P(yes) on the newest memory
(VideoLM.score_conditions) and hands them to Watcher.update, which applies hysteresis
and returns the events; the node turns them into messages. With evidence on (the engine's
evidence_frames), each event carries the memory blocks that condition's evaluation attended to
most, measured in the same packed forward as its probability (fvs_ros/model/evidence.py).

Hysteresis, per condition with threshold t and the watcher's margin h (parameter
watch_hysteresis): a condition starts inactive; it *rises* (event, rising=True) at the first
evaluation with p >= t, and *falls* (event, rising=False) at the first later evaluation with
p < t - h. Between the two levels nothing happens, so a probability hovering around t does not
fire an event per memory update. (t = 0 rises at once and never falls; t <= h never falls once
risen.) A condition already true when it is added rises at its first evaluation.

Persistence: with a directory (the node's memory_file), every change (add, remove, a rise or a
fall) rewrites `watch.json` there crash-safely (temporary file, fsync, rename, directory
fsync): after a crash the file holds the state before or after the change, never a mix. The
directory is claimed first (fvs_ros.engine.persistence.claim): a directory created for the
conditions alone is a memory directory of ours, restored as "conditions, no memory". On
restart the conditions come back with their active flags, so a condition that was true does
not rise again unless it fell meanwhile.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from fvs_ros.common.files import atomic_write
from fvs_ros.engine.grounding import EvidenceItem
from fvs_ros.engine.persistence import WATCH_FILE, ForeignPath, claim

log = logging.getLogger(__name__)

MAX_CONDITION_CHARS = 300  # a condition is one short statement; its prompt joins 15 others in a prefill
_FORMAT = 1


class WatchError(ValueError):
    """A watch request was refused (empty condition, too many, bad threshold, unknown name, a file
    that cannot be read or written); the watched conditions are unchanged."""


@dataclass(frozen=True)
class Condition:
    name: str  # unique; the condition text when no name was given
    text: str
    threshold: float  # rises at P(yes) >= threshold


@dataclass(frozen=True)
class ConditionState:
    condition: Condition
    active: bool  # risen and not fallen since
    probability: Optional[float]  # of the latest evaluation (None: not evaluated yet)
    stamp: Optional[float]  # newest frame stamp of the memory of that evaluation


@dataclass(frozen=True)
class WatchEvent:
    """A condition became true (rising) or false again (falling) on one memory."""

    condition: Condition
    probability: float
    rising: bool
    stamp: Optional[float]  # stream time of the newest frame in the memory evaluated
    memory_version: int
    # the memory blocks this condition's evaluation attended to most (grounding.py), largest share
    # first; () when evidence is off
    evidence: tuple[EvidenceItem, ...] = ()


class Watcher:
    """The watched conditions and their states (thread-safe: the service adds and removes while the
    engine evaluates)."""

    def __init__(self, max_conditions: int = 16, hysteresis: float = 0.05, directory=None):
        if isinstance(max_conditions, bool) or not isinstance(max_conditions, int) or max_conditions < 1:
            raise ValueError(f"max_conditions must be an integer >= 1, got {max_conditions!r}")
        if not (isinstance(hysteresis, (int, float)) and 0 <= hysteresis < 1):
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        self.max_conditions = max_conditions
        self.hysteresis = float(hysteresis)
        self.path = Path(directory) / WATCH_FILE if directory else None
        self._lock = threading.Lock()
        self._states: dict[str, ConditionState] = {}  # by name, in the order added
        self.revision = 0  # bumped when conditions are added or loaded: they are due an evaluation
        self.on_added: Optional[Callable[[], None]] = None  # called after add() and load()

    # ------------------------------------------------------------------ conditions

    def add(self, text: str, threshold: float, name: str = "") -> Condition:
        """Watch a condition; raises WatchError (nothing changed) on bad input or when full."""
        condition = check_condition(text, threshold, name)
        with self._lock:
            if condition.name in self._states:
                raise WatchError(f"a condition named {condition.name!r} is already watched; remove it first")
            if len(self._states) >= self.max_conditions:
                raise WatchError(
                    f"already watching {len(self._states)} conditions, the limit (max_conditions); "
                    "remove one first"
                )
            self._commit({**self._states, condition.name: ConditionState(condition, False, None, None)})
            self.revision += 1
        self._added()
        return condition

    def remove(self, name: str) -> Condition:
        """Stop watching `name`; raises WatchError if no condition has that name."""
        with self._lock:
            state = self._states.get(name)
            if state is None:
                known = ", ".join(repr(n) for n in self._states) or "none"
                raise WatchError(f"no condition named {name!r} (watched: {known})")
            self._commit({n: s for n, s in self._states.items() if n != name})
        return state.condition

    def conditions(self) -> list[Condition]:
        with self._lock:
            return [s.condition for s in self._states.values()]

    def states(self) -> list[ConditionState]:
        with self._lock:
            return list(self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    # ------------------------------------------------------------------ evaluation

    def update(
        self,
        probabilities: Sequence[tuple[Condition, float]],
        stamp: Optional[float],
        memory_version: int,
    ) -> list[WatchEvent]:
        """Record one evaluation (each condition with its P(yes) on the memory of `stamp`) -> events.

        A condition removed (or replaced) since the evaluation started is skipped."""
        events = []
        with self._lock:
            for condition, p in probabilities:
                state = self._states.get(condition.name)
                if state is None or state.condition != condition:
                    continue
                active = state.active
                if not active and p >= condition.threshold:
                    active = True
                elif active and p < condition.threshold - self.hysteresis:
                    active = False
                if active != state.active:
                    events.append(WatchEvent(condition, float(p), active, stamp, int(memory_version)))
                self._states[condition.name] = ConditionState(condition, active, float(p), stamp)
            if events and self.path is not None:
                try:
                    self._write(self._states)
                except (
                    OSError,
                    ForeignPath,
                ) as e:  # the events still go out; the file keeps the state before them
                    log.error("cannot save the watched conditions' states to %s: %s", self.path, e)
        return events

    def reset(self) -> None:
        """The memory was cleared: every condition is inactive and unevaluated again."""
        with self._lock:
            self._commit({n: ConditionState(s.condition, False, None, None) for n, s in self._states.items()})

    # ------------------------------------------------------------------ persistence

    def open(self, directory) -> int:
        """Persist into `directory` from now on (None: nowhere), restoring the conditions saved there
        beside those held now. Returns how many were restored.

        Nothing held is dropped: a condition added before the directory was opened (the node's
        conditions added between configure and activate) is kept, replaces a saved one of its name
        (it is the newer request) and is written there with the rest. A file that cannot be read is
        renamed aside (never written over) and WatchError says so; the held conditions stay."""
        self.path = Path(directory) / WATCH_FILE if directory else None
        problem = ""
        try:
            saved = self._read()
        except WatchError as e:
            aside = self.path.with_name(
                f"{WATCH_FILE}.unreadable-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            )
            os.replace(self.path, aside)
            saved, problem = {}, f"{e}; moved aside to {aside.name}"
        with self._lock:
            held = len(self._states)
            self._states = {**saved, **self._states}
            if held and self.path is not None:
                try:
                    self._write(self._states)
                except OSError as e:
                    problem = f"{problem}; " if problem else ""
                    problem += f"cannot save the conditions to {self.path}: {e}"
            self.revision += 1
        self._added()
        if problem:
            raise WatchError(f"{problem}; watching the {len(self)} condition(s) held")
        return len(saved)

    def load(self) -> int:
        """Replace the conditions with those in `watch.json` (nothing there: none). Returns how many.

        Raises WatchError, with nothing changed, for a file that is not a valid watch file. More
        conditions than max_conditions are all kept (adding waits until some are removed)."""
        states = self._read()
        with self._lock:
            self._states = states
            self.revision += 1
        self._added()
        return len(states)

    def _read(self) -> dict[str, ConditionState]:
        """The conditions saved in `watch.json` ({} when there is none); WatchError for a bad file."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"not a format-{_FORMAT} watch file")
            states = {}
            for entry in data["conditions"]:
                c = check_condition(entry["text"], entry["threshold"], entry["name"])
                if c.name in states:
                    raise ValueError(f"condition {c.name!r} appears twice")
                if not isinstance(entry.get("active"), bool):
                    raise ValueError(f"condition {c.name!r}: 'active' must be true or false")
                states[c.name] = ConditionState(c, entry["active"], None, None)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise WatchError(f"cannot read {self.path}: {type(e).__name__}: {e}") from e
        return states

    def _added(self) -> None:
        if self.on_added is not None:
            self.on_added()

    def _commit(self, states: dict[str, ConditionState]) -> None:
        """Save `states`, then make them current (under _lock); WatchError and no change if the save fails."""
        if self.path is not None:
            try:
                self._write(states)
            except (OSError, ForeignPath) as e:
                raise WatchError(f"cannot save the conditions to {self.path}: {e}") from e
        self._states = states

    def _write(self, states: dict[str, ConditionState]) -> None:
        data = {
            "format": _FORMAT,
            "conditions": [
                {"name": s.condition.name, "text": s.condition.text, "threshold": s.condition.threshold}
                | {"active": s.active}
                for s in states.values()
            ],
        }
        claim(self.path.parent)  # a memory directory of ours (persistence.py), or ForeignPath
        atomic_write(self.path, lambda f: f.write(json.dumps(data, indent=1)), "w")


def check_condition(text, threshold, name) -> Condition:
    """A valid Condition or WatchError saying what is wrong."""
    if not isinstance(text, str) or not text.strip().rstrip("?").strip():
        raise WatchError("condition is empty: give a statement such as 'a person is at the door'")
    text = text.strip()
    if len(text) > MAX_CONDITION_CHARS:
        raise WatchError(f"condition has {len(text)} characters; the limit is {MAX_CONDITION_CHARS}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise WatchError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0.0 <= threshold <= 1.0:
        raise WatchError(f"threshold must be in [0, 1] (a probability), got {threshold}")
    if not isinstance(name, str):
        raise WatchError(f"name must be a string, got {type(name).__name__}")
    name = name.strip() or text
    if len(name) > MAX_CONDITION_CHARS:
        raise WatchError(f"name has {len(name)} characters; the limit is {MAX_CONDITION_CHARS}")
    return Condition(name, text, float(threshold))


@dataclass(frozen=True)
class WatchResult:
    """One evaluation of every watched condition on one memory (published on the debug topic)."""

    states: tuple[ConditionState, ...]  # after this evaluation, with its probabilities
    events: tuple[WatchEvent, ...]
    stamp: Optional[float]  # newest frame stamp of the memory evaluated
    frames_seen: int  # frames in that memory
    memory_version: int
    evaluation_s: float  # the batched prefill of all conditions (GPU work waited for)
    memory_updated_at: float  # time.perf_counter() when that memory was published (event latency)


class WatchRunner:
    """The engine's side of watching: whether an evaluation is due on the newest prefix, and running it.

    Each built prefix (one per memory update the prefix cache kept up with) is evaluated once, and
    again when conditions were added since (so a new condition gets its first probability, and
    rises if already true, without waiting for the next memory update); the engine's LLM worker
    runs it only when no question or summarize() call is queued.
    """

    def __init__(self, watcher: Watcher, on_result: Optional[Callable[[WatchResult], None]]):
        self.watcher, self.on_result = watcher, on_result
        self._done: Optional[object] = None  # key of the memory evaluated last

    def due(self, key: tuple) -> bool:
        """`key` identifies the memory of the newest prefix (epoch, version)."""
        return (
            self.on_result is not None
            and (*key, self.watcher.revision) != self._done
            and len(self.watcher) > 0
        )

    def run(
        self,
        lm,
        prefix,
        key,
        *,
        stamp,
        frames_seen: int,
        memory_updated_at: float,
        sync,
        ground: Optional[Callable[[Sequence[float]], tuple[EvidenceItem, ...]]] = None,
    ) -> WatchResult:
        """Evaluate every condition on `prefix` (lm.score_conditions), update states, hand the
        result to on_result. sync() waits for the GPU work, so evaluation_s is its real time.

        ground: turns a condition's attention shares per memory block into its evidence items
        (the engine's grounding.evidence_items on the prefix's snapshot); None: no evidence is
        measured. Each event carries the evidence of its own condition."""
        self._done = (*key, self.watcher.revision)
        conditions = self.watcher.conditions()
        t0 = time.perf_counter()
        scores = lm.score_conditions(prefix, [c.text for c in conditions], evidence=ground is not None)
        sync()
        evaluation_s = time.perf_counter() - t0
        version = int(key[1])
        events = self.watcher.update(list(zip(conditions, scores.probabilities, strict=True)), stamp, version)
        if scores.attention:
            attention = dict(zip((c.name for c in conditions), scores.attention, strict=True))
            events = [replace(e, evidence=ground(attention[e.condition.name].shares())) for e in events]
        names = {c.name for c in conditions}
        states = tuple(s for s in self.watcher.states() if s.condition.name in names)
        result = WatchResult(
            states, tuple(events), stamp, int(frames_seen), version, evaluation_s, memory_updated_at
        )
        self.on_result(result)
        return result
