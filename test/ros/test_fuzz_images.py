"""Fuzz the node over DDS (issue 15): a few hundred random Image and CompressedImage messages
(encodings, sizes, steps, data lengths, endianness, stamps; JPEG/PNG with corrupted headers), then
the node still answers, with every message counted and no callback failing.

Seeded (FUZZ_SEED, default 15) and bounded: messages go out RELIABLE in batches of the
subscription's depth, each batch after the node counted the previous one.
"""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from lifecycle_msgs.msg import Transition
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from support.dds import wait_until
from support.fvs_client import frames_unaccounted, latest_diagnostics
from support.node_process import NodeProcess

from fvs_ros.ros.image import SUPPORTED_ENCODINGS

SEED = int(os.environ.get("FUZZ_SEED", "15"))
BATCH = 10  # = qos_depth: a RELIABLE keep-last subscription never drops a batch this size
RAW_MESSAGES, COMPRESSED_MESSAGES = 300, 200


@pytest.fixture(scope="module")
def node(tiny_model, tmp_path_factory, client):
    proc = NodeProcess(
        tmp_path_factory.mktemp("fuzz") / "fuzz.log",
        model=tiny_model,
        reliability="reliable",
        qos_depth=BATCH,
        memory_fps=5.0,
        summary_period_s=0.0,
        diagnostics_period_s=0.2,
        max_new_tokens=4,
        csm_slots=8,
        dam_frames=4,
        max_image_pixels=1_000_000,
    )
    assert client.wait_ready(), proc.text()
    yield proc
    assert proc.stop() == 0, proc.text()


def random_stamp(rng, state):
    """Mostly a stream 0.2 s apart; sometimes zero, negative, far ahead, or jumping back."""
    kind = rng.choice(["normal"] * 6 + ["zero", "negative", "future", "back"])
    if kind == "normal":
        state["t"] += 0.2
        t = state["t"]
    else:
        t = {
            "zero": 0.0,
            "negative": -rng.uniform(0, 1e6),
            "future": 4e9,
            "back": state["t"] - rng.uniform(0, 50),
        }[kind]
    sec = int(np.floor(t))
    return max(min(sec, 2**31 - 1), -(2**31)), int(rng.integers(0, 1_000_000_000))


def random_image(rng, state) -> Image:
    encodings = list(SUPPORTED_ENCODINGS) + ["32FC1", "rgb16", "", "bayer_xyz8", "\u00e9\u00e9", "rgb8" * 20]
    encoding = str(rng.choice(encodings))
    huge = rng.random() < 0.05
    h = int(rng.integers(0, 2**31 if huge else 40))
    w = int(rng.integers(0, 2**31 if huge else 40))
    bpp = int(rng.choice([1, 2, 3, 4]))
    step = int(rng.choice([w * bpp, w * bpp + int(rng.integers(1, 9)), int(rng.integers(0, 200)), 0]))
    step = min(step, 2**32 - 1)
    size = min(step * h, 200_000)
    size = int(
        rng.choice([size, max(size - int(rng.integers(1, 50)), 0), size + int(rng.integers(1, 50)), 0])
    )
    msg = Image(encoding=encoding, height=h, width=w, step=step, is_bigendian=int(rng.integers(0, 256)))
    msg.header.stamp.sec, msg.header.stamp.nanosec = random_stamp(rng, state)
    msg.header.frame_id = "fuzz"
    msg.data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return msg


def png_declaring(width, height) -> bytes:
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def random_compressed(rng, state) -> CompressedImage:
    pixels = rng.integers(0, 256, (int(rng.integers(1, 48)), int(rng.integers(1, 48)), 3), dtype=np.uint8)
    ext = str(rng.choice([".jpg", ".png"]))
    data = bytearray(cv2.imencode(ext, pixels)[1].tobytes())
    kind = rng.choice(["valid", "flip_header", "truncate", "huge_png", "random", "empty", "flip_any"])
    if kind == "flip_header":
        for i in rng.integers(0, min(len(data), 40), int(rng.integers(1, 6))):
            data[i] = int(rng.integers(0, 256))
    elif kind == "flip_any":
        for i in rng.integers(0, len(data), int(rng.integers(1, 20))):
            data[i] = int(rng.integers(0, 256))
    elif kind == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    elif kind == "huge_png":
        data = bytearray(png_declaring(int(rng.integers(1, 2**31)), int(rng.integers(1, 2**31))) + bytes(40))
    elif kind == "random":
        data = bytearray(rng.integers(0, 256, int(rng.integers(1, 500)), dtype=np.uint8).tobytes())
    elif kind == "empty":
        data = bytearray()
    msg = CompressedImage(format=str(rng.choice(["jpeg", "png", "", "rgb8; jpeg compressed bgr8", "h264"])))
    msg.header.stamp.sec, msg.header.stamp.nanosec = random_stamp(rng, state)
    msg.data = bytes(data)
    return msg


