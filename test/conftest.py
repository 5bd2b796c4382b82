"""Fixtures shared by test modules: engines shut down after a test, the tiny random model of the
node tests and their client of the node; the `cuda` marker's rules (pytest.ini)."""

import subprocess
import sys
from pathlib import Path

import pytest


def _selects_cuda_only(config) -> bool:
    return config.getoption("markexpr", "").strip() == "cuda"


def pytest_ignore_collect(collection_path: Path, config):
    """With `-m cuda` only modules that hold cuda tests are imported: the GPU machine has torch and
    transformers but no ROS, and the other modules may import rclpy at the top."""
    if _selects_cuda_only(config) and collection_path.is_file() and collection_path.suffix == ".py":
        if collection_path.name.startswith("test_"):
            return "pytest.mark.cuda" not in collection_path.read_text()
    return None


def pytest_collection_modifyitems(config, items):
    """cuda tests skip, saying why, where torch sees no CUDA device (CI: 2 cores, no GPU)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)


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
    from support.dds import rclpy_session
    from support.fvs_client import Client

    yield from rclpy_session(Client)
