"""The node as a separate process over DDS, attacked as in issue 15: camera encodings that used to
kill it, far-future stamps, 50 clients asking at once, lifecycle transitions with questions in
flight, unreadable memory files, contradicting parameters, the shutdown transition, SIGKILL.

Images go out RELIABLE to a RELIABLE subscription and the tests wait for the node's counters
(/diagnostics) before the next step: they assert what the node guarantees, not timing.
The tests in this module run in order and share one node process (except where they start their own):
pytest-random-order keeps that order (the stress script shuffles the other modules).
"""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from lifecycle_msgs.msg import Transition
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger
from support.dds import image_msg, seconds, wait_until
from support.fvs_client import FPS, Client, frame, latest_diagnostics
from support.node_process import NodeProcess

from fvs_ros.ros.qos import CLIENT_QOS
from fvs_ros.srv import Ask, Watch

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
pytestmark = pytest.mark.random_order(disabled=True)


@pytest.fixture(scope="module")
def publisher(client):
    return client.node.create_publisher(Image, "/image_raw", RELIABLE)


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("robust") / "memory"


NODE_PARAMETERS = dict(
    memory_fps=FPS,
    reliability="reliable",
    qos_depth=10,
    summary_period_s=0.0,
    diagnostics_period_s=0.2,
    max_new_tokens=16,
    max_prefix_lag_s=0.0,
    max_pending_questions=20,
    save_period_s=0.0,
    csm_slots=8,
    dam_frames=4,
    frames_per_slot=1,  # every frame counts at once in frames_seen
)


@pytest.fixture(scope="module")
def node(tiny_model, memory_dir, tmp_path_factory, client):
    proc = NodeProcess(
        tmp_path_factory.mktemp("logs") / "robust.log",
        model=tiny_model,
        memory_file=memory_dir,
        **NODE_PARAMETERS,
    )
    assert client.wait_ready(), proc.text()
    yield proc
    proc.stop()


def diag(client, key=None):
    d = latest_diagnostics(client)
    return d if key is None else d[key]


def received_reaches(client, n, timeout=30.0):
    return wait_until(lambda: int(diag(client, "frames_received")) >= n, timeout, period=0.05)


def publish(client, publisher, pixels, encoding, bigendian=False, stamp=None):
    """One image, stamped 1/FPS after the previous one unless `stamp` (sec, nanosec) is given."""
    stamp = stamp if stamp is not None else client.next_stamp()
    publisher.publish(image_msg(pixels, encoding, stamp, "robust_camera", is_bigendian=bigendian))


def saved_frames(memory: Path) -> int:
    index = memory / "engine.json"
    return json.loads(index.read_text())["counters"]["frames_into_memory"] if index.is_file() else 0


def seen(client):
    response = client.ask()
    assert response.success, response.error
    return response.frames_seen


def test_encodings_that_killed_the_node_reach_memory(node, client, publisher):
    """Issue 15 case 1 (big-endian 8/16-bit), 8UC3 and Bayer: converted, not fatal."""
    before, received = seen(client), int(diag(client, "frames_received"))
    rng = np.random.default_rng(1)
    mono16 = rng.integers(0, 65535, (120, 160), dtype=np.uint16)
    images = [
        (frame(), "rgb8", True),
        (frame(), "bgr8", True),
        (frame()[..., 0].copy(), "mono8", True),
        (mono16.astype(">u2"), "mono16", True),
        (frame(), "8UC3", False),
        (frame()[..., 0].copy(), "bayer_rggb8", False),
        (mono16.astype(">u2"), "bayer_grbg16", True),
    ]
    for pixels, encoding, bigendian in images:
        publish(client, publisher, pixels, encoding, bigendian)
    assert received_reaches(client, received + len(images)), node.text()
    assert wait_until(lambda: seen(client) >= before + len(images), 30), node.text()
    d = diag(client)
    assert (d["frames_malformed"], d["frames_unsupported"], d["frames_failed"]) == ("0", "0", "0"), d
    assert node.proc.poll() is None


