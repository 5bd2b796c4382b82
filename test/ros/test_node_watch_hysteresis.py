"""The node honours watch_hysteresis (docs/node.md): a risen condition falls only once P(yes) drops
below its threshold minus the margin. The scene and the reference probabilities are those of
test_node_watch.py (support/watch_scene.py); support/watch_scene.hysteresis_case picks a
condition, a threshold and a margin for which the documented rule gives other events than it
would without the margin, and a node started with that watch_hysteresis must publish exactly the
events with it.
"""

import numpy as np
import pytest
import test_node_watch as scenario
from support import watch_scene as scene
from support.dds import rclpy_session

from fvs_ros.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def client():
    yield from rclpy_session(scenario.Client)


def held_back_fall(by_condition):
    """(condition, threshold as Watch.srv's float32 carries it, hysteresis) of the first candidate
    whose probabilities give a case."""
    for condition, probabilities in by_condition.items():
        try:
            threshold, hysteresis = scene.hysteresis_case(probabilities)
        except AssertionError:
            continue
        return condition, float(np.float32(threshold)), hysteresis
    raise AssertionError(f"no candidate where the hysteresis changes the events: {by_condition}")


def test_events_follow_the_node_hysteresis(client, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", "flash_vstream")
    by_condition = scenario.reference_by_condition(checkpoint)
    condition, threshold, hysteresis = held_back_fall(by_condition)
    reference = by_condition[condition]
    expected = scene.expected_events(reference, threshold, hysteresis)
    assert expected != scene.expected_events(reference, threshold, 0.0)
    node = scenario.start_node(checkpoint, tmp_path / "memory", tmp_path / "node.log", client, hysteresis)
    try:
        added = client.watch(command="add", condition=condition, threshold=threshold, name="held")
        assert added.success, added.error
        scenario.stream_and_check_events(node, client, "held", threshold, expected, reference)
    finally:
        assert node.stop() == 0
