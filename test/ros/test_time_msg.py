"""Issue 24 item 8b: every stamp the node sends goes through one conversion to
builtin_interfaces/Time, which refuses what the message cannot hold (before, 1e300 reached
serialization and failed in the executor: no reply, the worker gone)."""

import pytest

from fvs_ros.ros.node import _time_msg


@pytest.mark.parametrize(
    "seconds, sec, nanosec",
    [(None, 0, 0), (0.0, 0, 0), (1.5, 1, 500_000_000), (-0.25, -1, 750_000_000), (2.0**31 - 1, 2**31 - 1, 0)],
)
def test_seconds_become_sec_and_nanosec(seconds, sec, nanosec):
    t = _time_msg(seconds)
    assert (t.sec, t.nanosec) == (sec, nanosec)


def test_a_fraction_that_rounds_up_carries_into_the_seconds():
    t = _time_msg(7.9999999999)
    assert (t.sec, t.nanosec) == (8, 0)


@pytest.mark.parametrize("seconds", [1e300, 2.0**31, -(2.0**31) - 1, float("inf"), float("nan")])
def test_a_value_time_cannot_hold_is_refused(seconds):
    with pytest.raises(ValueError, match="Time|not a time"):
        _time_msg(seconds)
