"""Engine behaviour on streams a real camera or a careless user produces (issues 15 and 24): frames
of any size, a size change mid-stream, stamps out of order, jumping back or from two clocks, huge
timeouts. CPU, tiny random checkpoint."""

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


@pytest.mark.parametrize("tiny", [(1, 1), (1, 199), (199, 1)])
def test_a_frame_too_small_for_a_picture_is_rejected_and_fixes_no_size(lm, make_engine, tiny):
    """Issue 24 item 12: after one 1x1 (or 199x1) frame every 640x480 frame was resized to the
    model's size for the tiny one (168x168, 2240x56) until reset. A side below one merged ViT patch
    holds no picture: the frame is rejected (FrameError) and fixes nothing."""
    rec = Recorder(lm)
    eng = make_engine(rec, ONE)
    with pytest.raises(FrameError, match="min_frame_side"):
        eng.add_frame(noise(*tiny), 0.0)
    for i in range(3):
        eng.add_frame(noise(480, 640, i), 0.1 * (i + 1))
    eng.flush()
    s, size = eng.stats(), lm.frame_size(480, 640)
    assert s.frame_size == size and set(rec.batch_shapes) == {size}
    assert (s.frames_rejected, s.frames_into_memory, s.frame_size_mismatches, s.errors) == (1, 3, 0, 0)


def test_the_stream_size_follows_the_frames_until_memory_holds_them(lm, make_engine, caplog):
    """Issue 15 case 8 / issue 24 item 12: the first frame no longer fixes the stream's input size.
    While memory is empty the size follows the frames (a frame waiting for its slot's second one is
    resized along); once memory holds frames it keeps their size until reset, and a frame whose own
    model size differs is resized to it, counted and described for /diagnostics."""
    rec = Recorder(lm)
    eng = make_engine(rec, EngineConfig(sample_fps=0))  # two-frame slots: the first frame waits
    eng.add_frame(noise(500, 2000), 0.0)
    with caplog.at_level(logging.WARNING, logger="fvs_ros.engine.stream_engine"):
        for i in range(3):
            eng.add_frame(noise(480, 640, i), 0.1 * (i + 1))
    eng.flush()
    size = lm.frame_size(480, 640)
    assert size != lm.frame_size(500, 2000)
    s = eng.stats()
    assert (s.frame_size, s.frames_into_memory, s.frame_size_mismatches) == (size, 4, 0)
    assert "frame size changed from 2000x500 to 640x480" in caplog.text
    for i in range(2):  # memory holds 640x480 frames now
        eng.add_frame(noise(500, 2000, i), 1.0 + i / 10)
    eng.flush()
    s = eng.stats()
    assert (s.frame_size, s.frames_into_memory, s.frame_size_mismatches, s.errors) == (size, 6, 2, 0)
    assert "frames of 2000x500 are resized to the memory's input" in s.frame_size_note
    assert set(rec.batch_shapes) == {size}  # the ViT never sees another size
    assert eng.ask(Q, max_new_tokens=2).frames_seen == 6
    eng.reset()
    assert eng.stats().frame_size_note is None


WALL = 1_765_000_000.0  # wall-clock stamps (2025)


class Arrivals:
    """The engine's arrival clock for a stamp test: a camera at `fps`, advanced per frame."""

    def __init__(self, fps=30.0):
        self.t, self.step = 50.0, 1.0 / fps

    def __call__(self):
        return self.t


def feed_live(eng, stamps, arrivals, f):
    """Each stamp as one frame arriving one camera period after the previous."""
    for stamp in stamps:
        eng.add_frame(f, stamp)
        arrivals.t += arrivals.step


def live_engine(make_engine, lm, config, fps=30.0):
    eng = make_engine(lm, config)
    arrivals = Arrivals(fps)
    eng._clock.now = arrivals  # the stream clock's arrival times: a camera at `fps`, not this machine
    return eng, arrivals


