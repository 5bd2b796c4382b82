"""Issue 24 over DDS: a restored engine.json with an absurd stamp (item 8b), hostile stamps from the
camera (item 13), and a checkpoint whose chat template never ends (item 11). A real node process
(tiny random model) and this test's rclpy node; images go RELIABLE and the tests wait for the
node's counters. The tests run in order and share the node."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import numpy as np
import pytest
from support.dds import image_msg, seconds, wait_until
from support.fvs_client import frame, latest_diagnostics
from support.node_process import NodeProcess

from fvs_ros.engine import EngineConfig, open_engine

pytestmark = pytest.mark.random_order(disabled=True)
WARN = bytes([1])


@pytest.fixture(scope="module")
def memory_dir(tiny_model, tmp_path_factory):
    """A real save whose engine.json (the layout before the stream clock) says last_stamp 1e300:
    finite, so the old field check restored it, and the next answer could not be serialized."""
    path = tmp_path_factory.mktemp("stamps") / "memory"
    engine = open_engine(tiny_model, config=EngineConfig(sample_fps=0, frames_per_slot=1), device="cpu")
    try:
        for i in range(2):
            engine.add_frame(
                np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8), 10.0 + i
            )
        engine.flush()
        engine.save(path)
    finally:
        engine.shutdown()
    index = json.loads((path / "engine.json").read_text())
    index.pop("clock", None)  # (a save of the code before the stream clock has none)
    index.update(last_stamp=1e300, stamp_offset=0.0)
    (path / "engine.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def node(tiny_model, memory_dir, tmp_path_factory, client):
    proc = NodeProcess(
        tmp_path_factory.mktemp("logs") / "stamps.log",
        model=tiny_model,
        memory_file=memory_dir,
        memory_fps=0.0,  # every frame enters memory
        frames_per_slot=1,
        reliability="reliable",
        qos_depth=10,
        summary_period_s=0.0,
        diagnostics_period_s=0.2,
        max_new_tokens=8,
        max_prefix_lag_s=0.0,
        save_period_s=0.0,
        evidence_frames=3,
    )
    assert client.wait_ready(), proc.text()
    yield proc
    proc.stop()


def diag(client):
    return latest_diagnostics(client)


def test_a_saved_stamp_of_1e300_is_refused_and_questions_are_answered(node, client):
    d = diag(client)
    assert "last_stamp 1e+300 s is outside" in d["memory_file_problem"], d
    assert d["level"] == WARN
    received = int(d["frames_received"])
    for _ in range(3):
        client.image(frame(), "rgb8")
    assert wait_until(lambda: int(diag(client)["frames_into_memory"]) >= 3, 60), node.text()
    assert int(diag(client)["frames_received"]) == received + 3
    response = client.ask()  # on the old code: no reply at all (OverflowError in the executor)
    assert response.success, response.error
    assert response.frames_seen == 3 and seconds(response.last_frame_stamp) == pytest.approx(client.stamp)
    assert node.proc.poll() is None


def test_answers_report_the_cameras_own_stamps_through_odd_stamps(node, client):
    """One frame stamped 5.0 s among the camera's frames and one whose nanosec is 3e9 (read as
    the 3 s later it says) used to shift every later last_frame_stamp and evidence stamp, to
    negative (int32-wrapped) values. Now they are the frames' own, and /diagnostics says what
    happened."""
    d = diag(client)
    before, received = int(d["frames_into_memory"]), int(d["frames_received"])
    sent = []
    for _ in range(4):
        client.image(frame(), "rgb8")
        sent.append(client.stamp)
    client.raw.publish(image_msg(frame(), "rgb8", (5, 0)))
    sent.append(5.0)
    client.raw.publish(image_msg(frame(), "rgb8", (int(client.stamp) + 1, 3_000_000_000)))
    assert wait_until(lambda: int(diag(client)["frames_received"]) >= received + 6, 60), node.text()
    for _ in range(4):
        client.image(frame(), "rgb8")
        sent.append(client.stamp)
    assert wait_until(lambda: int(diag(client)["frames_into_memory"]) >= before + 10, 60), node.text()
    d = diag(client)
    assert int(d["stamp_jumps"]) >= 2 and int(d["frames_rejected"]) == 0, d  # the 5 s one; after the +3 s one
    assert d["level"] == WARN and "does not continue its clock" in d["message"], d
    response = client.ask()
    assert response.success, response.error
    assert seconds(response.last_frame_stamp) == pytest.approx(client.stamp, abs=1e-6)
    for e in response.evidence:  # a frame's own stamp: the client's 0.2 s grid from 1000 s (the
        t = seconds(e.stamp)  # +3 s frame's whole seconds included) or the odd 5.0 s
        on_grid = t >= 1000.0 and abs((t - 1000.0) / 0.2 - round((t - 1000.0) / 0.2)) < 1e-4
        assert on_grid or t == 5.0, (t, sent)
    assert 0 < response.last_frame_stamp.sec < 2**31 - 1


def test_use_sim_time_without_clock_keeps_diagnostics_and_says_why(node, client):
    """Issue 24 item 13: use_sim_time set while active with no /clock stopped /diagnostics and the
    periodic save silently (their timers ran on the node clock, which then stands at 0)."""
    assert client.set_parameter("use_sim_time", True).successful
    try:
        count = len(client.diagnostics)
        assert wait_until(lambda: len(client.diagnostics) >= count + 5, 60), node.text()  # every 0.2 s
        assert wait_until(lambda: "clock reads 0" in client.diagnostics[-1]["message"], 60), (
            client.diagnostics[-1]
        )
        assert client.diagnostics[-1]["level"] == WARN
    finally:
        assert client.set_parameter("use_sim_time", False).successful


def test_a_chat_template_that_never_ends_fails_configure_and_sigint_ends_the_node(tiny_model, tmp_path):
    """Issue 24 item 11: configure hung for good on such a template, and the process ignored SIGINT."""
    looping = tmp_path / "looping_ckpt"
    shutil.copytree(tiny_model, looping)
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    saved = json.loads((looping / "chat_template.json").read_text())  # the tiny checkpoint's
    (looping / "chat_template.json").write_text(
        json.dumps({"chat_template": template + saved["chat_template"]})
    )
    proc = NodeProcess(tmp_path / "looping.log", name="fvs_looping", model=looping)
    try:
        assert wait_until(lambda: "unusable chat template" in proc.text(), 120), proc.text()
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(120) == 0, proc.text()
    except subprocess.TimeoutExpired:
        raise AssertionError(proc.text()) from None
    finally:
        proc.stop()