def counter(client, key):
    return int(latest_diagnostics(client)[key])


def send_all(client, publisher, messages):
    """Publish in batches, once the node's subscription matched this publisher (a message published
    before is lost even over RELIABLE); each batch once the node counted every earlier message.
    Then the node's counters add up: each message received once, with exactly one outcome."""
    assert wait_until(lambda: publisher.get_subscription_count() >= 1, 30), "the node did not subscribe"
    before = latest_diagnostics(client)
    received = int(before["frames_received"])
    for start in range(0, len(messages), BATCH):
        for msg in messages[start : start + BATCH]:
            publisher.publish(msg)
        target = received + min(start + BATCH, len(messages))
        assert wait_until(
            lambda target=target: counter(client, "frames_received") >= target, 30, period=0.05
        ), f"node counted {counter(client, 'frames_received')} of {target} messages"
    # every message counted once, and each one's outcome counted once (queue empty: all decided)
    assert wait_until(lambda: latest_diagnostics(client)["queue_depth"] == "0", 60)
    after = latest_diagnostics(client)
    assert int(after["frames_received"]) - received == len(messages), (before, after)
    assert frames_unaccounted(before, after) in (0, 1), (before, after)


def check_still_serving(node, client):
    d = latest_diagnostics(client)
    assert (d["frames_failed"], d["callback_errors"], d["errors"]) == ("0", "0", "0"), d
    response = client.ask()
    assert response.success, (response.error, node.text())
    assert node.proc.poll() is None and "Traceback" not in node.text()
    return d


def test_random_raw_images_then_the_node_still_answers(node, client):
    rng, state = np.random.default_rng(SEED), {"t": 1000.0}
    publisher = client.node.create_publisher(
        Image, "/image_raw", QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    )
    send_all(client, publisher, [random_image(rng, state) for _ in range(RAW_MESSAGES)])
    d = check_still_serving(node, client)
    print(
        f"raw fuzz (seed {SEED}): {d['frames_received']} received, {d['frames_malformed']} malformed, "
        f"{d['frames_unsupported']} unsupported, {d['frames_restamped']} restamped, "
        f"{d['frames_rejected']} rejected, {d['frames_into_memory']} into memory"
    )
    assert int(d["frames_malformed"]) > 0 and int(d["frames_unsupported"]) > 0


def use_transport(client, transport):
    assert client.change_state(Transition.TRANSITION_DEACTIVATE)
    assert client.set_parameter("image_transport", transport).successful
    assert client.change_state(Transition.TRANSITION_ACTIVATE)
    assert client.wait_ready()


def test_random_compressed_images_then_the_node_still_answers(node, client):
    """On the compressed transport; the node goes back to raw afterwards (tests run in any order)."""
    use_transport(client, "compressed")
    try:
        rng, state = np.random.default_rng(SEED + 1), {"t": 5000.0}
        publisher = client.node.create_publisher(
            CompressedImage,
            "/image_raw/compressed",
            QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE),
        )
        malformed = counter(client, "frames_malformed")
        send_all(client, publisher, [random_compressed(rng, state) for _ in range(COMPRESSED_MESSAGES)])
        d = check_still_serving(node, client)
    finally:
        use_transport(client, "raw")
    print(
        f"compressed fuzz (seed {SEED + 1}): {d['frames_received']} received in all, "
        f"{int(d['frames_malformed']) - malformed} malformed, {d['frames_into_memory']} into memory"
    )
    assert int(d["frames_malformed"]) > malformed
    assert node.rss_mib() < 2048  # no huge declared image was decoded