def test_stamps_ahead_of_the_clock_or_negative_are_restamped_and_never_block_the_stream(
    node, client, publisher
):
    """Issue 15 case 9: one frame stamped in 2036 made every later live frame rejected."""
    before = seen(client)
    received = int(diag(client, "frames_received"))
    publish(client, publisher, frame(), "rgb8", stamp=(2_100_000_000, 0))  # 2036
    publish(client, publisher, frame(), "rgb8", stamp=(-5, 0))
    for _ in range(4):
        publish(client, publisher, frame(), "rgb8")  # the live stream (stamps near 1000 s) goes on
    assert received_reaches(client, received + 6), node.text()
    assert wait_until(lambda: seen(client) >= before + 3, 30), node.text()
    d = diag(client)
    assert int(d["frames_restamped"]) == 2 and d["level"] == bytes([1]) and "restamped" in d["message"], d
    assert int(d["stamp_jumps"]) >= 1  # restamped to the wall clock, then back to the camera's stamps
    response = client.ask()
    assert response.last_frame_stamp.sec < 2_000_000_000  # the 2036 stamp never entered the stream


def test_a_restamped_frame_gets_the_node_clock_at_its_arrival(node, client, publisher):
    """docs/node.md: a stamp that is not positive (or far ahead) is replaced by the node clock's time
    at arrival: the memory's newest stamp lies between this process's clock (the same host clock)
    before the frame was sent and after it was in memory."""
    assert client.call("reset", Trigger.Request()).success
    restamped = int(diag(client, "frames_restamped"))
    sent_after = time.time()
    publish(client, publisher, frame(), "rgb8", stamp=(-5, 0))
    assert wait_until(lambda: seen(client) == 1, 30), node.text()
    in_memory_before = time.time()
    response = client.ask()
    assert sent_after <= seconds(response.last_frame_stamp) <= in_memory_before, (
        sent_after,
        seconds(response.last_frame_stamp),
        in_memory_before,
    )
    assert int(diag(client, "frames_restamped")) == restamped + 1


def test_diagnostics_go_error_while_every_frame_is_unusable_and_come_back(node, client, publisher):
    """docs/node.md: ERROR once at least 10 frames arrived within 10 s and none was usable; WARN as
    soon as a usable one arrives (frames were still dropped in the window). Frames go out one per
    diagnostics period until each level is reached. (Back to OK is not asserted: the node keeps
    its last image problem among the WARN reasons until ~/reset or cleanup.)"""
    unusable = dict(pixels=np.zeros((4, 4), np.float32), encoding="32FC1")

    def until(level, pixels, encoding, timeout=90.0):
        deadline, levels = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            publish(client, publisher, pixels, encoding)
            d = diag(client)
            levels.append(d["level"])
            if d["level"] == level:
                return d, levels
        raise AssertionError(f"no level {level!r} within {timeout} s: {levels[-20:]}")

    d, _ = until(bytes([2]), **unusable)
    assert d["message"].startswith("all ") and "frames of the last 10 s were dropped" in d["message"], d
    d, levels = until(bytes([1]), frame(), "rgb8")
    assert set(levels[:-1]) <= {bytes([2])}  # straight from ERROR to WARN: never OK meanwhile
    assert "dropped" in d["message"], d
    assert client.ask().success


def test_a_huge_timeout_is_answered(node, client):
    """Issue 15: timeout_s 3.4e38 raised an OverflowError inside the engine."""
    response = client.ask(timeout_s=3.4e38)
    assert response.success, response.error


BUSY = "busy: "  # more than max_pending_questions (20) at once
INACTIVE = "the node is inactive"  # arrived after deactivate
SHUT_DOWN = "engine shut down before answering"  # admitted, still waiting at cleanup


def ask_many(client, n):
    ask = client.clients["/fvs/ask"]
    return [
        ask.call_async(Ask.Request(question=f"Q{i}?", max_new_tokens=64, timeout_s=60.0)) for i in range(n)
    ]


def reasons(outcomes):
    """Each reply's outcome: "answered", or the documented reason of its failure (else its error)."""
    found = []
    for r in outcomes:
        if r.success:
            found.append("answered")
        else:
            found.append(next((k for k in (BUSY, INACTIVE, SHUT_DOWN) if r.error.startswith(k)), r.error))
    return found


