"""Issue 24 item 8a: the node's bridge from the engine's Python logging to its ROS logger raised
"Logger severity cannot be changed between calls" on the first error after a warning (rclpy keys a
logger's state by the calling line, and one line logged both severities), inside the engine's
worker thread, which died. A real rclpy node's logger; its output is read from the process's
stderr (rcutils writes there)."""

from __future__ import annotations

import logging

import pytest
import rclpy

from fvs_ros.ros.node import _RosLogHandler


@pytest.fixture
def ros_logger():
    rclpy.init()
    node = rclpy.create_node("fvs_log_bridge_test")
    yield node.get_logger()
    node.destroy_node()
    rclpy.shutdown()


def test_engine_warnings_and_errors_reach_the_ros_log_without_raising(ros_logger, capfd):
    logger = logging.getLogger("fvs_ros.log_bridge_test")
    handler = _RosLogHandler(ros_logger)
    failures = []
    handler.handleError = failures.append  # a record the handler could not pass on
    logger.addHandler(handler)
    try:
        logger.warning("frame stamps jumped back")
        logger.error("watch.json: Read-only file system")  # the old handler raised ValueError here
        logger.warning("frame stamps jumped back again")
        logger.error("watch.json: Read-only file system, again")
    finally:
        logger.removeHandler(handler)
    assert failures == []
    err = capfd.readouterr().err
    for text in ("jumped back", "Read-only file system", "again"):
        assert text in err
