"""The stream clock's rule (fvs_ros/engine/clock.py) on the stamp sequences of issue 24 item 13,
with an arrival clock the test advances (frames arrive at 30 fps unless a case says otherwise)."""

from __future__ import annotations

import pytest

from fvs_ros.engine.clock import STAMP_LIMIT_S, StreamClock

WALL = 1_765_000_000.0  # a wall-clock stamp (2025)
PERIOD = 1 / 30


class Arrivals:
    """The arrival clock: advanced by the test, one camera period per frame by default."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run(stamps, arrival_step=PERIOD, jumps=None):
    """Place and commit each stamp, recording every frame (as if all entered memory): the clock,
    the stream times and the stamps reported back for them; `jumps` collects the indices of the
    frames that started a new clock because their stamp went back."""
    arrivals = Arrivals()
    clock = StreamClock(1.0, now=arrivals)
    times = []
    for i, stamp in enumerate(stamps):
        p = clock.place(stamp)
        clock.commit(p)
        clock.record(p)
        times.append(p.time)
        if p.jump and jumps is not None:
            jumps.append(i)
        arrivals.t += arrival_step
    return clock, times


def assert_monotone_and_own_stamps(clock, times, stamps):
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert [clock.stamp_of(t) for t in times[-5:]] == pytest.approx(stamps[-5:], abs=1e-6)


def test_one_frame_stamped_5_s_among_wall_clock_frames_moves_nothing():
    """A camera clock glitch: the frames after it continue the wall clock, unshifted."""
    stamps = [WALL + i * PERIOD for i in range(10)] + [5.0] + [WALL + (11 + i) * PERIOD for i in range(10)]
    clock, times = run(stamps)
    assert_monotone_and_own_stamps(clock, times, stamps)
    assert times[-1] == stamps[-1]  # back on the wall clock exactly: offset 0
    assert clock.stamp_of(times[10]) == pytest.approx(5.0)  # the odd frame reports its own stamp


def test_a_frame_delivered_5_s_late_does_not_shift_later_frames():
    stamps = [WALL + i * PERIOD for i in range(10)]
    stamps += [stamps[-1] - 5.0] + [WALL + (10 + i) * PERIOD for i in range(10)]
    clock, times = run(stamps)
    assert_monotone_and_own_stamps(clock, times, stamps)
    assert times[-1] == stamps[-1]


def test_a_camera_clock_restart_continues_the_stream_with_the_new_stamps():
    stamps = [WALL + i * PERIOD for i in range(10)] + [5.0 + i * PERIOD for i in range(20)]
    clock, times = run(stamps)
    assert_monotone_and_own_stamps(clock, times, stamps)
    assert times[10] >= times[9]  # the stream carries on from where it was
    assert times[-1] - times[10] == pytest.approx(19 * PERIOD)  # at the new clock's pace


def test_stamps_running_back_1_ms_per_frame_advance_at_the_arrival_pace():
    """Issue 24: such a camera had 143 of 144 frames rejected as out of order."""
    stamps = [WALL - i * 0.001 for i in range(144)]
    clock, times = run(stamps)
    assert_monotone_and_own_stamps(clock, times, stamps)
    assert times[-1] - times[0] == pytest.approx(143 * PERIOD)


def test_two_publishers_with_different_clocks_each_keep_their_pace():
    """Interleaved frames of a wall-clock camera and one whose clock started at 1000 s: the stream
    moves at the cameras' pace (10 s of frames span about 10 s of stream time), not by the clocks'
    difference at every frame."""
    stamps = []
    for i in range(300):
        stamps += [WALL + i * PERIOD, 1000.0 + i * PERIOD + 0.005]
    clock, times = run(stamps, arrival_step=PERIOD / 2)
    assert_monotone_and_own_stamps(clock, times, stamps)
    assert times[-1] - times[0] == pytest.approx(300 * PERIOD, abs=0.1)


def test_after_one_frame_stamped_far_ahead_the_camera_keeps_its_pace():
    """A frame restamped with the wall clock among a camera's 1000 s clock leaps the stream ahead
    (it continues the current clock); the camera's next frames must not stand still behind it."""
    stamps = [1000.0 + i * PERIOD for i in range(5)] + [WALL] + [1000.0 + (6 + i) * PERIOD for i in range(60)]
    jumps = []
    clock, times = run(stamps, jumps=jumps)
    assert_monotone_and_own_stamps(clock, times, stamps)
    assert times[-1] - times[6] == pytest.approx(59 * PERIOD)  # at the camera's pace after the leap
    assert jumps == [6]  # the camera's first frame after it goes on from where the stream is
    assert clock.state()["source"][1] == stamps[-1]  # the camera's clock is the one saved


def test_a_replay_faster_than_real_time_keeps_its_stamps_and_gaps():
    """Offline (video CLI, bag evaluation): frames arrive in ms, their stamps 2 s apart or after a
    60 s gap; stream time is their stamps."""
    stamps = [float(2 * i) for i in range(10)] + [80.0 + i for i in range(5)]
    clock, times = run(stamps, arrival_step=0.001)
    assert times == stamps


def test_a_stamp_beyond_what_a_ros_time_holds_is_refused():
    assert StreamClock.check(2.0**31 - 1) == 2.0**31 - 1
    for bad in (1e300, -STAMP_LIMIT_S, float("inf"), "x"):
        with pytest.raises(ValueError):
            StreamClock.check(bad)


def test_saved_state_round_trips_and_a_range_rule_refuses_1e300():
    stamps = [WALL + i * PERIOD for i in range(5)] + [5.0, 5.0 + PERIOD]
    clock, times = run(stamps)
    state = StreamClock.checked_state(clock.state())
    other = StreamClock(1.0)
    other.restore(state)
    assert other.last == clock.last
    assert [other.stamp_of(t) for t in times] == pytest.approx(stamps, abs=1e-6)
    for bad in (
        {**state, "last": 1e300},
        {**state, "offsets": [[0.0, 1e300]]},
        {**state, "source": [0, 1e300]},
    ):
        with pytest.raises(ValueError, match="outside"):
            StreamClock.checked_state(bad)
