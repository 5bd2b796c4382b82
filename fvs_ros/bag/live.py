"""Live replay: play a bag into the running node over DDS and ask questions through its Ask service.

Two ways to drive the stream:

- internal player (default): this process publishes the bag's image messages as recorded
  (raw serialized bytes, never deserialized) at recorded timing scaled by `rate`, optionally
  publishing /clock (rosgraph_msgs/Clock, the bag's log time) for nodes with use_sim_time, and
  sends each question when the replay reaches its stream time.
- external player (`player="external"`): something else plays the bag (`ros2 bag play --clock`
  on a ROS 2 install, or `python -m fvs_ros.bag.play`); this process only schedules questions:
  against /clock (`sync="clock"`: stream time = clock - the bag's first image log time) or
  against the first image it sees on the topic (`sync="image"`: stream time = wall seconds since
  that image x rate). `sync="auto"` uses /clock when a clock message arrives before the first image.

Questions are sent asynchronously (a slow answer never holds the replay back), and each answer
records what the node reported (frames seen, stamps, ttft, total time) plus the service round trip.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fvs_ros.bag.bagio import BagFrame, ImageBag
from fvs_ros.bag.images import COMPRESSED, stamp_from_cdr
from fvs_ros.bag.questions import Question
from fvs_ros.bag.report import stats
from fvs_ros.ros.qos import CLIENT_QOS

EPS = 1e-6
DIAG_SUFFIX = "Flash-VStream memory"  # the node's /diagnostics status name ends with this


class LiveError(RuntimeError):
    """The live run cannot start (no node, no service, no subscriber); one line for the user."""


def _msg_class(msgtype: str):
    from sensor_msgs.msg import CompressedImage, Image

    return CompressedImage if msgtype == COMPRESSED else Image


def _sleep_until(t: float, stop: threading.Event):
    while not stop.is_set():
        rem = t - time.monotonic()
        if rem <= 0:
            return
        time.sleep(min(rem, 0.05))


def _time_s(t) -> float:
    return t.sec + t.nanosec * 1e-9


@dataclass
class LiveOptions:
    rate: float = 1.0
    clock_hz: float = 0.0  # 0: no /clock
    topic: Optional[str] = None  # publish on this topic (default: the bag's)
    service: str = "/fvs/ask"
    reliability: str = "reliable"
    depth: int = 10
    wait_s: float = 60.0  # for the service and a subscriber on the topic
    preroll_s: float = 1.0  # after the node's subscription matched, before the first frame (the match is
    # seen here before the node's side has matched us; frames sent in between are lost)
    ask_timeout_s: float = 60.0  # sent as Ask.timeout_s; the client waits this + 10 s
    max_new_tokens: int = 0  # 0: the node's default
    player: str = "internal"  # internal | external
    sync: str = "auto"  # external player: auto | clock | image
    idle_timeout_s: float = 5.0  # external player: the stream has ended after this long without images
    diagnostics: bool = True  # read the node's frame counters from /diagnostics
    reset_service: Optional[str] = (
        ""  # Trigger called before the replay ("": <service namespace>/reset; None: off)
    )


@dataclass
class _Pending:
    q: Question
    due: float  # monotonic time it was scheduled for
    sent: float
    stream_s: float  # stream time when sent
    frames_sent: int
    future: object = None
    done_at: Optional[float] = None
    response: object = None


@dataclass
class _Follow:
    """What an external player has delivered so far (updated by subscription callbacks)."""

    first_arrival: Optional[float] = None
    last_arrival: Optional[float] = None
    first_stamp: Optional[float] = None
    last_stamp: Optional[float] = None
    received: int = 0
    clock_ns: Optional[int] = None
    clock_arrival: float = 0.0
    clock_before_image: bool = False
    arrivals: list = field(default_factory=list)  # (monotonic, header stamp)


class RosSession:
    """An rclpy context, node and background executor of our own (no global rclpy state)."""

    def __init__(self, name: str = "fvs_bag_eval"):
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="fvs-bag-eval-spin", daemon=True)
        self._thread.start()

    def _spin(self):
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except (ExternalShutdownException, KeyboardInterrupt):
            pass
        except Exception:  # noqa: BLE001 - shutting down while spinning
            pass

    def close(self):
        import rclpy

        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=2.0)

    def __enter__(self) -> "RosSession":
        return self

    def __exit__(self, *exc):
        self.close()


def _qos(reliability: str, depth: int):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE
        if reliability == "reliable"
        else ReliabilityPolicy.BEST_EFFORT,
    )


class BagPlayer:
    """Publishes one image topic of a bag at recorded timing (serialized bytes), and /clock."""

    def __init__(
        self,
        session: RosSession,
        bag: ImageBag,
        *,
        topic: Optional[str] = None,
        rate: float = 1.0,
        clock_hz: float = 0.0,
        reliability: str = "reliable",
        depth: int = 10,
    ):
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.bag, self.rate, self.clock_hz = bag, rate, clock_hz
        self.topic = topic or bag.info.topic
        node = session.node
        self.pub = node.create_publisher(_msg_class(bag.info.msgtype), self.topic, _qos(reliability, depth))
        self.clock_pub = None
        if clock_hz > 0:
            from rosgraph_msgs.msg import Clock

            self._Clock = Clock
            self.clock_pub = node.create_publisher(Clock, "/clock", _qos("reliable", 1))
        self.wall0: Optional[float] = None
        self.published = 0
        self.late: list[float] = []  # publish time - scheduled time, per frame
        self.last_frame: Optional[BagFrame] = None
        self.stop = threading.Event()
        self._clock_thread: Optional[threading.Thread] = None

    # -- clock
    def start_clock(self):
        """Publish /clock from now on: the first image's log time until start(), then recorded time."""
        if self.clock_pub is None or self._clock_thread is not None:
            return
        self._clock_thread = threading.Thread(target=self._clock_loop, name="fvs-bag-clock", daemon=True)
        self._clock_thread.start()

    def sim_ns(self, now: Optional[float] = None) -> int:
        t0 = self.bag.info.first_log_ns
        if self.wall0 is None:
            return t0
        now = time.monotonic() if now is None else now
        return t0 + int(max(0.0, now - self.wall0) * self.rate * 1e9)

    def _clock_loop(self):
        from builtin_interfaces.msg import Time

        period = 1.0 / self.clock_hz
        while not self.stop.is_set():
            ns = self.sim_ns()
            try:
                self.clock_pub.publish(
                    self._Clock(clock=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000))
                )
            except Exception:  # noqa: BLE001 - context shutting down
                return
            self.stop.wait(period)

    # -- frames
    def wait_for_subscribers(self, timeout: float, count: int = 1) -> bool:
        """Wait until `count` subscriptions match the image topic (DDS discovery can take ~3 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.pub.get_subscription_count() >= count:
                return True
            time.sleep(0.05)
        return self.pub.get_subscription_count() >= count

    def start(self, wall0: Optional[float] = None):
        self.wall0 = time.monotonic() if wall0 is None else wall0

    def due(self, stream_s: float) -> float:
        return self.wall0 + stream_s / self.rate

    def publish(self, frame: BagFrame):
        due = self.due(frame.stream_s)
        _sleep_until(due, self.stop)
        t = time.monotonic()
        self.pub.publish(frame.raw)
        self.late.append(t - due)
        self.published += 1
        self.last_frame = frame

    def close(self):
        self.stop.set()
        if self._clock_thread is not None:
            self._clock_thread.join(timeout=1.0)


class _Asker:
    """Sends Ask requests asynchronously and collects the responses."""

    def __init__(self, session: RosSession, service: str, opts: LiveOptions):
        from fvs_ros.srv import Ask

        self.Ask = Ask
        self.opts = opts
        self.client = session.node.create_client(Ask, service, qos_profile=CLIENT_QOS)
        self.service = service
        self.pending: list[_Pending] = []
        self.lock = threading.Lock()

    def wait(self, timeout: float) -> bool:
        """Wait until the service answers. Right after discovery Fast DDS can drop a reply (the server's
        reply writer has not matched us yet), so an empty question, which the node refuses at once
        without touching its memory, is sent until one comes back."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.client.wait_for_service(timeout_sec=min(1.0, max(deadline - time.monotonic(), 0.01))):
                continue
            if _call(self.client, self.Ask.Request(question=""), 1.0) is not None:
                return True
        return False

    def send(self, q: Question, due: float, stream_s: float, frames_sent: int) -> _Pending:
        req = self.Ask.Request(
            question=q.prompt(),
            timeout_s=float(self.opts.ask_timeout_s),
            max_new_tokens=int(self.opts.max_new_tokens or 0),
            want_images=True,
        )
        p = _Pending(q, due, time.monotonic(), stream_s, frames_sent)
        p.future = self.client.call_async(req)

        def done(fut, p=p):
            p.done_at = time.monotonic()
            try:
                p.response = fut.result()
            except Exception as e:  # noqa: BLE001
                p.response = e

        p.future.add_done_callback(done)
        with self.lock:
            self.pending.append(p)
        return p

    def wait_all(self, stop: threading.Event):
        margin = 10.0
        for p in list(self.pending):
            deadline = p.sent + self.opts.ask_timeout_s + margin
            while p.done_at is None and time.monotonic() < deadline and not stop.is_set():
                time.sleep(0.01)

    def result(self, p: _Pending) -> dict:
        res = {
            "status": "failed",
            "error": None,
            "asked_stream_s": p.stream_s,
            "ask_late_s": p.sent - p.due,
            "frames_sent_at_ask": p.frames_sent,
        }
        r = p.response
        if p.done_at is None:
            res["error"] = f"no response from {self.service} within {self.opts.ask_timeout_s + 10:g} s"
            return res
        res["round_trip_s"] = p.done_at - p.sent
        if isinstance(r, Exception):
            res["error"] = f"service call failed: {type(r).__name__}: {r}"
            return res
        seen = int(r.frames_seen)
        res.update(
            {
                "frames_seen": seen,
                "frames_in_memory": int(r.frames_in_memory),
                "first_stamp": _time_s(r.first_frame_stamp) if seen else None,
                "last_stamp": _time_s(r.last_frame_stamp) if seen else None,
                "memory_lag_s": float(r.memory_lag_s) if seen else None,
            }
        )
        if not r.success:
            res["error"] = r.error or "the node reported failure"
            return res
        res.update(
            status="answered",
            answer=r.answer,
            ttft_s=float(r.time_to_first_token_s),
            total_s=float(r.total_time_s),
            num_tokens=int(r.num_tokens),
            evidence=[
                {
                    "kind": "detail" if e.kind == e.DETAIL else "context",
                    "stamp": _time_s(e.stamp),
                    "share": float(e.share),
                    "span": [_time_s(e.span_start), _time_s(e.span_end)],
                    "weight": int(e.weight),
                    "slot": int(e.slot),
                }
                for e in r.evidence
            ],
            evidence_jpeg=[bytes(image.data) or None for image in r.evidence_images],
        )
        return res