@pytest.mark.parametrize(
    "odd",
    [lambda last: 5.0, lambda last: last - 5.0],
    ids=["a frame stamped 5 s (camera clock glitch)", "a frame delivered 5 s late"],
)
def test_answers_report_the_frames_own_stamps_after_an_odd_stamp(lm, make_engine, odd):
    """Issue 24 item 13: one frame stamped 5.0 s among wall-clock frames, or one 5 s late, shifted
    every later answer's last_frame_stamp and evidence stamps (to negative, int32-wrapped values
    over the node). The stream clock (clock.py) places the odd frame and the frames after it
    continue their own clock: every reported stamp is a frame's own."""
    eng, arrivals = live_engine(make_engine, lm, ONE)
    f = noise(112, 224)
    stamps = [WALL + i / 30 for i in range(6)]
    stamps += [odd(stamps[-1])] + [WALL + (7 + i) / 30 for i in range(6)]
    feed_live(eng, stamps, arrivals, f)
    eng.flush()
    a = eng.ask(Q, max_new_tokens=2)
    assert a.last_stamp == stamps[-1] and a.first_stamp == stamps[0]
    assert a.evidence and all(min(abs(e.stamp - s) for s in stamps) < 1e-6 for e in a.evidence)
    s = eng.stats()
    assert (s.stamp_jumps, s.frames_rejected, s.frames_into_memory) == (1, 0, 13)
    assert "does not continue its clock" in s.stamp_note


def test_stamps_running_back_1_ms_per_frame_still_fill_memory_at_its_rate(lm, make_engine):
    """Issue 24 item 13: 143 of 144 such frames were rejected as out of order, and the answer said
    "No video frames have been received yet". Stream time follows the camera's pace instead."""
    eng, arrivals = live_engine(make_engine, lm, EngineConfig(sample_fps=1.0))
    stamps = [WALL - i * 0.001 for i in range(144)]  # 4.8 s of a 30 fps camera
    feed_live(eng, stamps, arrivals, noise(112, 224))
    eng.flush()
    s = eng.stats()
    assert (s.frames_in, s.frames_rejected, s.frames_into_memory) == (144, 0, 4)  # sampled at 0..4 s
    a = eng.ask(Q, max_new_tokens=2)
    assert a.text != eng.config.no_video_answer and a.frames_seen == 4
    assert a.last_stamp in stamps


def test_two_publishers_with_different_clocks_keep_memory_fps(lm, make_engine):
    """Issue 24 item 13: two cameras on one topic, one on the wall clock and one whose clock
    started at 1000 s, put ~100 frames into memory in 10 s at memory_fps 1 instead of ~10."""
    eng, arrivals = live_engine(make_engine, lm, EngineConfig(sample_fps=1.0, frames_per_slot=1), fps=60)
    stamps = []
    for i in range(300):  # 10 s, each camera at 30 fps
        stamps += [WALL + i / 30, 1000.0 + i / 30 + 0.004]
    feed_live(eng, stamps, arrivals, noise(112, 224))
    eng.flush()
    s = eng.stats()
    assert 10 <= s.frames_into_memory <= 11 and s.frames_rejected == 0
    a = eng.ask(Q, max_new_tokens=2)
    assert a.last_stamp in stamps and all(min(abs(e.stamp - t) for t in stamps) < 1e-6 for e in a.evidence)


def test_a_stamp_a_ros_time_cannot_hold_is_rejected(lm, make_engine):
    eng = make_engine(lm, ONE)
    for bad in (1e300, 2.0**31, -(2.0**31)):
        with pytest.raises(FrameError, match="outside"):
            eng.add_frame(noise(112, 224), bad)
    assert eng.stats().frames_rejected == 3


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


def test_the_stream_clock_survives_save_and_load(lm, make_engine, tmp_path):
    """After a camera clock restart, a restored engine reports the saved frames' own stamps and
    the camera's next frames continue its new clock."""
    eng = make_engine(lm, ONE)
    f = noise(112, 224)
    eng.add_frame(f, 1000.0)
    eng.add_frame(f, 10.0)  # the camera clock restarted
    eng.flush()
    eng.save(tmp_path / "s")
    other = make_engine(lm, ONE)
    other.load(tmp_path / "s")
    assert other.ask(Q, max_new_tokens=2).last_stamp == 10.0
    other.add_frame(f, 11.0)
    other.flush()
    a = other.ask(Q, max_new_tokens=2)
    assert (a.first_stamp, a.last_stamp) == (1000.0, 11.0) and other.stats().stamp_jumps == 1
    assert other.snapshot().last_stamp == pytest.approx(1001.0)  # stream time: 1 s after the restart


def test_a_huge_timeout_is_a_long_wait_not_an_overflow(lm, make_engine):
    """Issue 15: timeout_s 3.4e38 raised OverflowError inside the engine."""
    eng = make_engine(lm, ONE)
    assert eng.ask(Q, max_new_tokens=2, timeout=3.4e38).frames_seen == 0