def test_deactivate_and_cleanup_with_questions_in_flight(node, client):
    """Issue 15 case 3: deactivating while a question was answered killed the node (InvalidHandle).
    docs/node.md: at deactivate questions already admitted are answered and new ones are refused
    ("inactive"); at cleanup questions still waiting fail ("engine shut down before answering")."""
    futures = ask_many(client, 30)
    assert wait_until(lambda: any(f.done() for f in futures), 30)
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    refused = client.ask()
    assert not refused.success and refused.error.startswith(INACTIVE), refused.error
    assert wait_until(lambda: all(f.done() for f in futures), 60), "a question in flight got no reply"
    outcomes = reasons(f.result() for f in futures)
    assert set(outcomes) <= {"answered", BUSY, INACTIVE}, outcomes  # admitted ones answered, none failed
    assert outcomes.count("answered") >= 1, outcomes  # the first to arrive is always admitted

    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_ready()
    futures = ask_many(client, 30)
    assert wait_until(lambda: any(f.done() for f in futures), 30)
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.change_state(Transition.TRANSITION_CLEANUP)
    assert wait_until(lambda: all(f.done() for f in futures), 30), "a question in flight got no reply"
    outcomes = reasons(f.result() for f in futures)
    assert set(outcomes) <= {"answered", BUSY, INACTIVE, SHUT_DOWN}, outcomes
    assert node.proc.poll() is None
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_ready() and client.ask().success
    assert "Traceback" not in node.text() and "InvalidHandle" not in node.text()


def test_intake_counters_survive_deactivate_cleanup_and_restore(node, client, publisher):
    assert wait_until(lambda: publisher.get_subscription_count() >= 1, 30)  # after the reactivations
    before = int(diag(client, "frames_received"))
    publish(client, publisher, frame(), "rgb8")
    assert received_reaches(client, before + 1), node.text()  # counted (not still on its way)
    received = int(diag(client, "frames_received"))
    assert received == before + 1
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert int(diag(client, "frames_received")) == received  # kept across deactivate
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.change_state(Transition.TRANSITION_CLEANUP)
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert diag(client, "frames_received") == "0"  # a new engine, nothing restored yet
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert int(diag(client, "frames_received")) == received  # restored from memory_file


def test_unreadable_memory_is_moved_aside_and_never_overwritten(node, client, memory_dir):
    """Issue 15 cases 4 and 6: a wrong field type restored 'OK' and crashed at the next frame; an
    unreadable memory was overwritten by an empty one at shutdown."""
    before = seen(client)
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    index = json.loads((memory_dir / "engine.json").read_text())
    index["clock"]["last"] = "yesterday"
    (memory_dir / "engine.json").write_text(json.dumps(index))
    damaged = {p.name: p.read_bytes() for p in memory_dir.iterdir()}
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    asides = list(memory_dir.parent.glob("memory.unreadable-*"))
    assert len(asides) == 1 and {p.name: p.read_bytes() for p in asides[0].iterdir()} == damaged
    assert (
        "clock.last must be a finite number" in node.text() and f"moved aside to {asides[0]}" in node.text()
    )
    d = diag(client)
    assert "moved aside" in d["memory_file_problem"] and d["level"] == bytes([1]), d
    assert client.ask().frames_seen == before  # the memory in use goes on
    assert client.call("/fvs/save_memory", Trigger.Request()).success
    assert (memory_dir / "engine.json").is_file()  # a new save beside the kept one
    assert {p.name: p.read_bytes() for p in asides[0].iterdir()} == damaged


def test_contradicting_parameters_fail_configure_with_the_reason(node, client):
    """Issue 15 case 10: a 100,000-character system prompt and dam_frames > csm_slots were accepted."""
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.change_state(Transition.TRANSITION_CLEANUP)
    assert client.set_parameter("dam_frames", 9).successful
    assert not client.change_state(Transition.TRANSITION_CONFIGURE)
    assert "dam_frames (9) must be at most csm_slots (8)" in node.text()
    assert client.set_parameter("dam_frames", 4).successful
    assert client.set_parameter("system_prompt", "Watch closely. " * 20000).successful
    assert not client.change_state(Transition.TRANSITION_CONFIGURE)
    assert "does not fit the model's context" in node.text()
    assert client.set_parameter("system_prompt", "You are a helpful assistant.").successful
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_ready() and client.ask().success


