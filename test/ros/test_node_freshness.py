"""memory_lag_s over DDS: the node's Ask response and scene summaries say how old their memory is.

A real node process (tiny random model) and this test's own rclpy node; images are stamped
0.25 s apart at memory_fps 1, so the newest image received is never older than the memory's
newest frame and mostly newer.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from support.dds import ClientNode, image_msg, rclpy_session, seconds, to_stamp
from support.node_process import NodeProcess

from fvs_ros.msg import SceneSummary
from fvs_ros.srv import Ask

T0, STEP, N = 2000.0, 0.25, 14  # image stamps T0, T0 + 0.25, ..., T0 + 3.25


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory):
    proc = NodeProcess(
        tmp_path_factory.mktemp("logs") / "node.log",
        model=tiny_model,
        memory_fps=1.0,
        summary_period_s=0.5,
        max_new_tokens=4,
        summary_max_new_tokens=4,
        max_prefix_lag_s=0.0,
        reliability="reliable",
        qos_depth=10,  # the reliable queue rides out a loaded machine
    )
    yield proc
    proc.stop(30)


@pytest.fixture(scope="module")
def client(node):
    yield from rclpy_session(lambda: ClientNode("fvs_freshness_client").spin())


def _ask(ask, timeout=120.0) -> Ask.Response:
    """One Ask call; a reply lost while DDS matches is sent again."""
    deadline = time.monotonic() + timeout
    assert ask.wait_for_service(timeout_sec=timeout), "no /fvs/ask"
    while time.monotonic() < deadline:
        future = ask.call_async(Ask.Request(question="What is there?", timeout_s=20.0))
        end = time.monotonic() + 5.0
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        if future.done():
            return future.result()
        ask.remove_pending_request(future)
    raise AssertionError("no Ask response")


def test_answers_and_summaries_carry_memory_lag(node, client):
    summaries = []
    client.node.create_subscription(SceneSummary, "/fvs/scene_summary", summaries.append, 10)
    ask = client.node.create_client(Ask, "/fvs/ask")
    empty = _ask(ask)
    assert empty.success and empty.frames_seen == 0 and empty.memory_lag_s == -1.0, node.text()

    pub = client.node.create_publisher(
        Image, "/image_raw", QoSProfile(depth=N, reliability=ReliabilityPolicy.RELIABLE)
    )
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0:
        assert time.monotonic() < deadline, "the node did not subscribe"
        time.sleep(0.05)
    rng = np.random.default_rng(0)
    stamps = [T0 + i * STEP for i in range(N)]
    for t in stamps:
        pub.publish(image_msg(rng.integers(0, 256, (112, 224, 3), dtype=np.uint8), "rgb8", to_stamp(t)))
        time.sleep(0.02)

    deadline = time.monotonic() + 60
    while True:  # until the frame at T0 + 3 is in memory
        r = _ask(ask)
        assert r.success, (r.error, node.text())
        if seconds(r.last_frame_stamp) >= T0 + 3.0 - 1e-6 or time.monotonic() > deadline:
            break
    assert seconds(r.last_frame_stamp) == pytest.approx(T0 + 3.0), node.text()
    # once the last image (T0 + 3.25, reliable, in order, not sampled into memory) has arrived, the
    # lag is exactly 0.25 s; until then it is 0 (the newest image received is the memory's last)
    deadline, lags = time.monotonic() + 60, []
    while not lags or abs(lags[-1] - 0.25) > 1e-4:
        assert time.monotonic() < deadline, f"memory_lag_s never 0.25: {lags}"
        r = _ask(ask)
        assert seconds(r.last_frame_stamp) == pytest.approx(T0 + 3.0)
        lags.append(r.memory_lag_s)
    assert all(min(abs(lag - x) for x in (0.0, 0.25)) < 1e-4 for lag in lags), lags

    deadline = time.monotonic() + 30
    while not any(seconds(s.last_frame_stamp) >= T0 + 3.0 - 1e-6 for s in summaries):
        assert time.monotonic() < deadline, "no scene summary of the newest memory"
        time.sleep(0.05)
    s = next(s for s in summaries if seconds(s.last_frame_stamp) >= T0 + 3.0 - 1e-6)
    # a summary may start before the last image arrived: its lag counts from the newest received then
    assert min(abs(s.memory_lag_s - lag) for lag in (0.0, 0.25)) < 1e-4, s.memory_lag_s
