"""One node, two cameras, one model, over DDS (issue 20): a real node process (tiny random model)
with `cameras: [front, wrist]`, the wrist camera on a fully qualified topic of another robot's
namespace, and this test's own rclpy node.

Each camera's frames carry stamps of their own range, so a frames_seen count, an evidence stamp
or a restored memory says which camera's frames it holds. The tests run in order (one scenario:
feed, ask, bad images, watch, save, restart) and share the node.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger
from support.dds import ClientNode, image_msg, rclpy_session, seconds, to_stamp, wait_until
from support.node_process import NodeProcess

from fvs_ros.srv import Ask, Watch

TOPICS = {"front": "/front/image_raw", "wrist": "/robot2/wrist/image_raw"}
T0 = {"front": 1000.0, "wrist": 5000.0}  # each camera's stamps: T0 + 0.5 i
SENT = {"front": 4, "wrist": 6}
LONG = 120.0


def stamps(camera: str, n: int) -> list[float]:
    return [T0[camera] + 0.5 * i for i in range(n)]


def start_node(log, tiny_model, memory_dir):
    return NodeProcess(
        log,
        model=tiny_model,
        cameras="[front,wrist]",
        **{"cameras.wrist.image_topic": TOPICS["wrist"]},
        memory_fps=0.0,  # every frame enters memory
        frames_per_slot=2,
        reliability="reliable",
        qos_depth=10,
        summary_period_s=0.0,
        max_prefix_lag_s=0.0,
        evidence_frames=3,
        memory_file=str(memory_dir),
        save_period_s=0.0,
    )


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memory") / "fvs"


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory, memory_dir):
    holder = {"proc": start_node(tmp_path_factory.mktemp("logs") / "node.log", tiny_model, memory_dir)}
    yield holder
    holder["proc"].stop(60)


class Client(ClientNode):
    def __init__(self):
        super().__init__("fvs_cameras_client")
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.images = {name: self.node.create_publisher(Image, topic, qos) for name, topic in TOPICS.items()}
        self.ask_client = self.node.create_client(Ask, "/fvs/ask")
        self.watch_client = self.node.create_client(Watch, "/fvs/watch")
        self.save_client = self.node.create_client(Trigger, "/fvs/save_memory")
        self.statuses: dict[str, dict] = {}
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.spin()

    def _on_diagnostics(self, msg):
        for status in msg.status:
            if status.name.startswith("fvs/"):
                camera = status.name.split(":")[0].split("/", 1)[1]
                self.statuses[camera] = {kv.key: kv.value for kv in status.values}

    def call(self, client, request, timeout=LONG):
        """One service call; a reply lost while DDS matches the service is asked again."""
        assert client.wait_for_service(timeout_sec=timeout), client.srv_name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            future = client.call_async(request)
            if wait_until(future.done, 60.0, period=0.02):
                return future.result()
            client.remove_pending_request(future)
        raise AssertionError(f"no response from {client.srv_name}")

    def ask(self, cameras, **fields) -> Ask.Response:
        request = Ask.Request(question="What is happening?", timeout_s=60.0, max_new_tokens=4, **fields)
        request.cameras = list(cameras)
        return self.call(self.ask_client, request)

    def send(self, camera: str, i: int, **fields):
        rng = np.random.default_rng(1000 * len(camera) + i)
        pixels = rng.integers(0, 256, (112, 224, 3), dtype=np.uint8)
        msg = image_msg(
            pixels, "rgb8", to_stamp(stamps(camera, i + 1)[-1]), frame_id=f"{camera}_optical", **fields
        )
        self.images[camera].publish(msg)


@pytest.fixture(scope="module")
def client(node):
    yield from rclpy_session(Client)


@pytest.fixture(scope="module")
def fed(node, client):
    """Each camera's frames, once the node holds them all."""
    proc = node["proc"]
    for pub in client.images.values():
        assert wait_until(lambda p=pub: p.get_subscription_count() > 0, LONG), proc.text()
    for camera, n in SENT.items():
        for i in range(n):
            client.send(camera, i)
            time.sleep(0.05)
    for camera, n in SENT.items():
        assert wait_until(lambda c=camera, n=n: client.ask([c]).frames_seen == n, LONG), proc.text()
    return proc