class _MemoryView:
    """The node's latest ~/memory_view (transient-local: the current one arrives on subscribing)."""

    def __init__(self, session: RosSession, service: str):
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        qos = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        topic = service.rsplit("/", 1)[0] + "/memory_view"  # beside the Ask service: /fvs/memory_view
        self.latest = None
        session.node.create_subscription(Image, topic, self._on, qos)

    def _on(self, msg):
        self.latest = msg

    def image(self, newer_than: float, timeout: float):
        """The latest view as RGB [H, W, 3] uint8 once one stamped at or after `newer_than` (stream
        seconds) arrived, or the latest after `timeout` s (None if none)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.latest
            if msg is not None and _time_s(msg.header.stamp) >= newer_than - 1e-6:
                break
            time.sleep(0.05)
        msg = self.latest
        if msg is None or msg.encoding != "rgb8":
            return None
        return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)


class _Diagnostics:
    """Latest frame counters from the node's /diagnostics status."""

    def __init__(self, session: RosSession):
        from diagnostic_msgs.msg import DiagnosticArray

        self.values: Optional[dict] = None
        self.hardware_id: Optional[str] = None  # the node puts its model there
        self.received_at: Optional[float] = None
        session.node.create_subscription(DiagnosticArray, "/diagnostics", self._on, 10)

    def _on(self, msg):
        for st in msg.status:
            if st.name.endswith(DIAG_SUFFIX):
                self.values = {kv.key: kv.value for kv in st.values}
                self.hardware_id = st.hardware_id or None
                self.received_at = time.monotonic()

    def wait_newer(self, than: float, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.received_at is None or self.received_at < than):
            time.sleep(0.05)

    def counters(self) -> dict:
        v = self.values or {}

        def num(key):
            try:
                return int(v[key])
            except (KeyError, ValueError):
                return None

        return {
            "received": num("frames_received"),
            "used": num("frames_into_memory"),
            "skipped_by_sampling": num("frames_skipped_by_sampling"),
            "dropped": num("frames_dropped"),
            "rejected": None
            if not v
            else sum(num(k) or 0 for k in ("frames_rejected", "frames_unsupported", "frames_malformed")),
            "engine_errors": num("errors"),
        }


