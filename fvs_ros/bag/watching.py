"""Standing queries in bag evaluations: conditions with the stream times they hold, event scoring.

A question file entry with `watch` instead of `question` is a condition to watch for the whole
replay (fvs_ros/engine/watch.py):

    {"id": "door", "watch": "a person is at the door", "threshold": 0.6, "true_during": [[2, 5], [9, "end"]]}

    watch      the condition text (required, as for ~/watch add). Alias: condition.
    threshold  optional, default 0.5.
    true_during stream-time intervals [from, until] in which the condition holds (times as for
                questions; until may be "end"). Omitted or []: never true, every rise is false.
    id         optional; default "W<line>".

Scoring (per condition; an event's time is the stream time of the newest frame in the memory it
was computed on, so delays count stream time, the wall latency is reported beside):

- detection: the first rise in [from, until + tolerance] of an interval detects it; its delay is
  event time - from. An interval without one is missed.
- clearing: the first fall in [until, next interval's from or the stream end + tolerance] clears
  an interval that ends before the stream does; its delay is event time - until.
- false rises: every other rise (outside the windows, or a second rise within one);
  false falls: every other fall (one inside an interval, before it ends).

Each event in the report lists its evidence (`evidence_s`): the stream times of the frames that
condition's evaluation attended to most, largest share first (the node's evidence_frames; empty
when 0); the Markdown lists the first EVENTS_LISTED events of each condition with them.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fvs_ros.bag.questions import WATCH_KEYS, QuestionIssue, is_watch, parse_time, read_entries
from fvs_ros.engine.watch import WatchError, check_condition

DEFAULT_TOLERANCE_S = 4.0  # two 2-frame slots at 1 fps: the memory sees a change at most that late
EVENTS_LISTED = 10  # per condition in the Markdown report (the JSON has them all)


@dataclass
class WatchSpec:
    id: str
    condition: str
    threshold: float
    intervals: list[tuple[float, Optional[float]]]  # (from, until); until None = to the end
    line: Optional[int] = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "line": self.line,
            "condition": self.condition,
            "threshold": self.threshold,
            "true_during": [[a, "end" if b is None else b] for a, b in self.intervals],
            "meta": self.meta,
        }


def load_watches(path) -> tuple[list[WatchSpec], list[QuestionIssue]]:
    """The watch entries of a question file (the questions are load_questions'), with issues for
    skipped ones. Raises QuestionFileError when the file as a whole cannot be used."""
    entries, _ = read_entries(path)  # malformed lines are load_questions' to report
    specs, issues, seen = [], [], set()
    for line, obj in entries:
        if not is_watch(obj):
            continue
        try:
            spec = watch_from_dict(obj, source=str(path), line=line, default_id=f"W{line or len(specs) + 1}")
        except ValueError as e:
            issues.append(QuestionIssue(str(path), line, f"{e}; condition skipped", obj.get("id")))
            continue
        if spec.id in seen:
            issues.append(
                QuestionIssue(str(path), line, f"duplicate id {spec.id!r}; condition skipped", spec.id)
            )
            continue
        seen.add(spec.id)
        specs.append(spec)
    return specs, issues


def watch_from_dict(item: dict, *, source: str, line: Optional[int], default_id: str) -> WatchSpec:
    """Validate one watch entry; raises ValueError with a message meant for the user."""
    item = dict(item)
    key = next(k for k in WATCH_KEYS if k in item)
    text, threshold = item.pop(key), item.pop("threshold", 0.5)
    try:
        condition = check_condition(text, threshold, "")
    except WatchError as e:
        raise ValueError(str(e)) from None
    raw = item.pop("true_during", [])
    if raw is None:
        raw = []
    if isinstance(raw, list) and len(raw) == 2 and not isinstance(raw[0], list):
        raw = [raw]  # one interval given bare: [from, until]
    if not isinstance(raw, list) or not all(isinstance(iv, list) and len(iv) == 2 for iv in raw):
        raise ValueError("'true_during' must be a list of [from, until] stream-time intervals")
    intervals = []
    for start, end in raw:
        a, a_end = parse_time(start)
        if a_end:
            raise ValueError("an interval of 'true_during' cannot start at 'end'")
        b, b_end = parse_time(end)
        if not b_end and b <= a:
            raise ValueError(f"interval [{start}, {end}] of 'true_during' ends before it starts")
        intervals.append((a, None if b_end else b))
    intervals.sort(key=lambda iv: iv[0])
    for (_, b0), (a1, _) in zip(intervals, intervals[1:], strict=False):
        if b0 is None or b0 >= a1:
            raise ValueError(f"intervals of 'true_during' overlap or touch at {a1} s; merge them")
    wid = item.pop("id", None)
    wid = default_id if wid is None or str(wid).strip() == "" else str(wid)
    return WatchSpec(wid, condition.text, condition.threshold, intervals, line, source, item)


def score_watch(
    spec: WatchSpec,
    events: Sequence[tuple],
    stream_end: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> dict:
    """Score one condition's events [(stream time, rising[, evidence stream times])] against its
    true intervals (module doc); the evidence times, where given, are listed with each event."""
    rises = sorted(e[0] for e in events if e[1])
    falls = sorted(e[0] for e in events if not e[1])
    used_rises, used_falls = set(), set()
    detection, clearing = [], []
    for i, (a, b) in enumerate(spec.intervals):
        until = stream_end if b is None else b
        hit = next((t for t in rises if a <= t <= until + tolerance_s and t not in used_rises), None)
        detection.append(None if hit is None else hit - a)
        if hit is not None:
            used_rises.add(hit)
        if b is None or b >= stream_end:
            continue
        nxt = spec.intervals[i + 1][0] if i + 1 < len(spec.intervals) else stream_end + tolerance_s
        hit = next((t for t in falls if b <= t <= nxt and t not in used_falls), None)
        clearing.append(None if hit is None else hit - b)
        if hit is not None:
            used_falls.add(hit)
    detected = [d for d in detection if d is not None]
    cleared = [d for d in clearing if d is not None]
    return {
        "id": spec.id,
        "condition": spec.condition,
        "threshold": spec.threshold,
        "intervals": len(spec.intervals),
        "detected": len(detected),
        "missed": len(detection) - len(detected),
        "detection_delay_s": detection,
        "mean_detection_delay_s": _mean(detected),
        "max_detection_delay_s": max(detected) if detected else None,
        "ends": len(clearing),
        "cleared": len(cleared),
        "clearing_delay_s": clearing,
        "mean_clearing_delay_s": _mean(cleared),
        "false_rises": len(rises) - len(used_rises),
        "false_falls": len(falls) - len(used_falls),
        "events": [_event(*e) for e in sorted(events, key=lambda e: e[0])],
    }


def _event(time: float, rising: bool, evidence: Optional[Sequence[float]] = None) -> dict:
    event = {"time": time, "rising": rising}
    if evidence is not None:
        event["evidence_s"] = list(evidence)  # stream times of the evidence frames, largest share first
    return event


def summarize_watch(scores: Sequence[dict]) -> dict:
    """Totals over conditions."""
    delays = [d for s in scores for d in s["detection_delay_s"] if d is not None]
    return {
        "conditions": len(scores),
        "intervals": sum(s["intervals"] for s in scores),
        "detected": sum(s["detected"] for s in scores),
        "missed": sum(s["missed"] for s in scores),
        "false_rises": sum(s["false_rises"] for s in scores),
        "false_falls": sum(s["false_falls"] for s in scores),
        "mean_detection_delay_s": _mean(delays),
        "p50_detection_delay_s": statistics.median(delays) if delays else None,
        "max_detection_delay_s": max(delays) if delays else None,
    }


def _mean(xs) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


class _WatchLog:
    """What a replay saw of the watched conditions, kept as plain values (stamps are header stamps):
    evaluations [(stamp, {name: P(yes)}, evaluation_s)] and events [(name, stamp, rising, evidence
    stamps)]."""

    def __init__(self, specs: Sequence[WatchSpec], hysteresis: Optional[float], tolerance_s: float):
        self.specs, self.hysteresis, self.tolerance_s = list(specs), hysteresis, tolerance_s
        self.evaluations: list[tuple[float, dict, Optional[float]]] = []
        self.events: list[tuple[str, float, bool, tuple[float, ...]]] = []
        self._cv = threading.Condition()

    def _record(self, stamp, probabilities: dict, evaluation_s, events) -> None:
        with self._cv:
            self.evaluations.append((stamp, probabilities, evaluation_s))
            self.events += [(name, stamp, rising, evidence) for name, rising, evidence in events]
            self._cv.notify_all()

    def report(self, first_stamp: float, stream_end: float) -> dict:
        """Scores per condition (score_watch) with event and evidence times in stream seconds since
        `first_stamp`, and each condition's timeline: [stream time, P(yes)] of every evaluation."""
        scores = []
        for spec in self.specs:
            events = [
                (t - first_stamp, rising, [e - first_stamp for e in evidence])
                for name, t, rising, evidence in self.events
                if name == spec.id
            ]
            timeline = [[t - first_stamp, ps[spec.id]] for t, ps, _ in self.evaluations if spec.id in ps]
            score = score_watch(spec, events, stream_end, self.tolerance_s)
            scores.append(score | {"spec": spec.as_dict(), "timeline": timeline})
        evaluation_s = [e for _, _, e in self.evaluations if e is not None]
        return {
            "hysteresis": self.hysteresis,
            "tolerance_s": self.tolerance_s,
            "evaluations": len(self.evaluations),
            "evaluation_ms_p50": 1000 * statistics.median(evaluation_s) if evaluation_s else None,
            "summary": summarize_watch(scores),
            "conditions": scores,
        }


class OfflineWatch(_WatchLog):
    """Offline replays with conditions: the engine's watcher and on_watch, and pacing.

    The replay waits after each memory update until that memory has been evaluated (wait()), so
    every memory state is scored, as the node does when it keeps up with the camera."""

    def __init__(
        self, specs: Sequence[WatchSpec], hysteresis: float, tolerance_s: float = DEFAULT_TOLERANCE_S
    ):
        from fvs_ros.engine.watch import Watcher

        super().__init__(specs, hysteresis, tolerance_s)
        self.watcher = Watcher(max(1, len(self.specs)), hysteresis)
        for s in self.specs:
            self.watcher.add(s.condition, s.threshold, name=s.id)
        self._version = -1  # memory version of the newest evaluation

    def on_watch(self, result) -> None:
        if result.stamp is None:
            return
        probabilities = {st.condition.name: st.probability for st in result.states}
        events = [(e.condition.name, e.rising, tuple(i.stamp for i in e.evidence)) for e in result.events]
        self._record(result.stamp, probabilities, result.evaluation_s, events)
        with self._cv:
            self._version = max(self._version, result.memory_version)

    def wait(self, engine, timeout: float = 600.0) -> None:
        """Until the engine's newest memory has been evaluated (nothing to wait for without conditions)."""
        if not self.specs or engine.snapshot().frames_seen == 0:
            return
        version = engine.snapshot().version
        with self._cv:
            self._cv.wait_for(lambda: self._version >= version, timeout)


class LiveWatch(_WatchLog):
    """Live replays with conditions: added to the running node through <node>/watch before the
    replay (a condition of the same name is replaced), ~/events and ~/watch_scores recorded,
    removed afterwards. Hysteresis is the node's (reported as None: not known here)."""

    def __init__(self, specs: Sequence[WatchSpec], tolerance_s: float = DEFAULT_TOLERANCE_S):
        super().__init__(specs, None, tolerance_s)
        self._client = None

    def start(self, session, node_name: str, timeout: float, call) -> None:
        """Subscribe and add the conditions; `call(client, request, timeout)` is live._call.
        Raises RuntimeError when the node refuses a condition."""
        from fvs_ros.msg import WatchEvaluation, WatchEvent
        from fvs_ros.srv import Watch

        node = session.node
        reliable = _reliable_qos()
        node.create_subscription(WatchEvent, f"{node_name}/events", self._on_event, reliable)
        node.create_subscription(WatchEvaluation, f"{node_name}/watch_scores", self._on_scores, reliable)
        self._client, self._call = node.create_client(Watch, f"{node_name}/watch"), call
        if not self._client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{node_name}/watch is not available: the node cannot watch conditions")
        for spec in self.specs:
            self._request(Watch.Request(command="remove", name=spec.id))  # a leftover of an earlier run
            r = self._request(
                Watch.Request(command="add", condition=spec.condition, threshold=spec.threshold, name=spec.id)
            )
            if not r.success:
                raise RuntimeError(f"the node refused condition {spec.id!r}: {r.error}")

    def finish(self, settle_s: float = 3.0) -> None:
        """Wait until evaluations stop arriving (the last memory updates), then remove the conditions."""
        from fvs_ros.srv import Watch

        if self._client is None:
            return
        with self._cv:
            while self._cv.wait(settle_s):
                pass
        for spec in self.specs:
            self._request(Watch.Request(command="remove", name=spec.id))

    def _request(self, request):
        for _ in range(10):  # a reply lost while DDS matches: add/remove by name are safe to repeat
            response = self._call(self._client, request, 3.0)
            if response is not None:
                return response
        raise RuntimeError("no reply from the node's watch service")

    def _on_scores(self, msg) -> None:
        stamp = _seconds(msg.header.stamp)
        mine = {n: float(p) for n, p in zip(msg.names, msg.probabilities, strict=True)}
        self._record(stamp, {s.id: mine[s.id] for s in self.specs if s.id in mine}, msg.evaluation_time_s, [])

    def _on_event(self, msg) -> None:
        if any(s.id == msg.name for s in self.specs):
            evidence = tuple(_seconds(e.stamp) for e in msg.evidence)
            with self._cv:
                self.events.append((msg.name, _seconds(msg.header.stamp), msg.rising, evidence))


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _reliable_qos():
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)


