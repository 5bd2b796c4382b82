"""Watched conditions in StreamEngine (CPU, tiny random checkpoint): every new memory is evaluated,
with the probabilities of an independent forward, and events come where they should."""

from __future__ import annotations

import threading

import pytest
from support import watch_scene as scene

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint
from fvs_ros.watch import Watcher

HYSTERESIS = 0.01


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream"))


class Results:
    """on_watch collector: wait for the evaluation of a given memory version."""

    def __init__(self):
        self.items, self.cv = [], threading.Condition()

    def __call__(self, result):
        with self.cv:
            self.items.append(result)
            self.cv.notify_all()

    def wait_for(self, version, revision_after=0):
        with self.cv:
            assert self.cv.wait_for(lambda: self.find(version, revision_after), 60), (
                f"no evaluation of {version}"
            )
            return self.find(version, revision_after)

    def find(self, version, after=0):
        return next((r for r in self.items[after:] if r.memory_version == version), None)


def stream(engine, results, slots, t0=0.0):
    """Feed slots one at a time; -> [(snapshot, evaluation)] per memory update."""
    out, t = [], t0
    for slot in slots:
        for f in slot:
            engine.add_frame(f, t)
            t += 0.5
        assert engine.flush(30)
        snap = engine.snapshot()
        out.append((snap, results.wait_for(snap.version)))
    return out


def run(lm, watcher):
    results = Results()
    engine = StreamEngine(
        lm, config=EngineConfig(sample_fps=0, prefix_refresh_s=0), watcher=watcher, on_watch=results
    ).start()
    return engine, results


@pytest.fixture(scope="module")
def recorded(lm):
    """The planted stream with every candidate watched at threshold 1 (never rises): [(snapshot,
    evaluation)] per memory update, and the engine's stats."""
    watcher = Watcher(hysteresis=HYSTERESIS)
    for c in scene.CANDIDATES:
        watcher.add(c, 1.0)
    engine, results = run(lm, watcher)
    try:
        return stream(engine, results, scene.slots()), engine.stats()
    finally:
        engine.shutdown()


def test_every_memory_is_evaluated_as_an_independent_forward_says(lm, recorded):
    seen, stats = recorded
    by_condition = {c: [] for c in scene.CANDIDATES}
    for snap, result in seen:
        assert result.stamp == pytest.approx(snap.last_stamp) and result.frames_seen == 2 * snap.frames_seen
        assert [s.condition.text for s in result.states] == list(scene.CANDIDATES)
        for state in result.states:
            want = scene.reference_probability(lm, snap, state.condition.text)
            assert state.probability == pytest.approx(want, abs=2e-5)
            by_condition[state.condition.text].append(state.probability)
        assert not result.events
    assert stats.watch_evaluations >= len(seen)
    # the planted crossing exists in these probabilities (support/watch_scene.py)
    scene.plant(by_condition, HYSTERESIS)


def test_events_at_the_planted_scene_change(lm, recorded):
    # the probabilities of each memory state by an independent forward, the threshold across the jump
    snaps = [snap for snap, _ in recorded[0]]
    by_condition = {c: [scene.reference_probability(lm, s, c) for s in snaps] for c in scene.CANDIDATES}
    condition, threshold, expected = scene.plant(by_condition, HYSTERESIS)

    # then a fresh engine watching that condition at that threshold
    watcher = Watcher(hysteresis=HYSTERESIS)
    watcher.add(condition, threshold, name="planted")
    engine, results = run(lm, watcher)
    try:
        seen = stream(engine, results, scene.slots())
        versions = [snap.version for snap, _ in seen]
        got = [
            (versions.index(e.memory_version), e.rising)
            for _, r in seen
            for e in r.events
            if e.memory_version in versions
        ]
        assert got == expected
        for _, r in seen:
            for e in r.events:
                assert e.condition.name == "planted" and e.stamp == r.stamp
                assert (e.probability >= threshold) == e.rising

        # reset: the condition stays watched, inactive; the same stream rises again where it first did
        engine.reset()
        assert [s.active for s in watcher.states()] == [False]
        again = stream(engine, results, scene.slots()[: scene.DARK_SLOTS + 1], t0=100.0)
        rises = [i for i, (_, r) in enumerate(again) for e in r.events if e.rising]
        assert rises[:1] == [i for i, rising in expected if rising][:1]
    finally:
        engine.shutdown()


def test_a_new_condition_is_evaluated_without_waiting_for_frames(lm):
    engine, results = run(lm, Watcher())
    try:
        for f in scene.slots()[0]:
            engine.add_frame(f, 0.0)
        engine.flush(30)
        version = engine.snapshot().version
        n = len(results.items)
        engine.watcher.add("the room is dark", 0.0)  # threshold 0: true at once
        result = results.wait_for(version, n)
        assert [e.rising for e in result.events] == [True]
        # an answer is the same with conditions watched
        assert engine.ask("What is there?", max_new_tokens=4).text
    finally:
        engine.shutdown()


def test_nothing_is_evaluated_without_conditions_or_callback(lm):
    engine = StreamEngine(lm, config=EngineConfig(sample_fps=0, prefix_refresh_s=0)).start()
    try:
        engine.watcher.add("the room is dark", 0.5)
        for f in scene.slots()[0]:
            engine.add_frame(f, 0.0)
        engine.flush(30)
        engine.ask("What is there?", max_new_tokens=2)  # the prefix exists now
        assert engine.stats().watch_evaluations == 0
    finally:
        engine.shutdown()
