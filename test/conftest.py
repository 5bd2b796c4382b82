"""Fixtures shared by test modules: engines shut down after a test, the tiny random model of the
node tests and their client of the node."""

import subprocess
import sys

import pytest
from support.dds import rclpy_session
from support.fvs_client import Client


@pytest.fixture
def engines():
    """A list a test appends its StreamEngines to; every one is shut down after the test."""
    made = []
    yield made
    for eng in made:
        eng.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random flash_vstream checkpoint, written by `python -m fvs_ros.model.tiny`."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "fvs_ros.model.tiny", str(out), "--format", "flash_vstream"],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def client():
    """The module's Client of the node /fvs (support/fvs_client.py); a module with a client of
    its own (test_node_watch, test_node_evidence, test_node_freshness) defines this fixture."""
    yield from rclpy_session(Client)
