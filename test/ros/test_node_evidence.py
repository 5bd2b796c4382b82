"""Evidence, the memory view and the streaming Ask action over DDS (issue 13).

A real node process (tiny random model, config/fvs.yaml) and this test's own rclpy node in
separate processes. Every frame sent is one solid colour, unique to its stamp, so an evidence
image or a memory-view tile shows which frame it is. The tests run in order and share the node.
"""

from __future__ import annotations

import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from support.dds import ClientNode, image_msg, rclpy_session, seconds, to_stamp, wait_until
from support.node_process import ROOT, NodeProcess

from fvs_ros.action import Ask as AskAction
from fvs_ros.msg import Evidence
from fvs_ros.ros.ask_action import MAX_GOALS
from fvs_ros.ros.params import load_defaults
from fvs_ros.srv import Ask

T0, STEP, N = 1000.0, 0.5, 10  # frame stamps T0, T0 + 0.5, ...
LONG = 1000  # tokens of an answer long enough to cancel (the tiny random model does not stop early)
PER_SLOT = load_defaults()["frames_per_slot"]  # a memory slot: this many frames, stamped with its last


def colour(i: int) -> np.ndarray:
    return np.array([(40 + 67 * i) % 256, (200 - 31 * i) % 256, (90 + 113 * i) % 256], np.uint8)


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory):
    proc = NodeProcess(
        tmp_path_factory.mktemp("logs") / "node.log",
        model=tiny_model,
        memory_fps=0.0,  # every frame enters memory
        reliability="reliable",
        qos_depth=10,  # all N frames fit the reliable queue: none is dropped on a loaded machine
        max_new_tokens=LONG,
        summary_period_s=0.0,
        max_prefix_lag_s=0.0,
        evidence_frames=3,
        memory_view_period_s=1.0,
    )
    yield proc
    proc.stop(30)


class Client(ClientNode):
    def __init__(self):
        super().__init__("fvs_evidence_client")
        qos = QoSProfile(depth=N, reliability=ReliabilityPolicy.RELIABLE)
        self.images = self.node.create_publisher(Image, "/image_raw", qos)
        self.ask_client = self.node.create_client(Ask, "/fvs/ask")
        self.action = ActionClient(self.node, AskAction, "/fvs/ask_stream")
        self.spin()

    def ask(self, question="What is happening?", timeout=60.0, **fields) -> Ask.Response:
        """One Ask call; a reply lost while DDS matches the service is asked again."""
        assert self.ask_client.wait_for_service(timeout_sec=timeout), "no /fvs/ask"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            future = self.ask_client.call_async(Ask.Request(question=question, timeout_s=30.0, **fields))
            if wait_until(future.done, 40.0 if question else 1.0):
                return future.result()
            self.ask_client.remove_pending_request(future)
        raise AssertionError("no Ask response")

    def send(self, i: int):
        pixels = np.ascontiguousarray(np.broadcast_to(colour(i), (120, 160, 3)))
        self.images.publish(image_msg(pixels, "rgb8", to_stamp(T0 + i * STEP)))

    def goal(self, max_new_tokens: int, question="Describe the video."):
        """Send a goal; returns (goal handle, feedback list, result future)."""
        assert self.action.wait_for_server(timeout_sec=30), "no /fvs/ask_stream"
        feedback = []
        sent = self.action.send_goal_async(
            AskAction.Goal(question=question, max_new_tokens=max_new_tokens, timeout_s=60.0),
            feedback_callback=lambda msg: feedback.append(msg.feedback),
        )
        assert wait_until(sent.done, 30) and sent.result().accepted
        handle = sent.result()
        return handle, feedback, handle.get_result_async()


@pytest.fixture(scope="module")
def client(node):
    yield from rclpy_session(Client)


@pytest.fixture(scope="module")
def fed(node, client):
    """The N frames, once the node has them all in memory."""
    assert wait_until(lambda: client.images.get_subscription_count() > 0, 60), node.text()
    for i in range(N):
        client.send(i)
        time.sleep(0.05)
    assert wait_until(lambda: client.ask(max_new_tokens=1).frames_seen == N, 60), node.text()
    return [T0 + i * STEP for i in range(N)]


def test_answer_evidence_names_frames_the_node_received(fed, client):
    r = client.ask(max_new_tokens=6, want_images=True)
    assert r.success, r.error
    assert 1 <= len(r.evidence) <= 3 and len(r.evidence_images) == len(r.evidence)
    shares = [e.share for e in r.evidence]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-5
    assert 0 < r.memory_attention < 1
    for e, image in zip(r.evidence, r.evidence_images, strict=True):
        stamp = round(seconds(e.stamp), 6)
        frame = fed.index(stamp)  # a frame the node received: the last of its slot
        assert e.slot == frame // PER_SLOT and frame % PER_SLOT == PER_SLOT - 1
        assert e.kind in (Evidence.DETAIL, Evidence.CONTEXT) and e.weight >= 1
        assert fed[0] <= seconds(e.span_start) <= stamp <= seconds(e.span_end) <= fed[-1]
        assert image.format == "jpeg" and seconds(image.header.stamp) == pytest.approx(stamp)
        rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(bytes(image.data), np.uint8), cv2.IMREAD_COLOR), 4)
        assert rgb.shape == (120, 160, 3)
        assert np.abs(rgb.reshape(-1, 3).mean(0) - colour(frame)).max() < 6  # the frame of that stamp
    assert not client.ask(max_new_tokens=2).evidence_images  # images only when asked for


