"""The generated fvs_ros interfaces work across processes over DDS (issue 2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rclpy
from rclpy.node import Node

from fvs_ros.msg import SceneSummary
from fvs_ros.srv import Ask

SERVER = Path(__file__).parents[1] / "support" / "interface_server.py"
NAMESPACE = "/fvs_interface_test"


@pytest.fixture
def server_process():
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--ros-args", "-r", f"__ns:={NAMESPACE}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def client_node():
    rclpy.init()
    node = Node("interface_client")
    yield node
    node.destroy_node()
    rclpy.shutdown()


def spin_until(node, done, timeout):
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
    return done()


def test_generated_types_are_rosidl_types():
    assert Ask.__module__.startswith("fvs_ros.srv")
    assert SceneSummary.__module__.startswith("fvs_ros.msg")
    # rosidl-generated classes load their C typesupport; hand-written ones have none.
    SceneSummary.__import_type_support__()
    Ask.Request.__import_type_support__()
    assert SceneSummary._TYPE_SUPPORT is not None
    assert Ask.Request._TYPE_SUPPORT is not None
    request_fields = Ask.Request.get_fields_and_field_types()
    assert request_fields == {
        "question": "string",
        "timeout_s": "float",
        "max_new_tokens": "uint32",
        "want_images": "boolean",
        "cameras": "sequence<string>",  # issue 20: the cameras a question is about
    }
    response_fields = Ask.Response.get_fields_and_field_types()
    for name in (
        "success",
        "answer",
        "error",
        "frames_seen",
        "frames_in_memory",
        "first_frame_stamp",
        "last_frame_stamp",
        "time_to_first_token_s",
        "total_time_s",
        "num_tokens",
        "evidence",
        "memory_attention",
        "evidence_images",
    ):
        assert name in response_fields
    assert SceneSummary.get_fields_and_field_types()["header"] == "std_msgs/Header"


def test_ask_and_summary_across_processes(server_process, client_node):
    summaries = []
    client_node.create_subscription(SceneSummary, f"{NAMESPACE}/scene_summary", summaries.append, 10)
    client = client_node.create_client(Ask, f"{NAMESPACE}/ask")
    assert client.wait_for_service(timeout_sec=20), "Ask service never appeared"

    request = Ask.Request(question="What is on the table?", timeout_s=3.5, max_new_tokens=17)
    future = client.call_async(request)
    assert spin_until(client_node, future.done, 20)
    response = future.result()
    assert response.success
    assert response.answer == "?elbat eht no si tahW"
    assert response.frames_seen == 42 and response.frames_in_memory == 7
    assert (response.last_frame_stamp.sec, response.last_frame_stamp.nanosec) == (2, 500_000_000)
    assert response.total_time_s == pytest.approx(3.5)
    assert response.num_tokens == 17

    assert spin_until(client_node, lambda: len(summaries) >= 2, 20), "no SceneSummary arrived"
    first = summaries[0]
    assert first.summary.startswith("summary ")
    assert first.header.frame_id == "camera"
    assert first.frames_dropped == 3
    assert summaries[1].frames_seen > first.frames_seen


def test_ask_action_mirrors_the_ask_service():
    """fvs_ros/action/Ask is the streaming Ask: same request and response fields (one filler in the node)."""
    from fvs_ros.action import Ask as AskAction

    AskAction.Goal.__import_type_support__()
    assert AskAction.Goal.get_fields_and_field_types() == Ask.Request.get_fields_and_field_types()
    assert AskAction.Result.get_fields_and_field_types() == Ask.Response.get_fields_and_field_types()
    assert AskAction.Feedback.get_fields_and_field_types() == {"text": "string", "num_tokens": "uint32"}
