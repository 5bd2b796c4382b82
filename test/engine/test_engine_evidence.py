"""StreamEngine: evidence with every answer, thumbnails of retained frames, the memory view, and
cancelling a question (CPU, tiny random checkpoint)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fvs_ros.engine import AnswerCancelled, EngineConfig, StreamEngine
from fvs_ros.engine.grounding import CONTEXT, DETAIL, evidence_items
from fvs_ros.engine.memory_view import MISSING
from fvs_ros.memory import MemoryConfig
from fvs_ros.model import load_model
from fvs_ros.model.tiny import write_tiny_checkpoint

H, W = 112, 224
Q = "What is on the table?"
MEMORY = MemoryConfig(csm_slots=4, dam_frames=2, bank_capacity=6)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream"))


@pytest.fixture
def engine(lm):
    engines = []

    def make(model=None, **config):
        eng = StreamEngine(model or lm, MEMORY, EngineConfig(sample_fps=0, **config)).start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown()


def feed(eng, n, t0=1000.0, dt=0.25, seed=0):
    """n frames of four flat scenes with noise; returns the stamps of the memory slots they fill
    (a slot holds frames_per_slot consecutive frames and is stamped with its last)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4, 3))
    stamps = [t0 + i * dt for i in range(n)]
    for i, stamp in enumerate(stamps):
        frame = np.clip(colours[i * 4 // n] + rng.integers(-20, 21, (H, W, 3)), 0, 255).astype(np.uint8)
        eng.add_frame(frame, stamp)
    assert eng.flush(30)
    fps = eng.config.frames_per_slot
    return stamps[fps - 1 :: fps]


@pytest.mark.parametrize("frames_per_slot", [2, 1])
def test_answers_carry_evidence_from_the_frames_fed(engine, frames_per_slot):
    eng = engine(frames_per_slot=frames_per_slot)
    stamps = feed(eng, 12)
    answer = eng.ask(Q, max_new_tokens=6, timeout=60)
    assert 1 <= len(answer.evidence) <= 3
    shares = [item.share for item in answer.evidence]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-6
    assert 0 < answer.memory_attention < 1 and answer.evidence_s > 0
    snap = eng.snapshot()
    for item in answer.evidence:
        assert item.stamp in stamps and item.slot == stamps.index(item.stamp)  # a slot the engine got
        assert item.kind in (DETAIL, CONTEXT)
        if item.kind == DETAIL:
            assert item.slot in snap.dam_slots.tolist() and item.weight == 1
        else:
            assert item.span[0] <= item.stamp <= item.span[1] and item.weight >= 1
        assert item.image is not None and item.image.dtype == np.uint8 and max(item.image.shape[:2]) == 160


def test_engine_evidence_is_the_model_measurement(engine, lm):
    """Without the prefix cache the engine answers from answer_uncached on its newest snapshot:
    the items are exactly those of the model's attention per block on that snapshot."""
    eng = engine(prefix_cache=False, evidence_frames=5)
    feed(eng, 10)
    answer = eng.ask(Q, max_new_tokens=5, timeout=60)
    snap = eng.snapshot()
    gen = lm.answer_uncached(snap, Q, 5, eng.config.system_prompt, evidence=True)
    expected = evidence_items(gen.attention.shares(), snap, 5)
    got = [(i.kind, i.stamp, i.slot, i.span, i.weight) for i in answer.evidence]
    assert got == [(i.kind, i.stamp, i.slot, i.span, i.weight) for i in expected]
    assert [i.share for i in answer.evidence] == pytest.approx([i.share for i in expected], abs=1e-5)


def test_evidence_off(engine):
    eng = engine(evidence_frames=0, thumbnail_side=0)
    feed(eng, 6)
    answer = eng.ask(Q, max_new_tokens=3, timeout=60)
    assert answer.evidence == () and answer.memory_attention == 0.0
    assert eng.thumbnail_bytes == 0


def test_thumbnails_stay_bounded_by_the_bank(engine):
    eng = engine(thumbnail_side=64)
    feed(eng, 4 * MEMORY.bank_capacity)
    kept = eng.snapshot().bank_slots.tolist()
    assert len(kept) == MEMORY.bank_capacity
    assert eng.thumbnail_bytes == MEMORY.bank_capacity * 32 * 64 * 3  # 112x224 -> 32x64
    eng.reset()
    assert eng.thumbnail_bytes == 0


def test_memory_view_shows_the_detail_frames(engine):
    eng = engine()
    stamps = feed(eng, 9)
    view = eng.memory_view(columns=2, tile_width=64)
    snap = eng.snapshot()
    assert sorted(t.slot for t in view.tiles) == sorted(snap.dam_slots.tolist())
    for tile in view.tiles:
        assert tile.stamp == stamps[tile.slot]
        x, y, w, h = tile.box
        assert not np.all(view.image[y + h // 2, x + w // 2] == MISSING)  # its thumbnail is drawn


class Counting:
    """A VideoLM whose generated tokens are counted as the model produces them."""

    def __init__(self, lm):
        self._lm, self.tokens = lm, 0

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def answer(self, prefix, question, max_new_tokens, on_token=None, **kw):
        def count(piece):
            self.tokens += 1
            on_token(piece)

        return self._lm.answer(prefix, question, max_new_tokens, on_token=count, **kw)


def test_cancel_stops_generation_at_the_next_token(engine, lm):
    model = Counting(lm)
    eng = engine(model, max_new_tokens_limit=1024)
    feed(eng, 6)
    cancel, pieces = threading.Event(), []

    def on_token(piece):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    with pytest.raises(AnswerCancelled) as err:
        eng.ask(
            "Describe everything in detail.",
            max_new_tokens=1024,
            timeout=60,
            on_token=on_token,
            cancel=cancel,
        )
    partial = err.value.partial  # issue 24 item 17: what it generated, from which memory
    assert (partial.text, partial.num_tokens) == ("".join(pieces), 3)
    assert partial.frames_seen == eng.stats().frames_seen > 0 and partial.last_stamp == eng.stamp_of(
        eng.snapshot().last_stamp
    )
    answer = eng.ask(Q, max_new_tokens=4, timeout=60)  # served: the worker is free again
    assert answer.num_tokens >= 1
    cancelled_tokens = model.tokens - answer.num_tokens
    assert len(pieces) == 3 and cancelled_tokens <= 4  # the 4th token found the request cancelled
    stats = eng.stats()
    assert stats.questions_failed == 0 and stats.errors == 0


def test_cancel_before_generation_starts(engine):
    eng = engine()
    feed(eng, 4)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AnswerCancelled) as err:
        eng.ask(Q, timeout=60, cancel=cancel)
    assert err.value.partial is None  # it had not started
    assert eng.ask(Q, max_new_tokens=2, timeout=60).num_tokens >= 1
