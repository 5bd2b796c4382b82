"""The GPU scheduler's decisions (fvs_ros/engine/scheduler.py): fake streams, a fake clock, no torch."""

import math

import pytest

from fvs_ros.engine.scheduler import DECODE, PREFILL, VISION, Priority, Scheduler, lane_of, staleness


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


def names(jobs):
    return [(j.stream, j.priority.name) for j in jobs]


def test_lanes():
    assert lane_of(Priority.FRAMES) == VISION and lane_of(Priority.REBUILD) == PREFILL
    for p in (Priority.QUESTION, Priority.WATCH, Priority.SUMMARY):
        assert lane_of(p) == DECODE
    s = Scheduler(Clock())
    assert s.submit("a", Priority.QUESTION, lane=PREFILL).lane == PREFILL  # a build a question waits for
    with pytest.raises(ValueError, match="lane"):
        s.submit("a", Priority.QUESTION, lane="tpu")


def test_decode_lane_question_first_then_watch_then_summary(clock):
    s = Scheduler(clock, aging_s=math.inf)
    s.submit("a", Priority.SUMMARY)
    s.submit("c", Priority.WATCH)
    s.submit("b", Priority.WATCH)
    s.submit("d", Priority.QUESTION)
    order = []
    while s.waiting:
        started = s.schedule()
        order += names(started)
        for job in started:
            s.finish(job)
    assert order == [("d", "QUESTION"), ("c", "WATCH"), ("b", "WATCH"), ("a", "SUMMARY")]


def test_prefill_lane_a_waited_for_build_goes_first(clock):
    """A build chunk a question waits for starts beside another camera's background chunk; the
    next background rebuild waits for the lane."""
    s = Scheduler(clock, aging_s=math.inf)
    running = s.submit("a", Priority.REBUILD, staleness=1.0)
    assert s.schedule() == [running]
    stale = s.submit("b", Priority.REBUILD, staleness=9.0)
    waited = s.submit("c", Priority.QUESTION, lane=PREFILL)
    assert s.schedule() == [waited]
    s.finish(running)
    assert s.schedule() == []  # one background chunk at a time
    s.finish(waited)
    assert s.schedule() == [stale]


def test_the_three_lanes_run_side_by_side(clock):
    s = Scheduler(clock)
    s.submit("a", Priority.REBUILD, staleness=1.0)
    s.submit("b", Priority.FRAMES)
    s.submit("a", Priority.FRAMES)
    s.submit("b", Priority.WATCH)
    started = s.schedule()
    assert names(started) == [("b", "FRAMES"), ("b", "WATCH"), ("a", "REBUILD")]
    assert names(s.schedule()) == []  # the vision lane is busy: camera a's batch waits
    s.finish(started[0])
    assert names(s.schedule()) == [("a", "FRAMES")]


def test_question_starts_beside_background_but_not_beside_a_question(clock):
    s = Scheduler(clock)
    summary = s.submit("a", Priority.SUMMARY)
    assert s.schedule() == [summary]
    q1 = s.submit("b", Priority.QUESTION)
    assert s.schedule() == [q1]  # a question never waits for another camera's summary
    q2 = s.submit("a", Priority.QUESTION)
    watch = s.submit("c", Priority.WATCH)
    assert s.schedule() == []  # q2 waits for q1; the watch for the lane
    s.finish(q1)
    assert s.schedule() == [q2]
    s.finish(q2)
    assert s.schedule() == []  # the summary still runs
    s.finish(summary)
    assert s.schedule() == [watch]


def test_background_rebuilds_stalest_first(clock):
    s = Scheduler(clock, aging_s=math.inf)
    s.submit("a", Priority.REBUILD, staleness=0.5)
    clock.t += 0.1
    s.submit("b", Priority.REBUILD, staleness=2.0)
    clock.t += 0.1
    s.submit("c", Priority.REBUILD, staleness=math.inf)  # never built
    order = []
    while s.waiting:
        (job,) = s.schedule()
        order.append(job.stream)
        s.finish(job)
    assert order == ["c", "b", "a"]


def test_equal_class_oldest_first(clock):
    s = Scheduler(clock)
    s.submit("b", Priority.FRAMES)
    clock.t += 0.01
    s.submit("a", Priority.FRAMES)
    (job,) = s.schedule()
    assert job.stream == "b"


def test_aging_lets_a_summary_overtake_newer_watch_evaluations(clock):
    """Nothing starves: a summary that waited two aging periods ranks as a watch evaluation, and
    the older one goes first."""
    s = Scheduler(clock, aging_s=1.0)
    summary = s.submit("a", Priority.SUMMARY)
    clock.t += 2.0
    s.submit("b", Priority.WATCH)
    assert s.effective_class(summary) == Priority.WATCH
    assert s.schedule() == [summary]


def test_aging_never_beats_a_question(clock):
    s = Scheduler(clock, aging_s=1.0)
    summary = s.submit("a", Priority.SUMMARY)
    clock.t += 100.0
    assert s.effective_class(summary) == Priority.QUESTION
    q = s.submit("b", Priority.QUESTION)
    # equal class: the older job first; the question still starts beside it (background)
    assert s.schedule() == [summary, q]


def test_cancel_withdraws_a_waiting_job(clock):
    s = Scheduler(clock)
    q = s.submit("a", Priority.QUESTION)
    w = s.submit("b", Priority.WATCH)
    assert s.schedule() == [q]
    s.cancel(w)
    s.finish(q)
    assert s.schedule() == [] and not s.waiting


def test_staleness():
    assert staleness(None, 2.0) == 0.0
    assert staleness(0.0, 2.0) == 0.0
    assert staleness(3.0, 2.0) == 1.5
    assert staleness(0.1, 0.0) == math.inf


def test_aging_must_be_positive(clock):
    with pytest.raises(ValueError):
        Scheduler(clock, aging_s=0)
