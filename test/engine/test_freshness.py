"""How old an answer's memory is (Answer.memory_lag_s), and the prefix cache keeping it fresh."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from support.engines import LONG, feed, start, wait_for

from fvs_ros.memory import FlashMemory, MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint

Q = "What is on the table?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream")


@pytest.fixture(scope="module")
def lm(ckpt):
    return load_model(ckpt)


def test_memory_lag_is_newest_received_stamp_minus_the_memory_newest(lm, engines):
    eng = start(lm, engines, sample_fps=1.0)
    assert eng.ask(Q, max_new_tokens=2, timeout=LONG).memory_lag_s is None  # no video yet
    feed(eng, [10.0, 10.5, 11.0, 11.5, 11.75])  # 10.0 and 11.0 enter memory
    assert eng.flush(LONG)
    a = eng.ask(Q, max_new_tokens=2, timeout=LONG)
    assert (a.frames_seen, a.last_stamp) == (2, 11.0)
    assert a.memory_lag_s == pytest.approx(0.75)
    summary = eng.summarize(max_new_tokens=2, timeout=LONG)
    assert summary.memory_lag_s == pytest.approx(0.75)


def test_an_answer_on_a_lagging_prefix_reports_the_prefix_memory(lm, engines):
    """With max_prefix_lag_s > 0 an answer may rest on an older prefix: its lag counts from there."""
    eng = start(lm, engines, sample_fps=0, max_prefix_lag_s=100.0, prefix_refresh_s=3600.0)
    feed(eng, [0.0, 0.1])
    assert eng.flush(LONG)
    first = eng.ask(Q, max_new_tokens=2, timeout=LONG)  # builds the first prefix and waits for it
    feed(eng, [1.0, 2.0, 3.0], seed=1)
    assert eng.flush(LONG)
    a = eng.ask(Q, max_new_tokens=2, timeout=LONG)  # within the 100 s bound: the old prefix serves
    assert a.from_cache and a.last_stamp == first.last_stamp
    assert a.memory_lag_s == pytest.approx(3.0 - a.last_stamp)


@pytest.fixture(scope="module")
def fast_lm(ckpt):
    """The FastDecoder path on CPU (SDPA with a mask instead of FlashAttention, no graphs)."""
    return load_model(ckpt, fast_decode=True)


def memory_of(lm, n=8, seed=3):
    memory = FlashMemory(MemoryConfig(csm_slots=4, dam_frames=2))
    frames = np.random.default_rng(seed).integers(0, 256, (n, 112, 224, 3), dtype=np.uint8)
    feats = lm.encode_frames(frames)
    return memory.update(feats.low, feats.full, torch.arange(n, dtype=torch.float64), feats.full_hw)


@pytest.mark.parametrize("chunk", [None, 16, 50])
def test_the_static_cache_prefill_equals_the_eager_one(fast_lm, chunk):
    snap = memory_of(fast_lm)

    def prefix(static: bool):
        fast_lm.static_prefill = static
        try:
            steps = fast_lm.prefill_steps(snap, "You are a helpful assistant.", chunk)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    return done.value
        finally:
            fast_lm.static_prefill = True

    static, eager = prefix(True), prefix(False)
    assert (static.num_tokens, static.next_position) == (eager.num_tokens, eager.next_position)
    for (ks, vs), (ke, ve) in zip(static.kv, eager.kv, strict=True):
        assert ks.shape == ke.shape
        torch.testing.assert_close(ks, ke, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vs, ve, rtol=1e-4, atol=1e-5)
    ref = fast_lm.answer_uncached(snap, Q, 12)
    assert fast_lm.answer(static, Q, 12).token_ids == ref.token_ids and len(ref.token_ids) > 0


def test_engine_answers_from_static_prefixes_equal_a_full_rebuild(fast_lm, engines):
    eng = start(fast_lm, engines, sample_fps=0, prefill_chunk_tokens=32)
    feed(eng, [0.1 * i for i in range(10)])
    assert eng.flush(LONG)
    a = eng.ask(Q, max_new_tokens=12, timeout=LONG)
    ref = fast_lm.answer_uncached(eng.snapshot(), Q, 12, eng.config.system_prompt)
    assert a.frames_seen == 10 and (a.text, a.num_tokens) == (ref.text, len(ref.token_ids))


class Gated:
    """The model with prefix builds that can be held between chunks; records finished builds."""

    def __init__(self, inner):
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.at_gate = threading.Event()
        self.answer_gate = threading.Event()
        self.answer_gate.set()
        self.answering = threading.Event()
        self.finished: list[int] = []  # frames_seen of each prefix built to the end

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def prefill_steps(self, snapshot, *args, **kw):
        steps = self._inner.prefill_steps(snapshot, *args, **kw)
        while True:
            if not self.gate.is_set():
                self.at_gate.set()
                assert self.gate.wait(LONG)
            try:
                next(steps)
            except StopIteration as done:
                self.finished.append(int(snapshot.frames_seen))
                return done.value
            yield

    def answer(self, *args, **kw):
        self.answering.set()
        assert self.answer_gate.wait(LONG)
        return self._inner.answer(*args, **kw)


def test_an_exact_question_drops_a_rebuild_of_older_memory(lm, engines):
    gated = Gated(lm)
    eng = start(
        gated, engines, sample_fps=0, frames_per_slot=1, prefill_chunk_tokens=16, prefix_refresh_s=0.0
    )
    feed(eng, [0.0, 0.1])
    assert eng.flush(LONG)
    wait_for(lambda: eng.stats().prefix_current)
    gated.gate.clear()
    feed(eng, [0.2], seed=1)  # memory of 3 frames: a rebuild starts and is held after its first chunk
    assert gated.at_gate.wait(LONG)
    feed(eng, [0.3], seed=2)  # memory of 4 frames
    assert eng.flush(LONG)
    got: list = []
    asker = threading.Thread(target=lambda: got.append(eng.ask(Q, max_new_tokens=2, timeout=LONG)))
    asker.start()
    wait_for(lambda: eng._prefixes._waiting is not None)  # the question waits for the 4-frame memory
    gated.gate.set()
    asker.join(LONG)
    assert got and got[0].frames_seen == 4
    assert 3 not in gated.finished  # the 3-frame build was dropped at its next chunk


def test_a_rebuild_finishes_while_an_answer_holds_the_gpu(lm, engines):
    """No starvation: the builder pauses for answers only within its yield budget."""
    gated = Gated(lm)
    eng = start(
        gated,
        engines,
        sample_fps=0,
        frames_per_slot=1,  # one frame, one memory update
        prefill_chunk_tokens=16,
        max_prefix_lag_s=100.0,
        prefix_refresh_s=0.0,
    )
    feed(eng, [0.0, 0.1])
    assert eng.flush(LONG)
    wait_for(lambda: eng.stats().prefix_current)
    gated.answer_gate.clear()  # the next answer stays on the GPU until released
    asker = threading.Thread(target=lambda: eng.ask(Q, max_new_tokens=2, timeout=LONG))
    asker.start()
    assert gated.answering.wait(LONG)
    feed(eng, [0.2, 0.3], seed=1)
    assert eng.flush(LONG)
    wait_for(lambda: 4 in gated.finished and eng.stats().prefix_current)
    assert gated.answering.is_set() and not gated.answer_gate.is_set()  # the answer still runs
    gated.answer_gate.set()
    asker.join(LONG)
