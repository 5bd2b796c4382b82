"""A stand-alone process serving fvs_ros/srv/Ask and publishing fvs_ros/msg/SceneSummary.

Used by test_interfaces.py to prove the generated types work across processes over
DDS, independently of the real node. It answers with the question reversed so the
test can tell the reply was computed from its request.
"""

import sys

import rclpy
from rclpy.node import Node

from fvs_ros.msg import SceneSummary
from fvs_ros.srv import Ask


class InterfaceServer(Node):
    def __init__(self):
        super().__init__("interface_server")
        self.create_service(Ask, "ask", self.on_ask)
        self.summary_pub = self.create_publisher(SceneSummary, "scene_summary", 10)
        self.create_timer(0.1, self.publish_summary)
        self.count = 0

    def on_ask(self, request, response):
        response.success = bool(request.question)
        response.answer = request.question[::-1]
        response.error = "" if request.question else "empty question"
        response.frames_seen = 42
        response.frames_in_memory = 7
        response.first_frame_stamp.sec = 1
        response.last_frame_stamp.sec = 2
        response.last_frame_stamp.nanosec = 500_000_000
        response.time_to_first_token_s = 0.25
        response.total_time_s = float(request.timeout_s)
        response.num_tokens = request.max_new_tokens
        return response

    def publish_summary(self):
        self.count += 1
        msg = SceneSummary()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "camera"
        msg.summary = f"summary {self.count}"
        msg.frames_seen = self.count
        msg.frames_dropped = 3
        msg.generation_time_s = 0.5
        self.summary_pub.publish(msg)


def main():
    rclpy.init(args=sys.argv)
    node = InterfaceServer()
    print("ready", flush=True)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
