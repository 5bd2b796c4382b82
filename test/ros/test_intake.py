"""ImageIntake (fvs_ros/ros/intake.py) with a real engine (tiny random model) and a real rclpy logger,
no DDS: what a stream of hostile frames costs the node (issue 24 item 14b)."""

import time
import tracemalloc

import pytest
from rclpy.logging import get_logger
from sensor_msgs.msg import Image

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint
from fvs_ros.ros.intake import MAX_REPORTED_ENCODINGS, ImageIntake


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    lm = load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream"))
    with StreamEngine(lm, config=EngineConfig(sample_fps=0, frames_per_slot=1)) as eng:
        yield eng


def image(encoding: str, stamp: float) -> Image:
    msg = Image(encoding=encoding, height=2, width=2, step=6)
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp), int(stamp % 1 * 1e9)
    msg.data = bytes(12)
    return msg


def test_unique_huge_unsupported_encodings_are_neither_logged_in_full_nor_remembered(engine, capfd):
    """300 frames, each with its own 50,000-character encoding: logged in full at ERROR and each
    remembered forever (~15 MB of log, +19 MiB). Now each line is short, the first 16 encodings
    are logged once and later ones at most every 5 s, and nothing accumulates."""
    intake = ImageIntake(engine, False, time.time, get_logger("intake_test"), 10.0, 2**26)
    capfd.readouterr()
    tracemalloc.start()
    try:
        started = time.monotonic()
        for i in range(300):
            msg = image(f"{i:04d}" + "x" * 50000, 1000.0 + i)
            intake.on_message(msg)
            del msg
        elapsed = time.monotonic() - started
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    log = capfd.readouterr().err
    lines = [line for line in log.splitlines() if "is not supported" in line]
    assert intake.counters.unsupported == 300 and intake.counters.received == 300
    assert MAX_REPORTED_ENCODINGS <= len(lines) <= MAX_REPORTED_ENCODINGS + 1 + elapsed / 5.0, len(lines)
    assert max(len(line) for line in lines) < 1000 and len(log) < 50_000, len(log)
    assert kept < 1_000_000, kept  # 300 encodings of 50 kB each would be 15 MB
    assert "(50004 characters)" in intake.problem and len(intake.problem) < 600
