"""Engine behaviour on streams a real camera or a careless user produces (issue 15): frames of any
size, a size change mid-stream, stamps out of order or jumping back, huge timeouts. CPU, tiny
random checkpoint."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import test_engine

from fvs_ros.engine import EngineConfig, FrameError

ckpts, lm, make_engine = test_engine.ckpts, test_engine.lm, test_engine.make_engine  # shared fixtures
Q = test_engine.Q
ONE = EngineConfig(sample_fps=0, frames_per_slot=1)  # one frame per slot: counts are frames


class Recorder(test_engine.Proxy):
    """Records the size of every batch the ViT gets."""

    def __init__(self, lm):
        super().__init__(lm)
        self.batch_shapes = []

    def encode_frames(self, batch, frames_per_slot=1):
        self.batch_shapes.append(batch.shape[1:3])
        return super().encode_frames(batch, frames_per_slot)


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("first", [(1, 1), (6000, 8000)])
def test_the_first_frame_sets_the_model_size_not_its_own(lm, make_engine, first, caplog):
    """Issue 15 case 8: after a 1x1 first frame 640x480 frames went through 1x1; after an 8000x6000
    one, every later frame was enlarged to it. Now every frame goes straight to the model's size
    for the stream (its size rule on the first frame), whatever its own size."""
    rec = Recorder(lm)
    eng = make_engine(rec, ONE)
    eng.add_frame(noise(*first), 0.0)
    with caplog.at_level(logging.WARNING, logger="fvs_ros.engine.stream_engine"):
        for i in range(3):
            eng.add_frame(noise(480, 640, i), 0.1 * (i + 1))
    eng.flush()
    s = eng.stats()
    size = lm.frame_size(*first)
    assert s.frame_size == size and size != first
    assert set(rec.batch_shapes) == {size}  # the ViT never sees another size
    assert (s.frames_into_memory, s.errors, s.frame_size_changes) == (4, 0, 1)
    assert f"frame size changed from {first[1]}x{first[0]} to 640x480" in caplog.text
    assert eng.ask(Q, max_new_tokens=2).frames_seen == 4


def test_stamps_out_of_order_are_rejected_and_a_jump_back_continues_the_stream(lm, make_engine, caplog):
    """Issue 15 case 9: one frame stamped years ahead made every later frame 'older' for good."""
    eng = make_engine(lm, EngineConfig(sample_fps=1.0, frames_per_slot=1))
    f = noise(112, 224)
    assert eng.add_frame(f, 100.0)
    with pytest.raises(FrameError, match="out of order"):
        eng.add_frame(f, 99.5)  # within max_stamp_backstep_s: a late frame, dropped
    assert eng.add_frame(f, 2.1e9)  # a frame stamped in 2036
    with caplog.at_level(logging.WARNING, logger="fvs_ros.engine.stream_engine"):
        kept = [eng.add_frame(f, 101.0 + i / 10) for i in range(30)]  # the live stream goes on
    assert "frame stamps jumped back" in caplog.text
    assert sum(kept) == 2  # sampled at 1 fps of their own spacing: 1 s and 2 s after the jump
    eng.flush()
    s = eng.stats()
    assert (s.stamp_jumps, s.frames_rejected, s.frames_into_memory) == (1, 1, 4)
    snap = eng.snapshot()
    assert snap.last_stamp == pytest.approx(2.1e9 + 2.0)  # the stream clock carried on from the jump


def test_offer_decides_before_decoding_and_counts_skipped_frames(lm, make_engine):
    eng = make_engine(lm, EngineConfig(sample_fps=2.0, frames_per_slot=1))
    f = noise(112, 224)
    taken = 0
    for i in range(30):  # 30 fps for 1 s: the sampler wants 2
        t = 5.0 + i / 30
        if eng.offer(t):
            assert eng.add_frame(f, t)
            taken += 1
    with pytest.raises(FrameError, match="finite"):
        eng.offer(float("inf"))
    eng.flush()
    s = eng.stats()
    assert taken == 2 and (s.frames_in, s.frames_skipped, s.frames_into_memory, s.frames_rejected) == (
        30,
        28,
        2,
        1,
    )


def test_stamp_offset_survives_save_and_load(lm, make_engine, tmp_path):
    eng = make_engine(lm, EngineConfig(sample_fps=0, frames_per_slot=1))
    f = noise(112, 224)
    eng.add_frame(f, 1000.0)
    eng.add_frame(f, 10.0)  # jump back: continues at 1000
    eng.flush()
    eng.save(tmp_path / "s")
    other = make_engine(lm, EngineConfig(sample_fps=0, frames_per_slot=1))
    other.load(tmp_path / "s")
    other.add_frame(f, 11.0)  # one second after the frame stamped 10: stream time 1001
    other.flush()
    assert other.snapshot().last_stamp == pytest.approx(1001.0) and other.stats().stamp_jumps == 1


def test_a_huge_timeout_is_a_long_wait_not_an_overflow(lm, make_engine):
    """Issue 15: timeout_s 3.4e38 raised OverflowError inside the engine."""
    eng = make_engine(lm, ONE)
    assert eng.ask(Q, max_new_tokens=2, timeout=3.4e38).frames_seen == 0
