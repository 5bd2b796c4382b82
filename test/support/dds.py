"""What the DDS tests' own side needs: waiting, stamps, image messages, and an rclpy node of the
test process spun in a thread of its own."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import Image


def wait_until(predicate, timeout, period=0.1):
    """Poll `predicate` every `period` s until it is truthy or `timeout` s passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    return predicate()


def seconds(stamp) -> float:
    """A builtin_interfaces/Time as seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def to_stamp(t: float) -> tuple[int, int]:
    """Seconds as (sec, nanosec) of a builtin_interfaces/Time."""
    sec = math.floor(t)
    return sec, int(round((t - sec) * 1e9))


def image_msg(
    pixels: np.ndarray, encoding="rgb8", stamp=None, frame_id="test_camera", data=None, **fields
) -> Image:
    """An Image of `pixels`, stamped (sec, nanosec) unless `stamp` is None. `data` and `fields`
    (height, width, step, is_bigendian) replace what `pixels` gives, to make malformed images."""
    msg = Image(
        encoding=encoding,
        **{"height": pixels.shape[0], "width": pixels.shape[1], "step": pixels.strides[0], **fields},
    )
    msg.header.frame_id = frame_id
    if stamp is not None:
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.data = pixels.tobytes() if data is None else data
    return msg


class ClientNode:
    """An rclpy node of the test process. A subclass creates its publishers, subscriptions and
    clients on self.node, then calls spin(): a SingleThreadedExecutor spins it in a daemon thread."""

    def __init__(self, name: str):
        self.node = rclpy.create_node(name)

    def spin(self) -> ClientNode:
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        return self

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


def rclpy_session(make):
    """For a module fixture (`yield from rclpy_session(Client)`): rclpy initialised, the ClientNode
    `make()` returns, closed and rclpy shut down after the module's tests."""
    rclpy.init()
    client = make()
    yield client
    client.close()
    rclpy.shutdown()
