"""Several camera streams on one model (fvs_ros/engine/host.py), CPU, tiny random checkpoint.

The decoder of interest is the FastDecoder: it keeps one static cache and copies a prefix in when
the prefix changes, so switching between cameras must never answer one camera's question from
another's prefix."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support.engines import LONG, wait_for

from fvs_ros.engine import AnswerCancelled, EngineConfig, EngineHost, FrameError, QuestionError, StreamEngine
from fvs_ros.engine.scheduler import Priority
from fvs_ros.model import load_model
from fvs_ros.model.several_videos import prefill_videos
from fvs_ros.model.tiny import write_tiny_checkpoint

H, W = 112, 224
CONFIG = dict(sample_fps=0, max_new_tokens=8, evidence_frames=2, prefix_refresh_s=0.0)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "flash_vstream")
    return load_model(ckpt, fast_decode=True)  # the static-cache decoder, as on CUDA


def frames(seed, n=8):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), 1.0 + i) for i in range(n)]


def fed(eng, clip):
    for frame, t in clip:
        eng.add_frame(frame, t)
    assert eng.flush(LONG)
    wait_for(lambda: eng.stats().prefix_current)
    return eng


def test_streams_share_the_model_and_names_are_unique(lm, engines):
    host = EngineHost(lm)
    a = host.open_stream("front", config=EngineConfig(**CONFIG))
    engines.append(a)
    with pytest.raises(ValueError, match="already open"):
        host.open_stream("front")
    b = host.open_stream("wrist", config=EngineConfig(**CONFIG))
    engines.append(b)
    assert a.lm is b.lm is lm and set(host.streams) == {"front", "wrist"}
    with pytest.raises(ValueError, match="host's model"):
        StreamEngine(object(), host=host, name="other")
    a.start(), b.start()
    a.shutdown()
    assert set(host.streams) == {"wrist"}  # a shut-down stream's name is free again


def test_answers_per_camera_equal_one_camera_engines(lm, engines):
    """Alternating questions between two cameras of one host (each question after the other
    camera's prefix was loaded into the decoder's cache) give the answers and evidence of a
    one-camera engine fed the same frames."""
    clips = {"front": frames(1), "wrist": frames(2)}
    reference = {}
    for name, clip in clips.items():
        eng = StreamEngine(lm, config=EngineConfig(**CONFIG)).start()
        engines.append(eng)
        fed(eng, clip)
        reference[name] = eng.ask("What is on the table?")
        eng.shutdown()
    assert reference["front"].text != reference["wrist"].text  # the cameras are told apart

    host = EngineHost(lm)
    streams = {name: host.open_stream(name, config=EngineConfig(**CONFIG)).start() for name in clips}
    engines.extend(streams.values())
    for name, clip in clips.items():
        fed(streams[name], clip)
    for name in ["front", "wrist", "front", "wrist", "wrist", "front"]:
        got = streams[name].ask("What is on the table?")
        assert got.text == reference[name].text, name
        assert [e.slot for e in got.evidence] == [e.slot for e in reference[name].evidence]
        assert got.last_stamp == reference[name].last_stamp
    # every stream's state is its own
    for name, clip in clips.items():
        assert streams[name].stats().frames_into_memory == len(clip)


def test_question_about_two_cameras_then_one(lm, engines):
    """host.ask_several answers from one prompt of both memories (in the order asked), and a
    one-camera question after it is still that camera's own answer (the decoder's cache held the
    two-camera prefix in between)."""
    host = EngineHost(lm)
    clips = {"front": frames(5, 4), "wrist": frames(6, 6)}
    streams = {name: host.open_stream(name, config=EngineConfig(**CONFIG)).start() for name in clips}
    engines.extend(streams.values())
    for name, clip in clips.items():
        fed(streams[name], clip)
    alone = streams["front"].ask("What is on the table?")
    both = host.ask_several([streams["front"], streams["wrist"]], "What is on the table?")
    videos = [(name, streams[name].snapshot()) for name in ("front", "wrist")]
    steps = prefill_videos(lm, videos)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            want = lm.answer(done.value, "What is on the table?", CONFIG["max_new_tokens"])
            break
    assert both.text == want.text and both.text != alone.text
    assert both.frames_seen == 10 and both.first_stamp == 1.0 and both.last_stamp == 6.0
    assert both.evidence == () and both.memory_lag_s == 0.0
    swapped = host.ask_several([streams["wrist"], streams["front"]], "What is on the table?")
    assert swapped.frames_seen == 10
    assert streams["front"].ask("What is on the table?").text == alone.text
    with pytest.raises(QuestionError):
        host.ask_several([streams["front"]], "What is on the table?")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AnswerCancelled):
        host.ask_several([streams["front"], streams["wrist"]], "What is on the table?", cancel=cancel)
    tokens = []
    streamed = host.ask_several(
        [streams["front"], streams["wrist"]], "What is on the table?", on_token=tokens.append
    )
    assert "".join(tokens) == streamed.text == both.text


def test_one_cameras_bad_frames_and_reset_never_touch_the_other(lm, engines):
    host = EngineHost(lm)
    front, wrist = (host.open_stream(n, config=EngineConfig(**CONFIG)).start() for n in ("front", "wrist"))
    engines += [front, wrist]
    fed(front, frames(7, 4))
    before = front.ask("What is on the table?")
    for bad in (np.zeros((H, W), np.uint8), np.zeros((H, W, 3), np.float32), "frame"):
        with pytest.raises(FrameError):
            wrist.add_frame(bad, 1.0)
    fed(wrist, frames(8, 2))
    wrist.reset()
    assert (
        wrist.stats().frames_seen == 0 and wrist.stats().frames_rejected == 0
    )  # reset restarts its counters
    s = front.stats()
    assert s.frames_rejected == 0 and s.frames_into_memory == 4 and s.frames_seen == 4
    after = front.ask("What is on the table?")
    assert (after.text, after.last_stamp, after.frames_seen) == (before.text, before.last_stamp, 4)


def test_concurrent_questions_and_frames_of_two_cameras(lm, engines):
    """Two cameras fed and asked from threads at once: each answer is its own camera's (the same as
    asked alone once the memories are still), and the host's gate ends with nothing waiting."""
    host = EngineHost(lm)
    clips = {"front": frames(3), "wrist": frames(4)}
    streams = {name: host.open_stream(name, config=EngineConfig(**CONFIG)).start() for name in clips}
    engines.extend(streams.values())
    errors = []

    def run(name):
        try:
            eng = streams[name]
            for i, (frame, t) in enumerate(clips[name]):
                eng.add_frame(frame, t)
                if i % 3 == 2:
                    eng.ask("What happened?", timeout=LONG)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
    assert not errors
    alone = {}
    for name in clips:
        fed(streams[name], [])
        alone[name] = streams[name].ask("What is on the table?").text
    for name in ["wrist", "front"]:
        assert streams[name].ask("What is on the table?").text == alone[name]
    wait_for(lambda: host.gpu_jobs() == ([], []))


def test_gpu_gate_orders_waiting_jobs_by_priority(lm):
    """The gate (threads) follows the scheduler: with the decode lane held by a watch evaluation, a
    waiting watch and a waiting summary start in priority order once it is free, and a question
    starts at once beside the background work."""
    host = EngineHost(lm)
    order, release = [], threading.Event()
    held = threading.Event()

    def hold():
        with host.gpu("a", Priority.WATCH):
            held.set()
            release.wait(LONG)

    def job(name, priority):
        with host.gpu(name, priority):
            order.append(name)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(LONG)
    threads = [
        threading.Thread(target=job, args=("summary", Priority.SUMMARY)),
        threading.Thread(target=job, args=("watch", Priority.WATCH)),
    ]
    for t in threads:
        t.start()
    wait_for(lambda: len(host.gpu_jobs()[0]) == 2)
    with host.gpu("b", Priority.QUESTION):  # does not wait for the watch evaluation
        order.append("question")
    release.set()
    for t in [holder, *threads]:
        t.join(LONG)
    assert order == ["question", "watch", "summary"]
