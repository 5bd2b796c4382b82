"""Fixtures shared by the engine-level test modules."""

import pytest


@pytest.fixture
def engines():
    """A list a test appends its StreamEngines to; every one is shut down after the test."""
    made = []
    yield made
    for eng in made:
        eng.shutdown()