def test_configure_checks_weights_and_the_memory_budget(node, client):
    """Issue 22: a configuration over max_gpu_memory was learned from an out-of-memory error. Now
    configure prints the budget before loading and refuses with the sizes; an unknown weights mode
    is refused when set; int8 weights load (quantized at configure, time logged) and answer."""
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.change_state(Transition.TRANSITION_CLEANUP)
    refused = client.set_parameter("weights", "int4")
    assert not refused.successful and refused.reason == "'int4' is not one of bf16, fp8, int8"
    assert client.set_parameter("weights", "int8").successful
    assert client.set_parameter("max_gpu_memory", 0.001).successful  # ~1 MiB: less than the tiny model needs
    assert not client.change_state(Transition.TRANSITION_CONFIGURE)
    assert "configure failed: this configuration needs about weights" in node.text()
    assert "but max_gpu_memory 0.001 GiB on cpu: 1.0 MiB" in node.text()
    assert client.set_parameter("max_gpu_memory", 0.0).successful
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert "memory budget on cpu: weights" in node.text() and "(int8, float32)" in node.text()
    assert "linear layers quantized in" in node.text()
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_ready() and client.ask().success


def test_parameters_that_cannot_work_are_refused_when_set(node, client):
    """Issue 24 item 16: image_topic '' or 'a b' was accepted (activate then failed and the node
    dropped to unconfigured), memory_fps 1e-300 too (memory never filled)."""
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)  # activate-time parameters may change
    for value in ("", "a b", "image_raw/"):
        result = client.set_parameter("image_topic", value)
        assert not result.successful and "is not a valid ROS topic name" in result.reason, (value, result)
    assert client.change_state(Transition.TRANSITION_CLEANUP)  # configure-time ones too
    for name, value in (("memory_fps", 1e-300), ("save_period_s", 1e-300), ("summary_period_s", 1e-9)):
        result = client.set_parameter(name, value)
        assert not result.successful and "too small to work" in result.reason, (name, result)
    for name in ("memory_fps", "save_period_s", "max_stamp_ahead_s"):
        for value in (math.nan, math.inf):
            assert not client.set_parameter(name, value).successful, (name, value)
    assert client.change_state(Transition.TRANSITION_CONFIGURE)
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_ready() and client.ask().success
    assert client.state() == "active"


