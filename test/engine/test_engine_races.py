"""The engine's thread races, each made deterministic by pausing one thread at the racy point.

Hooks are events and wrapped locks injected into a real engine (tiny random model, CPU); no
sleeps decide an outcome. Each test failed on the code before the fix (issue 12).
"""

from __future__ import annotations

import threading

import pytest
from support.engines import LONG, feed, start, wait_for

import fvs_ros.engine.stream_engine as engine_module
from fvs_ros.engine import AnswerTimeout
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint

Q = "What is on the table?"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream"))


def test_a_question_during_a_just_decided_rebuild_does_not_wait(lm, engines):
    """The builder decided to rebuild but has not started prefilling: a question arriving now
    (its prefix past max_prefix_lag_s but within twice that) is answered from the old prefix at
    once. Before the fix the 'build running' mark was set outside the lock, after the decision,
    and such a question waited for the whole rebuild."""
    eng = start(lm, engines, max_prefix_lag_s=2.0, prefix_refresh_s=0.0)
    feed(eng, [i * 0.1 for i in range(6)])
    assert eng.flush(LONG)
    wait_for(lambda: eng.stats().prefix_current)
    old = eng.ask(Q, max_new_tokens=2, timeout=LONG)  # waits for the first prefix
    assert old.frames_seen == 6

    decided, go = threading.Event(), threading.Event()
    build = eng._prefixes._build

    def paused_build(pub):  # the builder thread, right after its decision
        decided.set()
        assert go.wait(LONG)
        build(pub)

    eng._prefixes._build = paused_build
    # memory moves 2.5 s of stream ahead: past the 2 s bound, a rebuild is due
    feed(eng, [2.7 + i * 0.1 for i in range(4)], seed=27)
    assert eng.flush(LONG)
    assert decided.wait(LONG)
    got: list = []
    asker = threading.Thread(target=lambda: got.append(eng.ask(Q, max_new_tokens=2, timeout=LONG)))
    asker.start()
    asker.join(LONG)
    answered_before_build = not asker.is_alive()
    go.set()
    asker.join()
    assert answered_before_build, "the question waited for a rebuild that was already decided"
    assert got[0].from_cache and got[0].frames_seen == 6


class _HookLock:
    """A lock that calls before() on entering and records which thread holds it."""

    def __init__(self, lock, before=lambda: None):
        self._lock, self._before, self.owner = lock, before, None

    def __enter__(self):
        self._before()
        self._lock.acquire()
        self.owner = threading.current_thread().name
        return self

    def __exit__(self, *exc):
        self.owner = None
        self._lock.release()

    def __getattr__(self, name):
        return getattr(self._lock, name)


def test_a_reset_between_memory_update_and_counters_leaves_them_consistent(lm, engines):
    """Pause the frame worker at its first use of the counter lock after a memory update, and
    reset() the engine from another thread there. Afterwards memory and frame counters agree.
    Before the fix the counters were updated after the memory lock was released: a reset in
    that gap left frames_into_memory=2 with frames_in=0 and an empty memory."""
    eng = start(lm, engines)
    at_gap, go, reset_trying, reset_done = (threading.Event() for _ in range(4))
    updated = threading.Event()
    update = eng._memory.update

    def hooked_update(*args, **kw):
        out = update(*args, **kw)
        updated.set()
        return out

    def before_counter_lock():
        worker = threading.current_thread().name == "fvs-frame-worker"
        if worker and updated.is_set() and not at_gap.is_set():
            at_gap.set()
            assert go.wait(LONG)

    def before_memory_lock():
        if threading.current_thread().name == "resetter":
            reset_trying.set()

    eng._memory.update = hooked_update
    eng._lock = _HookLock(eng._lock, before_counter_lock)
    eng._mem_lock = memory_lock = _HookLock(eng._mem_lock, before_memory_lock)

    feed(eng, [0.0, 0.1])  # one batch of two frames
    assert at_gap.wait(LONG)
    resetter = threading.Thread(target=lambda: (eng.reset(), reset_done.set()), name="resetter")
    resetter.start()
    assert reset_trying.wait(LONG)
    if memory_lock.owner != "fvs-frame-worker":  # the worker is outside the memory lock: reset runs now
        assert reset_done.wait(LONG)
    go.set()
    resetter.join(LONG)
    assert eng.flush(LONG)
    s = eng.stats()
    assert s.frames_seen == eng.snapshot().frames_seen
    assert (s.frames_in, s.frames_into_memory, s.frames_seen) == (0, 0, 0), s


def test_an_answer_finishing_as_its_wait_times_out_counts_once(lm, engines, monkeypatch):
    """The asker's wait times out; before it marks the request cancelled, the answer finishes.
    The question then counts exactly once (answered, or timed out), and the caller's outcome
    agrees with the counters. Before the fix it counted as answered and as timed out."""
    release, served = threading.Event(), threading.Event()

    class GapEvent(threading.Event):
        def wait(self, timeout=None):
            done = super().wait(timeout)
            if not done and not release.is_set():  # timed out: let the answer finish right now
                release.set()
                assert served.wait(LONG)
            return done

        def set(self):
            super().set()
            served.set()

    class GapRequest(engine_module._Request):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.done = GapEvent()

    class Blocking:
        """The model, with answers held until `release`."""

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def answer(self, *args, **kw):
            assert release.wait(LONG)
            return self._inner.answer(*args, **kw)

    eng = start(Blocking(lm), engines)
    feed(eng, [i * 0.1 for i in range(4)])
    assert eng.flush(LONG)
    monkeypatch.setattr(engine_module, "_Request", GapRequest)
    try:
        answer = eng.ask(Q, max_new_tokens=2, timeout=0.2)
    except AnswerTimeout:
        answer = None
    s = eng.stats()
    assert s.questions_answered + s.questions_timed_out == 1, s
    assert (s.questions_answered == 1) == (answer is not None)