def test_each_camera_answers_from_its_own_frames(fed, client):
    for camera, n in SENT.items():
        r = client.ask([camera])
        assert r.success, r.error
        assert r.frames_seen == n  # the other camera's frames never reached this memory
        assert seconds(r.first_frame_stamp) == pytest.approx(T0[camera])
        assert seconds(r.last_frame_stamp) == pytest.approx(stamps(camera, n)[-1])
        assert r.evidence, "evidence_frames is 3"
        own = {round(t, 6) for t in stamps(camera, n)}
        for e in r.evidence:
            assert e.camera == camera
            assert round(seconds(e.stamp), 6) in own


def test_a_question_about_both_cameras(fed, client):
    for cameras in ([], ["front", "wrist"], ["wrist", "front"]):  # empty: all cameras
        r = client.ask(cameras)
        assert r.success, r.error
        assert r.frames_seen == SENT["front"] + SENT["wrist"]
        assert seconds(r.first_frame_stamp) == pytest.approx(T0["front"])
        assert seconds(r.last_frame_stamp) == pytest.approx(stamps("wrist", SENT["wrist"])[-1])
        assert r.num_tokens > 0 and not r.evidence  # several memories: no evidence items


def test_unknown_camera_is_refused(fed, client):
    r = client.ask(["rear"])
    assert not r.success and "unknown camera 'rear'" in r.error and "'front'" in r.error


def test_bad_images_of_one_camera_never_touch_the_other(fed, client):
    before = client.ask(["front"])
    for i in range(3):  # data shorter than height x step: malformed
        client.send("wrist", SENT["wrist"] + i, data=b"\x00" * 10)
    assert wait_until(lambda: int(client.statuses.get("wrist", {}).get("frames_malformed", 0)) >= 3, LONG), (
        client.statuses
    )
    assert int(client.statuses["front"]["frames_malformed"]) == 0
    assert client.statuses["wrist"]["image_topic"] == TOPICS["wrist"]
    after = client.ask(["front"])
    assert after.success and after.frames_seen == before.frames_seen == SENT["front"]
    assert client.ask(["wrist"]).frames_seen == SENT["wrist"]  # the wrist memory kept its frames too


def test_watch_names_its_cameras(fed, client):
    add = Watch.Request(command="add", condition="a person is at the door", name="door")
    add.cameras = ["front"]
    r = client.call(client.watch_client, add)
    assert r.success, r.error
    assert list(r.names) == ["door"] and list(r.condition_cameras) == ["front"]
    unknown = Watch.Request(command="list")
    unknown.cameras = ["rear"]
    r = client.call(client.watch_client, unknown)
    assert not r.success and "unknown camera" in r.error
    r = client.call(client.watch_client, Watch.Request(command="list"))
    assert list(zip(r.condition_cameras, r.names, strict=True)) == [("front", "door")]


def test_save_and_restore_per_camera(fed, client, node, memory_dir, tiny_model, tmp_path_factory):
    r = client.call(client.save_client, Trigger.Request())
    assert r.success, r.message
    assert (memory_dir / "front").is_dir() and (memory_dir / "wrist").is_dir()
    assert node["proc"].stop(60) == 0
    node["proc"] = start_node(tmp_path_factory.mktemp("logs") / "node2.log", tiny_model, memory_dir)
    for camera, n in SENT.items():
        assert wait_until(lambda c=camera, n=n: client.ask([c]).frames_seen == n, LONG), node["proc"].text()
        r = client.ask([camera])
        assert seconds(r.last_frame_stamp) == pytest.approx(stamps(camera, n)[-1])
    r = client.call(client.watch_client, Watch.Request(command="list"))
    assert list(zip(r.condition_cameras, r.names, strict=True)) == [
        ("front", "door")
    ]  # restored with front's memory