def run_live(
    bag: ImageBag, questions: list[Question], opts: LiveOptions, log=sys.stderr, watch=None
) -> tuple[list[dict], dict, dict]:
    """Run one live evaluation; returns (per-question results, frame counters, timing).

    watch: a bag.watching.LiveWatch whose conditions the node watches during the replay."""
    if opts.player not in ("internal", "external"):
        raise ValueError(f"player must be internal or external, got {opts.player!r}")
    with RosSession() as session:
        asker = _Asker(session, opts.service, opts)
        diag = _Diagnostics(session) if opts.diagnostics else None
        print(f"[evaluate] waiting up to {opts.wait_s:g} s for {opts.service} ...", file=log, flush=True)
        if not asker.wait(opts.wait_s):
            raise LiveError(
                f"service {opts.service} is not available after {opts.wait_s:g} s: is the node running "
                "and active (python -m fvs_ros.ros.node --autostart ...), in this ROS_DOMAIN_ID?"
            )
        view = _MemoryView(session, opts.service)
        _reset(session, opts, log)
        if watch is not None:
            try:
                watch.start(session, opts.service.rsplit("/", 1)[0], opts.wait_s, _call)
            except RuntimeError as e:
                raise LiveError(str(e)) from None
        run = _run_internal if opts.player == "internal" else _run_external
        try:
            results, frames, timing = run(session, bag, questions, opts, asker, diag, log)
        finally:
            if watch is not None:
                watch.finish()
        newest = max((r["last_stamp"] for r in results if r.get("last_stamp") is not None), default=0.0)
        frames["memory_view"] = view.image(newer_than=newest, timeout=3.0)  # evaluate.py takes it out
        return results, frames, timing


