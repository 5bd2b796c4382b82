"""The test process's client of an fvs node (test_node.py, test_node_robustness.py,
test_fuzz_images.py): images out over reliable QoS, services, /diagnostics and scene summaries in."""

import time

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from fvs_ros.msg import SceneSummary
from fvs_ros.ros.qos import CLIENT_QOS
from fvs_ros.srv import Ask

from .dds import ClientNode, image_msg, to_stamp, wait_until

FPS = 5.0  # memory_fps; test frames are stamped 1/FPS apart so every one is sampled
RNG = np.random.default_rng(0)
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def frame(h=120, w=160):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


class Client(ClientNode):
    """This test's own ROS node: publishers, subscriptions and service calls, spun in a thread."""

    def __init__(self, name="fvs", image_topic="/image_raw", namespace=""):
        super().__init__(f"{name}_test_client")
        self.name = name
        self.prefix = f"{namespace.rstrip('/')}/{name}"  # the node's full name
        self.raw = self.node.create_publisher(Image, image_topic, RELIABLE)
        self.compressed = self.node.create_publisher(CompressedImage, f"{image_topic}/compressed", RELIABLE)
        self.summaries, self.diagnostics = [], []
        self.node.create_subscription(SceneSummary, f"{self.prefix}/scene_summary", self.summaries.append, 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.clients = {
            f"{self.prefix}/{service}": self.node.create_client(
                srv_type, f"{self.prefix}/{service}", qos_profile=CLIENT_QOS
            )
            for service, srv_type in [
                ("ask", Ask),
                ("reset", Trigger),
                ("save_memory", Trigger),
                ("change_state", ChangeState),
                ("get_state", GetState),
                ("set_parameters", SetParameters),
            ]
        }
        self.spin()
        self.stamp = 1000.0  # stream time of the next frame

    def _on_diagnostics(self, msg):
        for status in msg.status:
            if status.name.startswith(f"{self.name}:"):
                self.diagnostics.append(
                    {
                        "level": status.level,
                        "message": status.message,
                        **{kv.key: kv.value for kv in status.values},
                    }
                )

    def call(self, name, request, timeout=90.0, resend=None):
        """Call a service through its persistent client (created early, so DDS has matched it).

        Idempotent requests may be `resend` every so many seconds: see wait_ready."""
        client = self.service(name)
        assert client.wait_for_service(timeout_sec=timeout), f"{name} not available"
        deadline = time.monotonic() + timeout
        while True:
            future = client.call_async(request)
            if wait_until(future.done, min(resend or timeout, deadline - time.monotonic()), period=0.01):
                return future.result()
            client.remove_pending_request(future)
            assert time.monotonic() < deadline, f"{name}: no response within {timeout} s"

    def service(self, name):
        """The persistent client of service `name`: relative to the node ("ask") or absolute."""
        return self.clients[name if name.startswith("/") else f"{self.prefix}/{name}"]

    def wait_ready(self, timeout=60.0):
        """Until the node answers: a reply of a just-matched service can be lost (Fast DDS matches the
        server's reply writer after the client sees the service), so ping with a request the node
        refuses at once (an empty question) until one comes back."""
        client = self.service("ask")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.wait_for_service(timeout_sec=1.0):
                future = client.call_async(Ask.Request(question=""))
                if wait_until(future.done, 1.0, period=0.01):
                    return True
                client.remove_pending_request(future)
        return False

    def ask(self, question="What is happening?", timeout_s=60.0, **fields):
        return self.call("ask", Ask.Request(question=question, timeout_s=timeout_s, **fields))

    def next_stamp(self, step=1.0 / FPS):
        self.stamp += step
        return to_stamp(self.stamp)

    def image(
        self,
        pixels,
        encoding,
        step=None,
        height=None,
        width=None,
        data=None,
        stamp_step=1.0 / FPS,
        stamped=True,
    ):
        replaced = {k: v for k, v in dict(step=step, height=height, width=width).items() if v is not None}
        stamp = self.next_stamp(stamp_step) if stamped else None
        self.raw.publish(image_msg(pixels, encoding, stamp, data=data, **replaced))

    def jpeg(self, rgb=None, data=None, fmt="jpeg"):
        msg = CompressedImage(format=fmt)
        msg.header.frame_id = "test_camera"
        msg.header.stamp.sec, msg.header.stamp.nanosec = self.next_stamp()
        if data is None:
            data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[
                1
            ].tobytes()
        msg.data = data
        self.compressed.publish(msg)

    def change_state(self, transition_id):
        return self.call("change_state", ChangeState.Request(transition=Transition(id=transition_id))).success

    def state(self):
        return self.call("get_state", GetState.Request(), resend=2.0).current_state.label

    def set_parameter(self, name, value):
        request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        return self.call("set_parameters", request, resend=2.0).results[0]

    def reactivate(self, **parameters):
        """Deactivate, set ACTIVATE-time parameters, activate; the publishers then wait for the new
        subscription (a message published before the match is lost even over reliable QoS)."""
        assert self.change_state(Transition.TRANSITION_DEACTIVATE)
        for name, value in parameters.items():
            result = self.set_parameter(name, value)
            assert result.successful, result.reason
        assert self.change_state(Transition.TRANSITION_ACTIVATE)
        self.wait_matched()

    def wait_matched(self, timeout=30.0):
        """Until the node's image subscription matches one of our publishers."""
        assert wait_until(
            lambda: self.raw.get_subscription_count() + self.compressed.get_subscription_count() >= 1, timeout
        ), "the node's image subscription did not match"


OUTCOMES = (  # what becomes of a frame the node received: exactly one of these (docs/node.md)
    "frames_unsupported",
    "frames_malformed",
    "frames_failed",
    "frames_rejected",
    "frames_skipped_by_sampling",
    "frames_dropped",
    "frames_into_memory",
)


def frames_unaccounted(before: dict, after: dict) -> int:
    """Frames received between two /diagnostics statuses that no outcome counted: once the queue is
    empty, 0, or 1 (the first frame of a two-frame slot waiting for its second)."""
    received = int(after["frames_received"]) - int(before["frames_received"])
    return received - sum(int(after[k]) - int(before[k]) for k in OUTCOMES)


def latest_diagnostics(client, timeout=10.0):
    """The first diagnostics status published after this call."""
    count = len(client.diagnostics)
    assert wait_until(lambda: len(client.diagnostics) > count, timeout), "no diagnostics"
    return client.diagnostics[-1]