def render_watch(watch: dict) -> list[str]:
    """Markdown lines of the report's watch section."""
    s = watch["summary"]
    lines = [
        "",
        "## Watched conditions",
        "",
        f"{watch['evaluations']} evaluations (one per memory update), hysteresis "
        f"{watch['hysteresis'] if watch['hysteresis'] is not None else 'of the node (watch_hysteresis)'}, "
        f"detection window: the true interval + {watch['tolerance_s']} s. Times are stream seconds of the "
        "newest frame in the memory evaluated.",
        "",
        "| id | threshold | true intervals | detected | missed | detection delay (s) | cleared | "
        "clearing delay (s) | false rises | false falls |",
        "|---|---:|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for c in watch["conditions"]:
        delays = ", ".join("-" if d is None else f"{d:.2f}" for d in c["detection_delay_s"]) or "-"
        clears = ", ".join("-" if d is None else f"{d:.2f}" for d in c["clearing_delay_s"]) or "-"
        lines.append(
            f"| {c['id']} | {c['threshold']:.3f} | {c['intervals']} | {c['detected']} | {c['missed']} | "
            f"{delays} | {c['cleared']}/{c['ends']} | {clears} | {c['false_rises']} | {c['false_falls']} |"
        )
    p50 = "-" if s["p50_detection_delay_s"] is None else f"{s['p50_detection_delay_s']:.2f} s"
    lines += [
        "",
        f"All: {s['detected']}/{s['intervals']} intervals detected, detection delay p50 {p50}, "
        f"{s['false_rises']} false rises, {s['false_falls']} false falls.",
    ]
    return lines + _event_lines(watch["conditions"])


def _event_lines(conditions: Sequence[dict], most: int = EVENTS_LISTED) -> list[str]:
    """Each condition's first events with their evidence (the frames that evaluation attended to most)."""
    lines = []
    for c in conditions:
        for e in c["events"][:most]:
            evidence = ", ".join(f"{t:.2f}" for t in e.get("evidence_s", [])) or "-"
            lines.append(
                f"- {c['id']}: {'rise' if e['rising'] else 'fall'} at {e['time']:.2f} s, evidence frames at "
                f"{evidence} s"
            )
        if len(c["events"]) > most:
            lines.append(f"- {c['id']}: {len(c['events']) - most} more events in the JSON report")
    if not lines:
        return []
    return [
        "",
        "Events (stream s) and the frames each one's evaluation attended to most, largest share first:",
        "",
    ] + lines
