"""A camera stand-in: publishes a video file's frames (or a test pattern) at their recorded timing.

    python -m fvs_ros.cli.video_source --ros-args -p video:=clip.mp4 [-p topic:=image_raw] [-p loop:=true]
        [-p reliability:=reliable]
    ros2 run fvs_ros fvs_video_source --ros-args -p video:=clip.mp4

Frames go out as sensor_msgs/Image rgb8 on `topic`, or as jpeg sensor_msgs/CompressedImage on
`<topic>/compressed` with transport:=compressed, stamped with the node clock when sent (like a
camera driver). An empty `video` publishes a synthetic pattern (a moving square and the frame
number) at `fps`, so demos and tests need no video file. A video that cannot be read ends the
process with exit status 1 and an error saying so (a node without its camera must not look fine).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from typing import Iterator

import cv2
import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image

VIDEO_HINT = "set video:= to a readable video file, or leave it empty for the synthetic test pattern"


class VideoSource(Node):
    """Publishes frames from a thread, paced by the video's own timestamps."""

    def __init__(self, **kwargs):
        super().__init__("video_source", **kwargs)
        self.video = self.declare_parameter("video", "").value
        topic = self.declare_parameter("topic", "image_raw").value
        self.compressed = self.declare_parameter("transport", "raw").value == "compressed"
        # best_effort (sensor data) or reliable: what the subscriber asks for (a best-effort publisher
        # never matches a reliable subscription)
        reliable = self.declare_parameter("reliability", "best_effort").value == "reliable"
        self.rate = self.declare_parameter("rate", 1.0).value  # playback speed factor
        self.loop = self.declare_parameter("loop", True).value
        self.fps = self.declare_parameter("fps", 10.0).value  # synthetic pattern only
        size = self.declare_parameter("size", [360, 640]).value  # synthetic pattern only: height, width
        self.frame_id = self.declare_parameter("frame_id", "camera").value
        self.size = (int(size[0]), int(size[1]))
        qos = (
            QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
            if reliable
            else qos_profile_sensor_data
        )
        self.pub = (
            self.create_publisher(CompressedImage, topic.rstrip("/") + "/compressed", qos)
            if self.compressed
            else self.create_publisher(Image, topic, qos)
        )
        self.published = 0
        self.error = ""  # why playing failed ('' while it has not)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._play, name="video-source", daemon=True)
        self.get_logger().info(f"publishing {self.video or 'a synthetic pattern'} on {self.pub.topic_name}")

    def _frames(self) -> Iterator[tuple[np.ndarray, float]]:
        """(RGB frame, seconds since the start of the video), once through."""
        if not self.video:
            for i in range(int(self.fps * 60)):  # one minute, then loop
                yield synthetic_frame(i, *self.size), i / self.fps
            return
        if not os.path.isfile(self.video):
            raise RuntimeError(f"no video file {self.video!r}: {VIDEO_HINT}")
        cap = cv2.VideoCapture(self.video)
        if not cap.isOpened():
            raise RuntimeError(f"cannot decode video {self.video!r} (not a video OpenCV reads): {VIDEO_HINT}")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        try:
            for index in itertools.count():
                ok, bgr = cap.read()
                if not ok:
                    return
                t = index / fps if fps > 0 else cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), t
        finally:
            cap.release()

    def _play(self):
        try:
            while not self.stopped.is_set():
                start = time.monotonic()
                for frame, t in self._frames():
                    if self.stopped.wait(max(start + t / self.rate - time.monotonic(), 0.0)):
                        break
                    self.pub.publish(self._message(frame))
                    self.published += 1
                if not self.loop:
                    break
        except Exception as e:  # noqa: BLE001 - reported, then the process ends with status 1
            self.error = str(e)
            self.get_logger().error(self.error)
        finally:
            self.get_logger().info(f"video source done after {self.published} frames")

    def _message(self, rgb: np.ndarray):
        stamp = self.get_clock().now().to_msg()
        if self.compressed:
            msg = CompressedImage(format="jpeg")
            msg.data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        else:
            msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3)
            msg.data = rgb.tobytes()
        msg.header.stamp, msg.header.frame_id = stamp, self.frame_id
        return msg


def synthetic_frame(i: int, height: int = 360, width: int = 640) -> np.ndarray:
    """Frame i of the test pattern: a colour gradient, a square moving across it, the frame number."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, (i * 3) % 256)], -1
    ).astype(np.uint8)
    side = max(height // 4, 8)
    x0 = (i * 8) % max(width - side, 1)
    frame[height // 3 : height // 3 + side, x0 : x0 + side] = (255, 255, 255)
    cv2.putText(frame, f"frame {i}", (10, height - 20), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2)
    return frame


def main(args=None):
    """Entry point of `fvs_video_source` / `python -m fvs_ros.cli.video_source`."""
    rclpy.init(args=sys.argv if args is None else args, signal_handler_options=SignalHandlerOptions.NO)
    node = VideoSource()
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started in the background by a shell
        signal.signal(signum, lambda *_: node.stopped.set())
    node.thread.start()
    try:
        while not node.stopped.is_set() and node.thread.is_alive():
            rclpy.spin_once(node, timeout_sec=0.1)
    finally:
        node.stopped.set()
        node.thread.join()
        node.destroy_node()
        rclpy.try_shutdown()
    sys.exit(1 if node.error else 0)


if __name__ == "__main__":
    main()
