"""StreamEngine helpers of the engine race and freshness tests (tiny random model, CPU)."""

import time

import numpy as np

from fvs_ros.engine import EngineConfig, StreamEngine

LONG = 30.0  # bound on waits that end at once when the code is right


def start(lm, engines, **config) -> StreamEngine:
    """A started engine on `lm` (every frame sampled unless `config` says sample_fps), added to the
    `engines` fixture's list so it is shut down after the test."""
    eng = StreamEngine(lm, config=EngineConfig(**{"sample_fps": 0, **config})).start()
    engines.append(eng)
    return eng


def feed(eng, stamps, seed=0):
    """One random 112x224 frame per stamp (seeded)."""
    rng = np.random.default_rng(seed)
    for t in stamps:
        eng.add_frame(rng.integers(0, 256, (112, 224, 3), dtype=np.uint8), t)


def wait_for(cond, timeout=LONG):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)