def test_memory_view_is_latched_and_decodable(fed, client):
    views = []
    qos = QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
    )
    sub = client.node.create_subscription(Image, "/fvs/memory_view", views.append, qos)  # joins late
    try:
        assert wait_until(lambda: views, 60), "no memory view for a late subscriber"  # latched
        # within a period of the last frame (at most once a second), the view of the whole memory
        assert wait_until(lambda: seconds(views[-1].header.stamp) == pytest.approx(fed[-1]), 60)
    finally:
        client.node.destroy_subscription(sub)
    view = views[-1]
    assert view.encoding == "rgb8" and view.step == view.width * 3 and view.header.frame_id == "test_camera"
    image = np.frombuffer(bytes(view.data), np.uint8).reshape(view.height, view.width, 3)
    shown = {i for i in range(N) if np.all(image == colour(i), axis=-1).sum() > 100}
    evidence = client.ask(max_new_tokens=2).evidence
    detail = {fed.index(round(seconds(e.stamp), 6)) for e in evidence if e.kind == Evidence.DETAIL}
    assert len(shown) >= 2 and detail <= shown  # tiles show frames fed, the detail frames among them


def test_action_streams_feedback_before_its_result(fed, client):
    handle, feedback, result = client.goal(12)
    assert wait_until(result.done, 60)
    seen_before_result = len(feedback)
    r = result.result()
    assert r.status == GoalStatus.STATUS_SUCCEEDED and r.result.success, r.result.error
    assert seen_before_result >= 2
    texts = [f.text for f in feedback]
    assert all(
        b.startswith(a) for a, b in zip(texts, texts[1:], strict=False)
    ) and r.result.answer.startswith(texts[-1])
    assert [f.num_tokens for f in feedback] == list(range(1, len(feedback) + 1))
    assert r.result.evidence and round(seconds(r.result.evidence[0].stamp), 6) in fed


def test_cancelled_goal_ends_early_and_frees_the_model(fed, client):
    full = client.ask("Describe the video.", max_new_tokens=LONG)
    assert full.success and full.num_tokens == LONG  # what a goal left running would cost
    handle, feedback, result = client.goal(LONG)
    assert wait_until(lambda: len(feedback) >= 2, 30)
    cancel = handle.cancel_goal_async()
    assert wait_until(cancel.done, 30) and cancel.result().goals_canceling
    assert wait_until(result.done, 30)
    r = result.result()
    assert r.status == GoalStatus.STATUS_CANCELED
    assert not r.result.success and r.result.error == "cancelled"
    assert r.result.answer.startswith(feedback[1].text) and len(feedback) < LONG
    # issue 24 item 17: the result says how far it got and from which memory (it said 0 and 0)
    n = r.result.num_tokens
    assert n >= 2 and (r.result.frames_seen, r.result.frames_in_memory) == (
        full.frames_seen,
        full.frames_in_memory,
    )
    assert seconds(r.result.last_frame_stamp) == seconds(full.last_frame_stamp)
    assert wait_until(lambda: len(feedback) >= n, 30) and feedback[n - 1].text == r.result.answer
    after = client.ask("What is on the table?", max_new_tokens=4)
    assert after.success
    # a generation still running would hold the model for most of `full` before this one starts
    assert after.time_to_first_token_s < full.total_time_s / 2, (
        after.time_to_first_token_s,
        full.total_time_s,
    )


def test_goals_beyond_the_limit_are_rejected_and_cancelled_ones_end(fed, client):
    running = [client.goal(LONG) for _ in range(MAX_GOALS)]
    sent = client.action.send_goal_async(AskAction.Goal(question="One more?", max_new_tokens=4))
    assert wait_until(sent.done, 30) and not sent.result().accepted
    for handle, _, _ in running:
        handle.cancel_goal_async()
    for _, _, result in running:  # queued ones never start, the generating one stops
        assert wait_until(result.done, 30) and result.result().status == GoalStatus.STATUS_CANCELED
    handle, _, result = client.goal(4)  # room again
    assert wait_until(result.done, 60) and result.result().status == GoalStatus.STATUS_SUCCEEDED


def test_fvs_ask_streams_and_writes_the_evidence_images(fed, client, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fvs_ros.cli.ask", "--stream", "--max-new-tokens", "8"]
        + ["--images", str(tmp_path), "What is happening?"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Q: What is happening?\nA: ") and "evidence (" in out.stdout
    images = sorted(tmp_path.glob("evidence_*.jpg"))
    assert images and all(cv2.imread(str(p)) is not None for p in images)
