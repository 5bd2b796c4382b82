"""Watched conditions in StreamEngine (CPU, tiny random checkpoint): every new memory is evaluated,
with the probabilities of an independent forward, and events come where they should."""

from __future__ import annotations

import threading
import time

import pytest
from support import watch_scene as scene
from support.attention import reference_mass

from fvs_ros.engine import EngineConfig, StreamEngine
from fvs_ros.engine.grounding import evidence_items
from fvs_ros.engine.watch import Watcher
from fvs_ros.model import load_model
from fvs_ros.model.conditions import condition_question
from fvs_ros.model.tiny import write_tiny_checkpoint

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
        seen = stream(engine, results, scene.slots())
    finally:
        engine.shutdown()  # the worker counts an evaluation after on_watch returns: stats once it stopped
    return seen, engine.stats()


def assert_evidence_of_the_condition_alone(lm, snapshot, condition, items):
    """An event's evidence: the memory blocks to which transformers' eager attention weights of the
    last token of the condition's prompt alone, on that memory, give the largest shares
    (test_evidence.reference_mass), with those shares (ties may come in either order)."""
    question = condition_question(condition)
    mass, _ = reference_mass(lm, snapshot, [], 1, lm.evidence_layers, question=question)
    want = evidence_items(mass / mass.sum(), snapshot, len(mass))  # every block, largest share first
    assert len(items) == min(EngineConfig().evidence_frames, len(want)) > 0
    assert [i.share for i in items] == pytest.approx([w.share for w in want[: len(items)]], abs=1e-5)
    for item in items:
        assert any(
            (w.kind, w.slot, w.stamp, w.span, w.weight)
            == (item.kind, item.slot, item.stamp, item.span, item.weight)
            and w.share == pytest.approx(item.share, abs=1e-5)
            for w in want
        ), (item, want)


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
        for snap, r in seen:
            for e in r.events:
                assert e.condition.name == "planted" and e.stamp == r.stamp
                assert (e.probability >= threshold) == e.rising
                assert_evidence_of_the_condition_alone(lm, snap, condition, e.evidence)

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
        unwatched = engine.ask("What is there?", max_new_tokens=4)
        engine.watcher.add("the room is dark", 0.0)  # threshold 0: true at once
        result = results.wait_for(version, n)
        assert [e.rising for e in result.events] == [True]
        # an answer is the same with conditions watched (greedy, same memory)
        watched = engine.ask("What is there?", max_new_tokens=4)
        assert watched.frames_seen == unwatched.frames_seen and watched.num_tokens >= 1
        assert (watched.text, watched.num_tokens) == (unwatched.text, unwatched.num_tokens)
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


class Ordered:
    """The real VideoLM, recording the order of its LLM calls; the first evaluation waits for `gate`."""

    def __init__(self, lm):
        self._lm, self.calls, self.gate, self.blocked = lm, [], threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def score_conditions(self, prefix, conditions, **kwargs):
        self.calls.append(("watch", prefix.snapshot_version))
        if len(self.calls) == 1:
            self.blocked.set()
            assert self.gate.wait(60)
        return self._lm.score_conditions(prefix, conditions, **kwargs)

    def answer(self, prefix, *args, **kwargs):
        self.calls.append(("answer", prefix.snapshot_version))
        return self._lm.answer(prefix, *args, **kwargs)


def test_questions_go_before_evaluations(lm):
    """A question queued while an evaluation runs is answered before the next memory is evaluated."""
    ordered = Ordered(lm)
    watcher = Watcher()
    watcher.add("the room is dark", 0.5)
    engine, results = run(ordered, watcher)
    try:
        slots = scene.slots()
        for f in slots[0]:
            engine.add_frame(f, 0.0)
        assert ordered.blocked.wait(60)  # evaluating memory 1, held
        for f in slots[1]:
            engine.add_frame(f, 1.0)
        engine.flush(30)
        second = engine.snapshot().version
        answers = []
        asker = threading.Thread(
            target=lambda: answers.append(engine.ask("What is there?", max_new_tokens=2))
        )
        asker.start()
        deadline = time.monotonic() + 60
        # the question is queued and the prefix of memory 2 is built: both are due when the gate opens
        while not (engine._requests and engine.stats().prefix_current) and time.monotonic() < deadline:
            time.sleep(0.01)
        ordered.gate.set()
        asker.join(60)
        results.wait_for(second)
        assert [kind for kind, _ in ordered.calls] == ["watch", "answer", "watch"]
        assert ordered.calls[2][1] == second and answers
    finally:
        ordered.gate.set()
        engine.shutdown()