def test_the_shutdown_transition_ends_the_process(node, client, memory_dir):
    assert client.change_state(Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert node.proc.wait(30) == 0, node.text()
    assert f"memory saved to {memory_dir}" in node.text()


def test_sigkill_loses_at_most_the_save_period(tiny_model, tmp_path, client):
    """Issue 15 case 7: every frame since the last save was lost on SIGKILL (no periodic save).
    Its nodes have a name and image topic of their own, so the module's node cannot answer for them."""
    memory = tmp_path / "periodic"
    name, topic = "fvs_periodic", "/periodic/image_raw"
    params = {**NODE_PARAMETERS, "save_period_s": 0.5, "image_topic": topic}
    own = Client(name=name, image_topic=topic)
    try:
        proc = NodeProcess(tmp_path / "first.log", name=name, model=tiny_model, memory_file=memory, **params)
        try:
            assert own.wait_ready(), proc.text()
            assert wait_until(lambda: own.raw.get_subscription_count() > 0, 30), proc.text()
            for _ in range(5):
                publish(own, own.raw, frame(), "rgb8")
            assert wait_until(lambda: seen(own) >= 5, 30), proc.text()
            assert wait_until(lambda: saved_frames(memory) >= 5, 30), proc.text()  # a periodic save
        finally:
            proc.proc.kill()
            proc.proc.wait()
        second = NodeProcess(
            tmp_path / "second.log", name=name, model=tiny_model, memory_file=memory, **params
        )
        try:
            assert own.wait_ready(), second.text()
            assert seen(own) >= 5, second.text()
        finally:
            assert second.stop() == 0
    finally:
        own.close()


def own_node(name):
    """(parameters, Client) for a node of its own name and image topic (see the SIGKILL test); the
    tests using it take the `client` fixture for its rclpy session, so each also runs alone."""
    topic = f"/{name}/image_raw"
    return {**NODE_PARAMETERS, "image_topic": topic}, Client(name=name, image_topic=topic)


def test_a_memory_file_the_node_did_not_write_fails_configure_and_is_left_untouched(
    tiny_model, tmp_path, client
):
    """Issue 24 item 10: memory_file naming a directory with no save in it (memory_file:=/etc) or a
    plain file was renamed to <name>.unreadable-<time> and replaced by the node's own directory."""
    foreign, plain = tmp_path / "etc", tmp_path / "notes.txt"
    foreign.mkdir()
    (foreign / "hostname").write_text("robot\n")
    plain.write_text("my notes")
    params, own = own_node("fvs_foreign")
    try:
        proc = NodeProcess(
            tmp_path / "node.log", name="fvs_foreign", model=tiny_model, memory_file=foreign, **params
        )
        try:
            started = wait_until(
                lambda: any(m in proc.text() for m in ("configure failed", "watching /")), 600, 0.5
            )
            assert started, proc.text()
            assert f"configure failed: memory_file {foreign} holds no memory of fvs_ros" in proc.text()
            assert own.state() == "unconfigured"
            assert own.set_parameter("memory_file", str(plain)).successful
            assert not own.change_state(Transition.TRANSITION_CONFIGURE)
            assert f"memory_file {plain} is a file, not a memory directory" in proc.text()
            assert own.set_parameter("memory_file", str(tmp_path / "fresh")).successful
            assert own.change_state(Transition.TRANSITION_CONFIGURE)
            assert own.change_state(Transition.TRANSITION_ACTIVATE)
            assert own.wait_ready(), proc.text()
        finally:
            assert proc.stop() == 0
    finally:
        own.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc", "fresh", "node.log", "notes.txt"]
    assert [p.name for p in foreign.iterdir()] == ["hostname"] and (
        foreign / "hostname"
    ).read_text() == "robot\n"
    assert plain.read_text() == "my notes" and (tmp_path / "fresh" / "engine.json").is_file()


def test_conditions_added_before_the_first_save_survive_sigkill(tiny_model, tmp_path, client):
    """Issue 24 item 15b: conditions added before the first memory save live alone in watch.json;
    after a SIGKILL in that window the next start moved the whole directory aside and watched nothing."""
    memory = tmp_path / "memory"
    params, own = own_node("fvs_conditions")  # save_period_s 0: no memory save before the kill
    own.clients["/fvs_conditions/watch"] = own.node.create_client(
        Watch, "/fvs_conditions/watch", qos_profile=CLIENT_QOS
    )
    try:
        proc = NodeProcess(
            tmp_path / "first.log", name="fvs_conditions", model=tiny_model, memory_file=memory, **params
        )
        try:
            assert own.wait_ready(600), proc.text()
            assert own.call("watch", Watch.Request(command="list"), resend=2.0).success  # matched
            added = own.call("watch", Watch.Request(command="add", condition="a door is open", name="door"))
            assert added.success and added.names == ["door"], added.error
            assert not (memory / "engine.json").exists()  # conditions, no memory yet
        finally:
            proc.proc.kill()
            proc.proc.wait()
        second = NodeProcess(
            tmp_path / "second.log", name="fvs_conditions", model=tiny_model, memory_file=memory, **params
        )
        try:
            assert own.wait_ready(600), second.text()
            listed = own.call("watch", Watch.Request(command="list"), resend=2.0)
            assert listed.names == ["door"], second.text()
            assert "1 watched condition(s) restored" in second.text() and "moved aside" not in second.text()
        finally:
            assert second.stop() == 0
    finally:
        own.close()
    assert not list(tmp_path.glob("memory.unreadable-*"))