def _call(client, request, timeout: float):
    """One service call from a thread that does not spin (the session's executor does); None on timeout."""
    fut = client.call_async(request)
    deadline = time.monotonic() + timeout
    while not fut.done() and time.monotonic() < deadline:
        time.sleep(0.005)
    if not fut.done():
        client.remove_pending_request(fut)
        return None
    return fut.result()


def _reset(session: RosSession, opts: LiveOptions, log):
    """Empty the node's memory first, so the replay starts from nothing (and stamps may restart)."""
    if opts.reset_service is None:
        return
    from std_srvs.srv import Trigger

    name = opts.reset_service or opts.service.rsplit("/", 1)[0] + "/reset"
    client = session.node.create_client(Trigger, name)
    if not client.wait_for_service(timeout_sec=5.0):
        print(
            f"[evaluate] warning: {name} not available; the node's memory is not reset before the replay",
            file=log,
            flush=True,
        )
        return
    res, deadline = None, time.monotonic() + 30.0
    while res is None and time.monotonic() < deadline:  # resetting twice is harmless; a lost reply is not
        res = _call(client, Trigger.Request(), 2.0)
    if res is None or not res.success:
        raise LiveError(
            f"resetting the node's memory through {name} failed: "
            f"{'no answer within 30 s' if res is None else res.message}"
        )
    print(f"[evaluate] {name}: {res.message}", file=log, flush=True)


def _beyond_end(q: Question, last: Optional[float]) -> dict:
    end = "no frames" if last is None else f"the last frame is at {last:.3f} s"
    return {
        "status": "skipped",
        "error": f"{q.where}: time {q.time:.3f} s is beyond the end of the bag's image "
        f"stream ({end}); use time 'end' to ask after the last frame",
    }


def _finish(asker: _Asker, diag, questions, results: dict, frames: dict, stop):
    asker.wait_all(stop)
    for p in asker.pending:
        results[p.q.id] = asker.result(p)
    if diag is not None:
        diag.wait_newer(time.monotonic(), timeout=3.0)
        frames.update({k: v for k, v in diag.counters().items() if v is not None})
        if diag.hardware_id:
            frames["node_model"] = diag.hardware_id
        if (diag.values or {}).get("frames_per_slot", "").isdigit():  # the slot layout the node runs
            frames["node_frames_per_slot"] = int(diag.values["frames_per_slot"])
    seen = [r.get("frames_seen") for r in results.values() if r.get("frames_seen") is not None]
    frames.setdefault("used", max(seen) if seen else None)
    return [results[q.id] | {"id": q.id} for q in questions if q.id in results]


