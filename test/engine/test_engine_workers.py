"""Issue 24 item 8: the LLM worker thread must not die and leave every later question timing out.
A job that fails (here: while its error is being logged, as the node's log handler did) fails
alone and the next question is answered; a worker that still dies is noticed: the engine reports
it and refuses questions with the reason. CPU, tiny random checkpoint."""

from __future__ import annotations

import logging

import pytest
import test_engine

from fvs_ros.engine import EngineConfig, EngineError

ckpts, lm, make_engine = test_engine.ckpts, test_engine.lm, test_engine.make_engine  # shared fixtures
Q, Proxy, feed = test_engine.Q, test_engine.Proxy, test_engine.feed


class FailingHandler(logging.Handler):
    """A log handler that raises on the first `times` error records (as the node's did: "Logger
    severity cannot be changed between calls"), then passes."""

    def __init__(self, times):
        super().__init__(logging.ERROR)
        self.times = times

    def emit(self, record):
        if self.times > 0:
            self.times -= 1
            raise ValueError("Logger severity cannot be changed between calls.")


@pytest.fixture
def failing_log():
    handlers = []

    def install(times):
        handler = FailingHandler(times)
        logging.getLogger("fvs_ros").addHandler(handler)
        handlers.append(handler)
        return handler

    yield install
    for handler in handlers:
        logging.getLogger("fvs_ros").removeHandler(handler)


def test_a_job_that_fails_outside_its_own_handling_fails_alone(lm, make_engine, failing_log):
    broken = Proxy(lm)
    eng = make_engine(broken, EngineConfig(sample_fps=0))
    feed(eng, 4)
    eng.flush()
    failing_log(times=1)
    broken.fail_answer = True
    with pytest.raises(EngineError, match="Logger severity"):  # its error could not even be logged
        eng.ask(Q, timeout=30)
    broken.fail_answer = False
    assert eng.ask(Q, max_new_tokens=2, timeout=30).frames_seen == 4  # the worker went on
    s = eng.stats()
    assert s.running and s.worker_failure is None and s.questions_answered == 1


def test_a_worker_that_dies_is_reported_and_questions_are_refused_with_the_reason(
    lm, make_engine, failing_log
):
    broken = Proxy(lm)
    eng = make_engine(broken, EngineConfig(sample_fps=0))
    feed(eng, 4)
    eng.flush()
    failing_log(times=2)  # the job's error, then the loop's report of it: the thread ends
    broken.fail_answer = True
    with pytest.raises(EngineError):
        eng.ask(Q, timeout=30)
    test_engine.wait_for(lambda: eng.stats().worker_failure is not None, 30)
    s = eng.stats()
    assert not s.running and s.worker_failure.startswith("the LLM worker stopped: ValueError")
    with pytest.raises(EngineError, match="the LLM worker stopped"):  # at once, not after a timeout
        eng.ask(Q, timeout=30)
