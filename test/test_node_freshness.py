"""memory_lag_s over DDS: the node's Ask response and scene summaries say how old their memory is.

A real node process (tiny random model) and this test's own rclpy node; images are stamped
0.25 s apart at memory_fps 1, so the newest image received is never older than the memory's
newest frame and mostly newer.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from fvs_ros.msg import SceneSummary
from fvs_ros.srv import Ask

ROOT = Path(__file__).resolve().parents[1]
T0, STEP, N = 2000.0, 0.25, 14  # image stamps T0, T0 + 0.25, ..., T0 + 3.25


def _seconds(t) -> float:
    return t.sec + t.nanosec * 1e-9


@pytest.fixture(scope="module")
def node_and_client(tmp_path_factory):
    model = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run([sys.executable, "-m", "fvs_ros.model.tiny", str(model)], check=True, capture_output=True)
    log_path = tmp_path_factory.mktemp("logs") / "node.log"
    params = dict(
        model=model,
        memory_fps=1.0,
        summary_period_s=0.5,
        max_new_tokens=4,
        summary_max_new_tokens=4,
        max_prefix_lag_s=0.0,
        reliability="reliable",
        qos_depth=10,  # the reliable queue rides out a loaded machine
    )
    args = [sys.executable, "-m", "fvs_ros.node", "--autostart", "--ros-args"]
    args += ["--params-file", str(ROOT / "config" / "fvs.yaml")]
    for name, value in params.items():
        args += ["-p", f"{name}:={value}"]
    log = open(log_path, "w")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    client = rclpy.create_node("fvs_freshness_client")
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        yield proc, client, log_path
    finally:
        executor.shutdown()
        client.destroy_node()
        rclpy.shutdown()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _ask(ask, timeout=30.0) -> Ask.Response:
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


def test_answers_and_summaries_carry_memory_lag(node_and_client):
    proc, client, log_path = node_and_client
    summaries = []
    client.create_subscription(SceneSummary, "/fvs/scene_summary", summaries.append, 10)
    ask = client.create_client(Ask, "/fvs/ask")
    empty = _ask(ask)
    assert empty.success and empty.frames_seen == 0 and empty.memory_lag_s == -1.0, log_path.read_text()

    pub = client.create_publisher(
        Image, "/image_raw", QoSProfile(depth=N, reliability=ReliabilityPolicy.RELIABLE)
    )
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0:
        assert time.monotonic() < deadline, "the node did not subscribe"
        time.sleep(0.05)
    rng = np.random.default_rng(0)
    stamps = [T0 + i * STEP for i in range(N)]
    for t in stamps:
        msg = Image(encoding="rgb8", height=112, width=224, step=224 * 3)
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(t), int(round((t - int(t)) * 1e9))
        msg.data = rng.integers(0, 256, (112, 224, 3), dtype=np.uint8).tobytes()
        pub.publish(msg)
        time.sleep(0.02)

    deadline = time.monotonic() + 60
    while True:  # until the frame at T0 + 3 is in memory
        r = _ask(ask)
        assert r.success, (r.error, log_path.read_text())
        if _seconds(r.last_frame_stamp) >= T0 + 3.0 - 1e-6 or time.monotonic() > deadline:
            break
    assert _seconds(r.last_frame_stamp) == pytest.approx(T0 + 3.0), log_path.read_text()
    r = _ask(ask)  # every image has arrived by now (reliable, in order): the newest is T0 + 3.25
    assert _seconds(r.last_frame_stamp) == pytest.approx(T0 + 3.0)
    assert r.memory_lag_s == pytest.approx(0.25, abs=1e-4)

    deadline = time.monotonic() + 30
    while not any(_seconds(s.last_frame_stamp) >= T0 + 3.0 - 1e-6 for s in summaries):
        assert time.monotonic() < deadline, "no scene summary of the newest memory"
        time.sleep(0.05)
    s = next(s for s in summaries if _seconds(s.last_frame_stamp) >= T0 + 3.0 - 1e-6)
    # a summary may start before the last image arrived: its lag counts from the newest received then
    assert min(abs(s.memory_lag_s - lag) for lag in (0.0, 0.25)) < 1e-4, s.memory_lag_s
