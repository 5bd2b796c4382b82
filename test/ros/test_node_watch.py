"""Standing queries over DDS: ~/watch (add/remove/list, bad input), ~/watch_scores, ~/events and
persistence across a restart, with the node as a separate process and a tiny random model.

The module is one scenario of a node's life, in steps that build on each other (bad requests on
an empty list, the planted events, the CLI on the node those events left, a restart that must
restore that state), so its tests keep their order under pytest-random-order (the stress
script shuffles every other module).

The events are planted honestly (test/support/watch_scene.py): this process runs the same
stream through its own engine, computes each memory state's probability with a plain forward,
puts the threshold across the jump at a scene change and derives the events the documented
hysteresis rule gives. The node, fed the same frames one slot at a time over DDS, must publish
those probabilities and exactly those events.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from support import watch_scene as scene
from support.dds import ClientNode, image_msg, rclpy_session, seconds, to_stamp, wait_until
from support.node_process import NodeProcess

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.engine.watch import Watcher
from fvs_ros.memory import MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint
from fvs_ros.msg import WatchEvaluation, WatchEvent
from fvs_ros.srv import Watch

ROOT = Path(__file__).resolve().parents[2]
HYSTERESIS = 0.01
MEMORY = {"csm_slots": 4, "dam_frames": 2}
START = 1000.0  # header stamp of the first frame; frames 0.5 s apart
BUDGET_S = 600.0  # what one step may wait for the node or a CLI process on a loaded machine (CI: 2 cores)
shared_state: dict = {}  # what one test hands to the next (the module's tests run in order)
pytestmark = pytest.mark.random_order(disabled=True)
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream")


def reference_by_condition(checkpoint) -> dict[str, list[float]]:
    """P(yes) of every candidate condition on each memory state of the scene (one per slot), by a
    plain forward: this process runs the stream through its own engine."""
    lm = load_model(checkpoint)
    engine = StreamEngine(lm, MemoryConfig(**MEMORY), EngineConfig(sample_fps=0)).start()
    snaps, t = [], START
    try:
        for slot in scene.slots():
            for f in slot:
                engine.add_frame(f, t)
                t += 0.5
            assert engine.flush(30)
            snaps.append(engine.snapshot())
    finally:
        engine.shutdown()
    return {c: [scene.reference_probability(lm, s, c) for s in snaps] for c in scene.CANDIDATES}


@pytest.fixture(scope="module")
def planted(checkpoint):
    """(condition, threshold, expected events as (slot index, rising), reference probabilities)."""
    by_condition = reference_by_condition(checkpoint)
    condition, threshold, _ = scene.plant(by_condition, HYSTERESIS)
    threshold = float(np.float32(threshold))  # as the float32 field of Watch.srv carries it
    events = scene.expected_events(by_condition[condition], threshold, HYSTERESIS)
    return condition, threshold, events, by_condition[condition]


class Client(ClientNode):
    def __init__(self):
        super().__init__("fvs_watch_test_client")
        self.images = self.node.create_publisher(Image, "/image_raw", RELIABLE)
        self.events, self.scores = [], []
        self.node.create_subscription(WatchEvent, "/fvs/events", self.events.append, RELIABLE)
        self.node.create_subscription(WatchEvaluation, "/fvs/watch_scores", self.scores.append, 100)
        self.watch_client = self.node.create_client(Watch, "/fvs/watch")
        self.spin()

    def watch(self, timeout=BUDGET_S, **fields) -> Watch.Response:
        """One call; a reply lost while DDS matches the service is sent again (list is idempotent;
        ready() makes sure the first add or remove finds the service matched)."""
        assert self.watch_client.wait_for_service(timeout_sec=timeout), "/fvs/watch not available"
        future = self.watch_client.call_async(Watch.Request(**fields))
        assert wait_until(future.done, timeout), f"no reply to {fields}"
        return future.result()

    def ready(self, timeout=60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.watch_client.wait_for_service(timeout_sec=1.0):
                future = self.watch_client.call_async(Watch.Request(command="list"))
                if wait_until(future.done, 1.0):
                    return True
                self.watch_client.remove_pending_request(future)
        return False

    def publish(self, pixels, stamp: float):
        self.images.publish(image_msg(pixels, "rgb8", to_stamp(stamp)))


@pytest.fixture(scope="module")
def client():
    yield from rclpy_session(Client)


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memory") / "saved"


def start_node(checkpoint, memory_dir, log_path, client, hysteresis=HYSTERESIS) -> NodeProcess:
    node = NodeProcess(
        log_path,
        model=checkpoint,
        memory_file=memory_dir,
        memory_fps=0.0,
        reliability="reliable",
        qos_depth=10,
        summary_period_s=0.0,
        prefix_refresh_s=0.0,
        max_prefix_lag_s=0.0,
        watch_max_conditions=3,
        watch_hysteresis=hysteresis,
        watch_event_images=True,
        **MEMORY,
    )
    assert client.ready(), node.text()
    return node


@pytest.fixture(scope="module")
def node(checkpoint, memory_dir, tmp_path_factory, client):
    proc = start_node(checkpoint, memory_dir, tmp_path_factory.mktemp("logs") / "node1.log", client)
    yield proc
    proc.stop()


def test_bad_requests_are_refused_and_change_nothing(node, client):
    ok = client.watch(command="add", condition="a person is at the door", threshold=0.9, name="door")
    assert ok.success and ok.names == ["door"] and list(ok.thresholds) == [pytest.approx(0.9)], ok.error
    assert math.isnan(ok.probabilities[0]) and ok.active == [False]
    cases = [
        ({"command": "add", "condition": "   "}, "condition is empty"),
        ({"command": "add", "condition": "x" * 301}, "the limit is 300"),
        ({"command": "add", "condition": "smoke", "threshold": 1.5}, "threshold must be in [0, 1]"),
        ({"command": "add", "condition": "smoke", "threshold": -0.1}, "threshold must be in [0, 1]"),
        ({"command": "add", "condition": "smoke", "threshold": math.nan}, "threshold must be a number"),
        ({"command": "add", "condition": "another door", "name": "door"}, "already watched"),
        ({"command": "remove", "name": "window"}, "no condition named 'window' (watched: 'door')"),
        ({"command": "forget"}, "unknown command 'forget'"),
    ]
    for fields, message in cases:
        response = client.watch(**fields)
        assert not response.success and message in response.error, (fields, response.error)
        assert response.names == ["door"]
    for text in ("smoke is visible", "the light is on"):
        assert client.watch(command="add", condition=text).success  # default threshold 0.5
    full = client.watch(command="add", condition="a cup is on the table")
    assert not full.success and "already watching 3 conditions, the limit" in full.error
    listed = client.watch(command="list")
    assert listed.success and listed.names == ["door", "smoke is visible", "the light is on"]
    assert list(listed.thresholds[1:]) == [0.5, 0.5]
    for name in listed.names:
        assert client.watch(command="remove", name=name).success
    assert client.watch(command="list").names == []
    assert node.proc.poll() is None


def test_events_over_dds_at_the_planted_scene_change(node, client, planted):
    condition, threshold, expected, reference = planted
    added = client.watch(command="add", condition=condition, threshold=threshold, name="planted")
    assert added.success, added.error
    stamps = stream_and_check_events(node, client, "planted", threshold, expected, reference)
    for e in client.events:
        i = e.frames_seen // 2 - 1
        assert e.name == "planted" and e.condition == condition and e.threshold == pytest.approx(threshold)
        assert e.probability == pytest.approx(reference[i], abs=1e-4)
        assert seconds(e.header.stamp) == pytest.approx(stamps[i]) and e.header.frame_id == "test_camera"
        assert 0 < e.latency_s < 60
        assert_evidence_of_received_frames(e, sent=START + 0.5 * np.arange(2 * len(stamps)))
    shared_state["active"] = expected[-1][1]


def stream_and_check_events(node, client, name, threshold, expected, reference) -> list[float]:
    """Publish the scene slot by slot, each once the node has evaluated the memory before it; every
    memory state's P(yes) of the only watched condition `name` (~/watch_scores) must be the plain
    forward's `reference`, the states they report must change exactly at `expected` (slot index,
    rising), and ~/events must carry exactly those changes. Returns the slots' stamps."""
    stamps, t = [], START
    for i, slot in enumerate(scene.slots()):
        for f in slot:
            client.publish(f, t)
            t += 0.5
        stamps.append(t - 0.5)
        evaluated = wait_until(lambda n=2 * (i + 1): any(s.frames_seen == n for s in client.scores), 60)
        assert evaluated, node.text()[-3000:]
    by_frames = {s.frames_seen: s for s in client.scores}
    for i, p in enumerate(reference):  # every memory state was evaluated, as the plain forward says
        score = by_frames[2 * (i + 1)]
        assert score.names == [name] and score.probabilities[0] == pytest.approx(p, abs=1e-4)
        assert seconds(score.header.stamp) == pytest.approx(stamps[i])
    # the states every evaluation reported follow the rule, and the events are exactly their
    # changes: all evaluations are in, so no other event can still come
    active = [bool(by_frames[2 * (i + 1)].active[0]) for i in range(len(reference))]
    changes = [(i, a) for i, a in enumerate(active) if a != (active[i - 1] if i else False)]
    assert changes == expected, (changes, expected, [round(p, 4) for p in reference], threshold)
    assert wait_until(lambda: len(client.events) >= len(expected), 60)
    got = [(e.frames_seen // 2 - 1, e.rising) for e in client.events]
    assert got == expected, (got, expected, [round(p, 4) for p in reference], threshold)
    return stamps


def assert_evidence_of_received_frames(event, sent):
    """The event's evidence (evidence_frames 3 of the node's 6 memory blocks): largest share first,
    each stamped with an image this test sent, no later than the memory evaluated; one JPEG each."""
    items, newest = event.evidence, seconds(event.header.stamp)
    assert 1 <= len(items) <= 3, items
    shares = [item.share for item in items]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-5
    for item in items:
        stamp = seconds(item.stamp)
        assert np.isclose(sent, stamp, atol=1e-6).any() and stamp <= newest + 1e-6, (stamp, newest)
        span = (seconds(item.span_start), seconds(item.span_end))
        if item.kind == item.DETAIL:
            assert span == pytest.approx((stamp, stamp)) and item.weight == 1
        else:
            assert item.kind == item.CONTEXT and span[0] <= stamp + 1e-6 and stamp <= span[1] + 1e-6
            assert np.isclose(sent, span[0], atol=1e-6).any() and item.weight >= 1
    assert [seconds(image.header.stamp) for image in event.evidence_images] == [
        pytest.approx(seconds(item.stamp)) for item in items
    ]
    for image in event.evidence_images:
        assert image.format == "jpeg" and bytes(image.data[:2]) == b"\xff\xd8", image.format


def fvs_watch_command(*args) -> list:
    """python -m fvs_ros.cli.watch --json ... (the fvs_watch command), waiting for the node as long as
    a loaded machine needs (a later --wait wins)."""
    return [sys.executable, "-m", "fvs_ros.cli.watch", "--json", "--wait", str(BUDGET_S), *args]


def test_fvs_watch_command(node, client):
    """python -m fvs_ros.cli.watch (the fvs_watch command) against the running node."""

    def fvs_watch(*args):
        done = subprocess.run(
            fvs_watch_command(*args),
            capture_output=True,
            text=True,
            timeout=2 * BUDGET_S,
            env=os.environ.copy(),
        )
        return done.returncode, done.stdout, done.stderr

    code, out, err = fvs_watch("list")
    assert code == 0, err
    (planted,) = json.loads(out)["conditions"]
    assert planted["name"] == "planted" and planted["active"] == shared_state["active"]
    code, out, _ = fvs_watch("add", "smoke is visible", "--threshold", "2")
    assert code == 1 and "threshold must be in [0, 1]" in json.loads(out)["error"]
    code, out, _ = fvs_watch("add", "smoke is visible", "--name", "smoke")
    assert code == 0 and [c["name"] for c in json.loads(out)["conditions"]] == ["planted", "smoke"]
    code, out, _ = fvs_watch("remove", "smoke")
    assert code == 0 and [c["name"] for c in json.loads(out)["conditions"]] == ["planted"]
    code, _, err = fvs_watch("--node", "/nobody", "--wait", "1", "list")
    assert code == 2 and "/nobody/watch is not available" in err


def test_fvs_watch_events_prints_the_evidence(node, client):
    """fvs_watch events --json prints an event with its evidence: a condition added at threshold 0
    rises at its first evaluation. Each try waits for what it needs however long the machine takes
    (within BUDGET_S): fvs_watch's subscription in the graph, then the node's event (this process's
    own subscriber got it); a subscriber the node had not matched yet misses it, so the condition is
    removed and added again until fvs_watch has printed one."""
    proc = subprocess.Popen(
        fvs_watch_command("events", "--count", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        subscribed = wait_until(
            lambda: client.node.count_subscribers("/fvs/events") > 1 or proc.poll() is not None, BUDGET_S
        )
        assert subscribed and proc.poll() is None, (
            proc.stderr.read() if proc.poll() is not None else "no subscriber"
        )
        deadline = time.monotonic() + BUDGET_S
        while proc.poll() is None and time.monotonic() < deadline:
            seen = len(client.events)
            assert client.watch(command="add", condition="the light is on", threshold=0.0, name="now").success
            published = wait_until(
                lambda n=seen: proc.poll() is not None or any(e.name == "now" for e in client.events[n:]),
                BUDGET_S,
            )
            assert published, "no event published"
            wait_until(lambda: proc.poll() is not None, 60)  # fvs_watch prints it and ends, if it got it
            assert client.watch(command="remove", name="now").success
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    event = json.loads(out.splitlines()[-1])
    assert event["name"] == "now" and event["rising"] and 1 <= len(event["evidence"]) <= 3
    sent = START + 0.5 * np.arange(2 * len(scene.slots()))
    for item in event["evidence"]:
        assert item["kind"] in ("detail", "context") and np.isclose(sent, item["stamp"], atol=1e-6).any()


def test_conditions_persist_across_restart(node, client, checkpoint, memory_dir, tmp_path_factory):
    assert node.stop() == 0
    assert (memory_dir / "watch.json").is_file()
    again = start_node(checkpoint, memory_dir, tmp_path_factory.mktemp("logs") / "node2.log", client)
    try:
        listed = client.watch(command="list")
        assert listed.names == ["planted"], again.text()
        assert listed.active == [shared_state["active"]]  # the state the events left
        assert "1 watched condition(s) restored" in again.text()
        assert client.watch(command="remove", name="planted").success
    finally:
        assert again.stop() == 0
    assert Watcher(directory=memory_dir).load() == 0  # the removal was saved too
