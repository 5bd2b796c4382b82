"""How old an answer's memory is (Answer.memory_lag_s), and the prefix cache keeping it fresh."""

from __future__ import annotations

import numpy as np
import pytest

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint

Q = "What is on the table?"
LONG = 30.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream")


@pytest.fixture(scope="module")
def lm(ckpt):
    return load_model(ckpt)


@pytest.fixture
def engines():
    made = []
    yield made
    for eng in made:
        eng.shutdown()


def start(lm, engines, **config) -> StreamEngine:
    eng = StreamEngine(lm, config=EngineConfig(**config)).start()
    engines.append(eng)
    return eng


def feed(eng, stamps, seed=0):
    rng = np.random.default_rng(seed)
    for t in stamps:
        eng.add_frame(rng.integers(0, 256, (112, 224, 3), dtype=np.uint8), t)


def test_memory_lag_is_newest_received_stamp_minus_the_memory_newest(lm, engines):
    eng = start(lm, engines, sample_fps=1.0)
    assert eng.ask(Q, max_new_tokens=2, timeout=LONG).memory_lag_s is None  # no video yet
    feed(eng, [10.0, 10.5, 11.0, 11.5, 11.75])  # 10.0 and 11.0 enter memory
    assert eng.flush(LONG)
    a = eng.ask(Q, max_new_tokens=2, timeout=LONG)
    assert (a.frames_seen, a.last_stamp) == (2, 11.0)
    assert a.memory_lag_s == pytest.approx(0.75)
    summary = eng.summarize(max_new_tokens=2, timeout=LONG)
    assert summary.memory_lag_s == pytest.approx(0.75)


def test_an_answer_on_a_lagging_prefix_reports_the_prefix_memory(lm, engines):
    """With max_prefix_lag_s > 0 an answer may rest on an older prefix: its lag counts from there."""
    eng = start(lm, engines, sample_fps=0, max_prefix_lag_s=100.0, prefix_refresh_s=3600.0)
    feed(eng, [0.0, 0.1])
    assert eng.flush(LONG)
    first = eng.ask(Q, max_new_tokens=2, timeout=LONG)  # builds the first prefix and waits for it
    feed(eng, [1.0, 2.0, 3.0], seed=1)
    assert eng.flush(LONG)
    a = eng.ask(Q, max_new_tokens=2, timeout=LONG)  # within the 100 s bound: the old prefix serves
    assert a.from_cache and a.last_stamp == first.last_stamp
    assert a.memory_lag_s == pytest.approx(3.0 - a.last_stamp)
