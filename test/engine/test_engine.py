"""StreamEngine on CPU with tiny random checkpoints: answers, prefix cache, streaming, floods, errors,
state."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fvs_ros.engine import (
    AnswerTimeout,
    EngineConfig,
    EngineError,
    FrameError,
    QuestionError,
    StreamEngine,
    open_engine,
)
from fvs_ros.memory import MemoryConfig
from fvs_ros.model import ModelLoadError, load_model
from fvs_ros.model.tiny import FORMATS, write_tiny_checkpoint

H, W = 112, 224  # a tiny-ViT-friendly frame: multiples of 56
Q = "What is on the table?"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: write_tiny_checkpoint(root / fmt, fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def lm(ckpts):
    return load_model(ckpts["flash_vstream"])


@pytest.fixture
def make_engine():
    """Engines built through this are shut down after the test, even when it fails."""
    engines = []

    def make(model, config=None, memory=None, **kw):
        eng = StreamEngine(model, memory, config or EngineConfig(sample_fps=0), **kw).start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown()


def frames(n, seed=0, h=H, w=W):
    """n synthetic RGB frames: a few flat-coloured scenes with noise, so memory has structure."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4, 3))
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        noise = rng.integers(-20, 21, (h, w, 3))
        out[i] = np.clip(colours[(i * 4) // max(n, 1)] + noise, 0, 255)
    return out


def feed(eng, n, seed=0, dt=0.1, t0=0.0):
    for i, f in enumerate(frames(n, seed)):
        eng.add_frame(f, t0 + i * dt)


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


class Proxy:
    """Wraps a VideoLM to slow down or break parts of it; everything else passes through."""

    def __init__(self, lm, encode_delay=0.0, answer_delay=0.0, slow_prompt=None, chunk_delay=0.0):
        self._lm, self.encode_delay, self.answer_delay = lm, encode_delay, answer_delay
        self.chunk_delay = chunk_delay  # seconds per prefill chunk
        self.chunks = 0
        self.gate = threading.Event()  # cleared: prefix builds stop before their next chunk
        self.gate.set()
        self.parked = threading.Event()  # set while a prefix build waits at the closed gate
        self.encode_gate = threading.Event()  # cleared: the frame worker stops before its next ViT call
        self.encode_gate.set()
        self.encode_parked = threading.Event()  # set while the frame worker waits at the closed gate
        self.slow_prompt = slow_prompt  # None: every answer is slow
        self.fail_encode = self.fail_answer = False
        self.started = threading.Event()
        self.answers = 0  # answer() calls (questions and summaries)
        self.aborted = 0

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def encode_frames(self, batch, frames_per_slot=1):
        time.sleep(self.encode_delay)
        if not self.encode_gate.is_set():
            self.encode_parked.set()
            self.encode_gate.wait()
            self.encode_parked.clear()
        if self.fail_encode:
            raise RuntimeError("injected ViT failure")
        return self._lm.encode_frames(batch, frames_per_slot)

    def prefill_steps(self, *args, **kw):
        steps = self._lm.prefill_steps(*args, **kw)
        while True:
            time.sleep(self.chunk_delay)
            if not self.gate.is_set():
                self.parked.set()
                self.gate.wait()
                self.parked.clear()
            self.chunks += 1
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            yield

    def answer(self, prefix, question, max_new_tokens, on_token=None, **kw):
        if self.fail_answer:
            raise RuntimeError("injected LLM failure")
        self.started.set()
        self.answers += 1
        delay = self.answer_delay if self.slow_prompt in (None, question) else 0.0
        try:
            for _ in range(round(delay / 0.01)):  # a slow generation that streams tokens
                time.sleep(0.01)
                on_token("")
        except Exception:
            self.aborted += 1
            raise
        return self._lm.answer(prefix, question, max_new_tokens, on_token=on_token, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_backbone_format_loads_and_answers(ckpts, fmt):
    with open_engine(ckpts[fmt], MemoryConfig(csm_slots=4, dam_frames=2), EngineConfig(sample_fps=0)) as eng:
        feed(eng, 6)
        assert eng.flush(10)
        a = eng.ask(Q, max_new_tokens=4, timeout=30)
    assert isinstance(a.text, str) and 0 <= a.num_tokens <= 4
    assert (a.frames_seen, a.frames_in_memory, a.first_stamp, a.last_stamp) == (6, 3, 0.0, pytest.approx(0.5))
    assert a.frames_per_slot == 2  # the default: 6 frames, 3 slots of two
    assert 0 < a.ttft_s <= a.total_s


def test_cached_answer_equals_uncached_reference(lm, make_engine):
    eng = make_engine(lm)
    feed(eng, 12)
    eng.flush()
    wait_for(lambda: eng.stats().prefix_current)
    pieces = []
    a = eng.ask(Q, max_new_tokens=12, on_token=pieces.append)
    ref = lm.answer_uncached(eng.snapshot(), Q, 12, eng.config.system_prompt)
    assert a.from_cache and a.frames_seen == 12
    assert (a.text, a.num_tokens) == (ref.text, len(ref.token_ids)) and a.num_tokens > 0
    assert "".join(pieces) == a.text
    cached = lm.answer(lm.prefill_memory(eng.snapshot(), eng.config.system_prompt), Q, 12)
    assert cached.token_ids == ref.token_ids  # the same greedy tokens, not only the same text


def test_uncached_mode_gives_the_same_answer(lm, make_engine):
    answers = []
    for cache in (True, False):
        eng = make_engine(lm, EngineConfig(sample_fps=0, prefix_cache=cache))
        feed(eng, 8)
        eng.flush()
        answers.append(eng.ask(Q, max_new_tokens=8))
    assert answers[0].text == answers[1].text and not answers[1].from_cache


def test_no_frames_yet_gives_a_clear_answer_without_the_llm(lm, make_engine):
    a = make_engine(lm).ask(Q)
    assert a.text == EngineConfig().no_video_answer
    assert (a.frames_seen, a.num_tokens, a.last_stamp) == (0, 0, None)


def test_questions_while_frames_stream_see_growing_memory(lm, make_engine):
    """Questions asked while a camera streams see the memory grow, never shrink; the camera waits
    after each 10 frames until an answer has seen them (so at least 4 memory states are asked
    about, whatever the machine's speed), and the last answer sees every frame."""
    eng = make_engine(lm, EngineConfig(sample_fps=0, prefix_refresh_s=0.05, max_prefix_lag_s=0.2))
    n, seen = 40, []

    def camera():
        for i, f in enumerate(frames(n)):
            eng.add_frame(f, i * 0.05)
            if (i + 1) % 10 == 0:  # questions catch up with the stream (the prefix lag bound is 0.2 s)
                wait_for(lambda sent=i + 1: seen and seen[-1] >= sent, timeout=60)

    feeder = threading.Thread(target=camera)
    feeder.start()
    while feeder.is_alive():
        seen.append(eng.ask(Q, max_new_tokens=2, timeout=10).frames_seen)
    feeder.join()
    eng.flush()
    wait_for(lambda: eng.stats().prefix_current)  # the background refresh catches up
    final = eng.ask(Q, max_new_tokens=2)
    seen.append(final.frames_seen)
    assert seen == sorted(seen) and seen[-1] == n and {10, 20, 30, 40} <= set(seen), seen
    assert final.last_stamp == pytest.approx((n - 1) * 0.05)


def test_an_exact_question_waits_for_the_rebuild(lm, make_engine):
    """With max_prefix_lag_s = 0 a question never sees a stale prefix."""
    slow = Proxy(lm, chunk_delay=0.02)
    eng = make_engine(slow, EngineConfig(sample_fps=0, prefix_refresh_s=0.0, prefill_chunk_tokens=16))
    feed(eng, 6)
    eng.flush()
    wait_for(lambda: eng.stats().prefix_current)
    feed(eng, 2, t0=1.0)
    eng.flush()
    assert eng.ask(Q, max_new_tokens=2).frames_seen == 8


def test_frame_flood_keeps_memory_bounded_and_counts_drops(lm, make_engine):
    """add_frame never blocks: with the frame worker held inside its first ViT call, a flood of
    frames keeps only the newest 2 slots (queue_size 4) and counts every other one dropped."""
    slow = Proxy(lm)
    mem = MemoryConfig(csm_slots=4, dam_frames=2, bank_capacity=8)
    eng = make_engine(slow, EngineConfig(sample_fps=0, queue_size=4, max_batch=1), mem)
    slow.encode_gate.clear()
    sent, depths, calls = 250, [], []
    for i, f in enumerate(frames(sent)):
        t = time.perf_counter()
        eng.add_frame(f, i * 0.002)
        calls.append(time.perf_counter() - t)
        depths.append(eng.stats().queue_depth)
        if i == 1:  # the first slot is complete: the worker takes it and waits at the gate
            assert slow.encode_parked.wait(30)
    slow.encode_gate.set()
    eng.flush()
    s = eng.stats()
    queued = 2 * 2  # the queue's two slots, the newest
    assert (s.frames_in, s.frames_dropped, s.frames_into_memory) == (sent, sent - 2 - queued, 2 + queued)
    assert max(depths) == 2  # 4 frames = 2 slots
    snap = eng.snapshot()
    assert snap.frames_seen * 2 == s.frames_into_memory == s.frames_seen  # the memory counts slots
    assert snap.last_stamp == pytest.approx((sent - 1) * 0.002)  # the newest frames were kept
    assert len(snap.csm_weights) <= 4 and len(snap.dam_slots) <= 2
    print(f"add_frame: median {1e6 * np.median(calls):.0f} us, max {1e3 * max(calls):.1f} ms")


def test_add_frame_never_waits_for_a_stuck_worker(lm, make_engine):
    """The frame worker is stuck in the ViT: add_frame keeps returning, dropping the oldest."""
    stuck, release = threading.Event(), threading.Event()

    class StuckViT(Proxy):
        def encode_frames(self, *args, **kw):
            stuck.set()
            release.wait()
            return super().encode_frames(*args, **kw)

    eng = make_engine(StuckViT(lm), EngineConfig(sample_fps=0, queue_size=4, max_batch=1, frames_per_slot=1))
    eng.add_frame(frames(1)[0], 0.0)
    assert stuck.wait(30)
    adder = threading.Thread(target=feed, args=(eng, 20), kwargs={"t0": 1.0})
    adder.start()
    adder.join(30)
    stuck_adder = adder.is_alive()
    release.set()
    assert not stuck_adder, "add_frame waited for the worker"
    assert eng.flush(30) and eng.stats().frames_dropped == 20 - 4


def test_sampling_rate_picks_frames_by_stamp(lm, make_engine):
    eng = make_engine(lm, EngineConfig(sample_fps=1.0))
    f = frames(1)[0]
    kept = [eng.add_frame(f, 5 + i / 30) for i in range(90)]  # 3 s of a 30 fps camera
    assert [i for i, k in enumerate(kept) if k] == [0, 30, 60]
    jitter = np.random.default_rng(1).uniform(-0.004, 0.004, 300)
    stamps = [8 + i / 30 + j for i, j in enumerate(jitter)]  # 10 s more, jittered stamps
    kept = [t for t in stamps if eng.add_frame(f, t)]
    assert len(kept) == 10 and all(0.96 < d < 1.04 for d in np.diff(kept))  # no drift
    eng.flush()
    s = eng.stats()
    assert (s.frames_in, s.frames_skipped, s.frames_into_memory) == (
        390,
        377,
        12,
    )  # the 13th waits for a pair


def test_frames_of_other_sizes_all_enter_memory_at_one_input_size(lm, make_engine):
    eng = make_engine(lm)
    eng.add_frame(frames(1)[0], 0.0)
    eng.add_frame(frames(1, h=300, w=500)[0], 0.1)
    eng.flush()
    eng.add_frame(frames(1, h=60, w=90)[0], 0.2)
    eng.add_frame(frames(1, h=120, w=90)[0], 0.3)
    eng.flush()
    s = eng.stats()
    assert (s.frames_into_memory, s.errors, s.frame_size) == (4, 0, lm.frame_size(300, 500))


def test_bad_inputs_raise_clear_errors_and_the_engine_keeps_working(lm, ckpts, make_engine, tmp_path):
    eng = make_engine(lm, EngineConfig(sample_fps=0, max_frame_side=1000))
    good = frames(1)[0]
    bad_frames = {
        "dtype": good.astype(np.float32),
        "HxWx3": good[..., 0],
        "got \\(112, 224, 4\\)": np.zeros((H, W, 4), np.uint8),
        "empty": np.zeros((0, W, 3), np.uint8),
        "max_frame_side": np.zeros((H, 2000, 3), np.uint8),
        "numpy array": good.tolist(),
    }
    for expected, frame in bad_frames.items():
        with pytest.raises(FrameError, match=expected):
            eng.add_frame(frame, 0.0)
    with pytest.raises(FrameError, match="finite"):
        eng.add_frame(good, float("nan"))
    with pytest.raises(FrameError, match="min_frame_side"):
        eng.add_frame(good[:10], 0.5)
    eng.add_frame(good, 1.0)
    for question, expected in (("", "non-empty"), ("   \n", "non-empty"), ("x" * 10_000, "10000 characters")):
        with pytest.raises(QuestionError, match=expected):
            eng.ask(question)
    for n in (0, -1, 10**6, 2.5):
        with pytest.raises(QuestionError, match="max_new_tokens"):
            eng.ask(Q, max_new_tokens=n)
    with pytest.raises(QuestionError, match="timeout"):
        eng.ask(Q, timeout=0)
    missing = tmp_path / "no_such_checkpoint"
    for load in (load_model, open_engine):
        with pytest.raises(ModelLoadError, match="no_such_checkpoint"):
            load(missing)
    with pytest.raises(FileNotFoundError, match="no saved engine state"):
        eng.load(tmp_path / "nothing_saved")
    eng.add_frame(good, 2.0)
    eng.flush()
    s = eng.stats()
    assert s.frames_rejected == 8 and s.frames_into_memory == 2 and s.errors == 0
    assert eng.ask(Q, max_new_tokens=2).frames_seen == 2


def test_model_errors_are_counted_and_reported(lm, make_engine):
    broken = Proxy(lm)
    eng = make_engine(broken)
    broken.fail_encode = True
    feed(eng, 4)
    eng.flush()
    s = eng.stats()
    assert s.errors >= 1 and "injected ViT failure" in s.last_error and s.frames_into_memory == 0
    broken.fail_encode, broken.fail_answer = False, True
    feed(eng, 4, t0=1.0)
    eng.flush()
    with pytest.raises(EngineError, match="injected LLM failure") as err:
        eng.ask(Q)
    assert isinstance(err.value.__cause__, RuntimeError)
    broken.fail_answer = False
    assert eng.ask(Q, max_new_tokens=2).frames_seen == 4
    s = eng.stats()
    assert s.questions_failed == 1 and s.questions_answered == 1 and s.running


def test_a_timed_out_answer_carries_the_text_generated_until_then(lm, make_engine):
    """A timeout during generation returns what was generated (issue 24): the caller's token
    callback holds the generation after two pieces until the ask has timed out."""
    eng = make_engine(lm)
    feed(eng, 4)
    eng.flush()
    streamed = []  # the tiny tokenizer's tokens often end mid-character: fewer pieces than tokens
    full = eng.ask(Q, max_new_tokens=32, timeout=30, on_token=streamed.append)  # greedy: same text again
    assert len(streamed) >= 3, streamed
    pieces, timed_out = [], threading.Event()

    def hold(piece):
        pieces.append(piece)
        if len(pieces) == 2:
            timed_out.wait(60)

    try:
        with pytest.raises(AnswerTimeout, match="after 2 text piece") as raised:
            eng.ask(Q, max_new_tokens=32, timeout=2.0, on_token=hold)
    finally:
        timed_out.set()
    assert raised.value.partial == "".join(pieces[:2]) and raised.value.pieces == 2
    assert full.text.startswith(raised.value.partial) and raised.value.partial
    with pytest.raises(AnswerTimeout, match="before its first token") as raised:
        eng.ask(Q, timeout=1e-6)
    assert raised.value.partial == "" and raised.value.pieces == 0


def test_timeout_cancels_the_request_and_the_worker_keeps_serving(lm, make_engine):
    slow = Proxy(lm, answer_delay=60.0)
    eng = make_engine(slow)
    feed(eng, 4)
    eng.flush()
    t = time.perf_counter()
    with pytest.raises(AnswerTimeout):
        eng.ask(Q, timeout=0.1)
    assert time.perf_counter() - t < 30  # at its timeout, not after the 60 s generation
    slow.answer_delay = 0.0
    a = eng.ask(Q, max_new_tokens=2, timeout=10)
    assert a.frames_seen == 4 and slow.aborted == 1  # the abandoned generation stopped early
    s = eng.stats()
    assert (s.questions_timed_out, s.questions_answered, s.errors) == (1, 1, 0)


def test_summaries_on_demand_and_periodic_only_when_memory_changed(lm, make_engine):
    """A periodic summary every 10 ms, but only of a memory not summarised yet: the summaries'
    memories grow strictly, ending with the whole stream, however many periods pass while the
    memory stays the same (the 6-frame summary, a question and a second flush take many periods)."""
    got = []
    eng = make_engine(
        lm, EngineConfig(sample_fps=0, summary_period_s=0.01, summary_max_new_tokens=3), on_summary=got.append
    )
    feed(eng, 4)
    eng.flush()
    assert eng.summarize().frames_seen == 4
    wait_for(lambda: got and got[-1].frames_seen == 4)  # the last of all 4 frames
    feed(eng, 2, t0=10.0)
    eng.flush()
    wait_for(lambda: got[-1].frames_seen == 6)
    assert eng.ask(Q, max_new_tokens=8).frames_seen == 6
    eng.flush()
    seen = [a.frames_seen for a in got]
    assert seen == sorted(set(seen)) and seen[-1] == 6, seen  # never the same memory twice
    assert all(a.num_tokens <= 3 for a in got) and eng.stats().summaries == len(got)


def test_questions_preempt_a_running_summary_and_shutdown_stops_it(lm, make_engine):
    slow = Proxy(lm, answer_delay=60.0, slow_prompt=EngineConfig.summary_prompt)
    eng = make_engine(slow, EngineConfig(sample_fps=0, summary_period_s=0.01), on_summary=print)
    feed(eng, 4)
    assert slow.started.wait(10)  # the automatic summary is generating (maybe on the first frames)
    assert eng.flush(10)  # all four frames in memory before the question
    calls = slow.answers
    t = time.perf_counter()
    assert eng.ask(Q, max_new_tokens=2).frames_seen == 4
    # preempted: the 60 s summary was stopped, not waited for
    assert time.perf_counter() - t < 30 and slow.aborted == 1
    wait_for(lambda: slow.answers >= calls + 2, 30)  # the question, then the summary again ...
    t = time.perf_counter()
    eng.shutdown()  # ... and shutdown stops it at its next token
    assert time.perf_counter() - t < 30 and slow.aborted == 2 and eng.stats().errors == 0


def test_reset_save_load_round_trip(lm, make_engine, tmp_path):
    eng = make_engine(lm)
    feed(eng, 10)
    eng.flush()
    saved = eng.snapshot()
    before = eng.ask(Q, max_new_tokens=6)
    eng.add_frame(frames(1)[0], 1.0)  # half a slot: not in memory, not saved
    eng.save(tmp_path / "state")
    eng.reset()
    s = eng.stats()
    assert (s.frames_in, s.frames_into_memory, s.frames_seen, s.frame_size) == (0, 0, 0, None)
    assert eng.ask(Q).frames_seen == 0
    feed(eng, 3, seed=5)  # a different stream, replaced by the load below
    eng.flush()
    for target in (eng, make_engine(lm)):
        target.load(tmp_path / "state")
        snap = target.snapshot()
        assert (snap.frames_seen, snap.version, snap.last_stamp) == (
            saved.frames_seen,
            saved.version,
            saved.last_stamp,
        )
        assert torch.equal(snap.csm_features, saved.csm_features) and torch.equal(
            snap.dam_slots, saved.dam_slots
        )
        after = target.ask(Q, max_new_tokens=6)
        assert (after.text, after.frames_seen, after.first_stamp) == (before.text, 10, 0.0)
        s = target.stats()
        assert (s.frames_in, s.frames_into_memory, s.frame_size) == (11, 10, (H, W))
        for t in (1.1, 1.2):  # the stream continues after the saved stamp, with a new slot
            target.add_frame(frames(1)[0], t)
        target.flush()
        assert (target.snapshot().frames_seen, target.snapshot().last_stamp) == (6, 1.2)
    one = make_engine(lm, EngineConfig(sample_fps=0, frames_per_slot=1))
    with pytest.raises(ValueError, match="2-frame slots"):  # another slot layout: refused, nothing changes
        one.load(tmp_path / "state")
    assert one.snapshot().frames_seen == 0


def test_shutdown_fails_pending_requests_and_leaves_no_threads(lm):
    slow = Proxy(lm, answer_delay=0.3)
    eng = StreamEngine(slow, config=EngineConfig(sample_fps=0)).start()
    feed(eng, 3)
    eng.flush()
    results = []

    def ask():
        try:
            results.append(eng.ask(Q, timeout=10))
        except EngineError as e:
            results.append(e)

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for t in askers:
        t.start()
    time.sleep(0.1)
    eng.shutdown()
    for t in askers:
        t.join(5)
    assert len(results) == 3 and all(isinstance(r, EngineError) for r in results)
    assert not [t for t in threading.enumerate() if t.name.startswith("fvs-")]
    assert not eng.stats().running
    with pytest.raises(EngineError):
        eng.ask(Q)
    with pytest.raises(EngineError):
        eng.add_frame(frames(1)[0], 9.0)
    eng.shutdown()  # idempotent