def _run_internal(session, bag, questions, opts, asker, diag, log):
    player = BagPlayer(
        session,
        bag,
        topic=opts.topic,
        rate=opts.rate,
        clock_hz=opts.clock_hz,
        reliability=opts.reliability,
        depth=opts.depth,
    )
    try:
        player.start_clock()
        if not player.wait_for_subscribers(opts.wait_s):
            raise LiveError(
                f"nobody subscribes to {player.topic} after {opts.wait_s:g} s: check the node's image_topic "
                f"/ image_transport parameters (the bag has {bag.info.msgtype})"
            )
        time.sleep(opts.preroll_s)
        timed = [q for q in questions if not q.at_end]
        at_end = [q for q in questions if q.at_end]
        results: dict[str, dict] = {}
        player.start()
        t_start = player.wall0
        print(
            f"[evaluate] replaying {bag.info.count} frames on {player.topic} at rate {opts.rate:g}"
            + (f" with /clock at {opts.clock_hz:g} Hz" if opts.clock_hz else ""),
            file=log,
            flush=True,
        )
        frames_it = bag.frames()
        nxt = next(frames_it, None)
        qi = 0
        while not player.stop.is_set():
            q = timed[qi] if qi < len(timed) else None
            if nxt is not None and (q is None or nxt.stream_s <= q.time + EPS):
                player.publish(nxt)
                nxt = next(frames_it, None)
            elif q is not None:
                qi += 1
                last = player.last_frame.stream_s if player.last_frame else None
                if nxt is None and (last is None or q.time > last + EPS):
                    results[q.id] = _beyond_end(q, last)
                    continue
                due = player.due(q.time)
                _sleep_until(due, player.stop)
                asker.send(q, due, (time.monotonic() - player.wall0) * opts.rate, player.published)
            else:
                break
        t_end = time.monotonic()
        for q in at_end:
            asker.send(q, t_end, (t_end - player.wall0) * opts.rate, player.published)
        frames = {"in_bag": bag.info.count, "sent": player.published}
        rows = _finish(asker, diag, questions, results, frames, player.stop)
        last = player.last_frame.stream_s if player.last_frame else 0.0
        timing = {
            "rate": opts.rate,
            "frames_late_s": stats(player.late),
            "questions_late_s": stats(r.get("ask_late_s") for r in rows if r.get("ask_late_s") is not None),
            "replay_wall_s": t_end - t_start,
            "replay_expected_s": last / opts.rate,
            "clock_hz": opts.clock_hz,
        }
        frames["last_frame_stream_s"] = last
        return rows, frames, timing
    finally:
        player.close()


def _run_external(session, bag, questions, opts, asker, diag, log):
    from rclpy.qos import qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock

    st = _Follow()
    lock = threading.Lock()
    topic = opts.topic or bag.info.topic
    t0_ns = bag.info.first_log_ns

    def on_image(raw):
        now = time.monotonic()
        try:
            stamp = stamp_from_cdr(raw)
        except ValueError:
            stamp = None
        with lock:
            if st.first_arrival is None:
                st.first_arrival, st.first_stamp = now, stamp
            st.last_arrival, st.last_stamp = now, stamp
            st.received += 1
            st.arrivals.append((now, stamp))

    def on_clock(msg):
        with lock:
            st.clock_ns = msg.clock.sec * 1_000_000_000 + msg.clock.nanosec
            st.clock_arrival = time.monotonic()
            if st.first_arrival is None:
                st.clock_before_image = True

    session.node.create_subscription(
        _msg_class(bag.info.msgtype), topic, on_image, qos_profile_sensor_data, raw=True
    )
    session.node.create_subscription(Clock, "/clock", on_clock, _qos("best_effort", 1))
    sync = opts.sync
    print(
        f"[evaluate] waiting for a player on {topic} (sync: {sync}); start e.g. "
        f"`ros2 bag play {bag.info.path} --clock` or `python -m fvs_ros.bag.play {bag.info.path} --clock`",
        file=log,
        flush=True,
    )
    stop = threading.Event()
    deadline = time.monotonic() + opts.wait_s
    # the stream starts with the first image, or when /clock moves past the bag's first image (players
    # publish the start time while they wait for subscribers)
    while st.first_arrival is None and not (
        sync != "image" and st.clock_ns is not None and st.clock_ns > t0_ns
    ):
        if time.monotonic() > deadline:
            raise LiveError(f"no image on {topic} within {opts.wait_s:g} s: is the bag playing?")
        time.sleep(0.005)
    if sync == "auto":
        sync = "clock" if st.clock_before_image else "image"
    print(
        "[evaluate] stream started; scheduling questions against "
        f"{'/clock' if sync == 'clock' else 'the first image'}",
        file=log,
        flush=True,
    )

    def stream_now() -> Optional[float]:
        with lock:
            if sync == "clock":  # between clock messages, extrapolate at `rate` (at most 0.1 s of wall time)
                if st.clock_ns is None:
                    return None
                ahead = min(max(0.0, time.monotonic() - st.clock_arrival), 0.1) * opts.rate
                return (st.clock_ns - t0_ns) / 1e9 + ahead
            return None if st.first_arrival is None else (time.monotonic() - st.first_arrival) * opts.rate

    passed_end: list = [None]

    def ended() -> bool:
        """Every frame arrived, the stream passed the bag's end, or nothing came for idle_timeout_s."""
        with lock:
            if st.received >= bag.info.count:
                return True
            if st.last_stamp is not None and st.last_stamp - bag.info.first_stamp >= bag.info.bag_end_s - EPS:
                return True
            idle_since = max(st.last_arrival or 0.0, st.clock_arrival if sync == "clock" else 0.0)
            if idle_since and time.monotonic() - idle_since > opts.idle_timeout_s:
                return True
        now = stream_now() if sync == "clock" else None
        if now is None or now < bag.info.bag_end_s:
            return False
        if passed_end[0] is None:  # the clock reached the bag's end: give the last frame 0.3 s to arrive
            passed_end[0] = time.monotonic()
        return time.monotonic() - passed_end[0] >= 0.3

    timed = [q for q in questions if not q.at_end]
    at_end = [q for q in questions if q.at_end]
    results: dict[str, dict] = {}
    qi = 0
    t_start = time.monotonic()
    while qi < len(timed):
        q = timed[qi]
        now = stream_now()
        if now is not None and now >= q.time - EPS:
            qi += 1
            late = (now - q.time) / opts.rate
            asker.send(q, time.monotonic() - late, now, st.received)
            continue
        if ended():
            break
        time.sleep(0.002)
    while not ended():
        time.sleep(0.01)
    with lock:  # stream time of the last frame seen, from its header stamp (the bag's first image = 0)
        last = None if st.last_stamp is None else st.last_stamp - bag.info.first_stamp
    for q in timed[qi:]:
        results[q.id] = _beyond_end(q, last)
    t_end = time.monotonic()
    for q in at_end:
        asker.send(q, t_end, stream_now() or 0.0, st.received)
    frames = {"in_bag": bag.info.count, "sent": None, "seen_by_evaluator": st.received}
    rows = _finish(asker, diag, questions, results, frames, stop)
    # How the external player kept time: arrival vs header stamps, first image as reference.
    arr = (
        []
        if st.first_arrival is None or st.first_stamp is None
        else [
            (a - st.first_arrival) - (s - st.first_stamp) / opts.rate for a, s in st.arrivals if s is not None
        ]
    )
    timing = {
        "rate": opts.rate,
        "sync": sync,
        "frames_late_s": stats(arr),
        "questions_late_s": stats(r.get("ask_late_s") for r in rows if r.get("ask_late_s") is not None),
        "replay_wall_s": t_end - t_start,
        "replay_expected_s": (last or 0.0) / opts.rate,
    }
    frames["last_frame_stream_s"] = last
    return rows, frames, timing


def play(
    bag: ImageBag,
    *,
    topic: Optional[str] = None,
    rate: float = 1.0,
    clock_hz: float = 0.0,
    reliability: str = "reliable",
    depth: int = 10,
    wait_s: float = 0.0,
    subscribers: int = 1,
    delay_s: float = 0.0,
    log=sys.stderr,
) -> dict:
    """Publish the bag's image topic at recorded timing (the `fvs_ros.bag.play` command)."""
    with RosSession("fvs_bag_play") as session:
        player = BagPlayer(
            session, bag, topic=topic, rate=rate, clock_hz=clock_hz, reliability=reliability, depth=depth
        )
        try:
            player.start_clock()
            if wait_s > 0 and not player.wait_for_subscribers(wait_s, subscribers):
                print(
                    f"[play] {player.pub.get_subscription_count()} of "
                    f"{subscribers} subscriber(s) on {player.topic} "
                    f"after {wait_s:g} s; playing anyway",
                    file=log,
                )
            if delay_s > 0:
                time.sleep(delay_s)
            player.start()
            for frame in bag.frames():
                if player.stop.is_set():
                    break
                player.publish(frame)
            time.sleep(0.2)  # let the last messages (and clock ticks) go out
        except KeyboardInterrupt:
            pass
        finally:
            player.close()
        return {"published": player.published, "topic": player.topic, "frames_late_s": stats(player.late)}
