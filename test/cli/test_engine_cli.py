"""The video CLI (python -m fvs_ros.cli.video) on a synthesized video and a tiny random checkpoint."""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import pytest

from fvs_ros.cli import video as video_cli
from fvs_ros.cli.video import main, parse_question
from fvs_ros.engine import StreamEngine
from fvs_ros.model.tiny import write_tiny_checkpoint

FPS, SECONDS = 10, 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 4 s, 10 fps, 160x120 video whose colour changes every second."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (160, 120))
    assert writer.isOpened()
    for i in range(FPS * SECONDS):
        writer.write(np.full((120, 160, 3), 60 * (i // FPS), np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize(
    "layout, seen, last",
    [
        ([], [0, 2, 4], [None, 1.0, 3.0]),  # default: slots of two frames; a half slot is not seen yet
        (["--frames-per-slot", "1"], [1, 3, 4], [0.0, 2.0, 3.0]),
    ],
    ids=["two_frame_slots", "one_frame_slots"],
)
def test_questions_at_stream_times_see_the_video_up_to_then(ckpt, video, capsys, layout, seen, last):
    rc = main(
        [
            str(video),
            "--model",
            str(ckpt),
            "--ask",
            "2.05:What is here?",
            "--ask",
            "0.5:And now?",
            "--ask",
            "99:At the end?",
            "--max-new-tokens",
            "3",
            "--json",
            *layout,
        ]
    )
    out = capsys.readouterr()
    answers = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 0 and [a["t"] for a in answers] == [0.5, 2.05, 99]
    assert [a["frames_seen"] for a in answers] == seen  # 1 frame/s into memory: stamps 0, 1, 2, 3
    assert [a["last_stamp"] for a in answers] == last and all(a["error"] is None for a in answers)
    fps = 1 if layout else 2
    assert {a["frames_per_slot"] for a in answers} == {fps}
    lines = out.err.splitlines()
    assert lines[0].startswith("memory budget on cpu: weights") and lines[1].startswith("checked against")
    assert lines[2].startswith(f"memory: slots of {fps} frame(s)")
    stats = json.loads(out.err.splitlines()[-1])["stats"]
    assert (stats["frames_in"], stats["frames_into_memory"], stats["errors"]) == (40, 4, 0)


def test_text_output_and_realtime_pacing(ckpt, video, capsys, monkeypatch):
    """--realtime feeds each frame no earlier than its video time after the first (whatever the
    machine's speed: pacing only ever waits) and asks the question once the stream reached it."""
    fed, asked, started = [], [], []
    add_frame, ask, run = StreamEngine.add_frame, StreamEngine.ask, video_cli.run

    def timed_run(*args):
        started.append(time.monotonic())  # before run() reads the clock it paces against
        return run(*args)

    def timed_add_frame(self, frame, stamp):
        fed.append((time.monotonic(), stamp))
        return add_frame(self, frame, stamp)

    def timed_ask(self, question, *args, **kwargs):
        asked.append((time.monotonic(), question))
        return ask(self, question, *args, **kwargs)

    monkeypatch.setattr(StreamEngine, "add_frame", timed_add_frame)
    monkeypatch.setattr(StreamEngine, "ask", timed_ask)
    monkeypatch.setattr(video_cli, "run", timed_run)
    rc = main(
        [
            str(video),
            "--model",
            str(ckpt),
            "--ask",
            "1.5:What colour?",
            "--realtime",
            "--end",
            "2",
            "--sample-fps",
            "0",
            "--max-new-tokens",
            "2",
            "--summary",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "Q: What colour?" in out and "Q: (summary)" in out and "frames_seen=" in out
    assert "frames_per_slot=2" in out
    (t0,), stamps = started, [stamp for _, stamp in fed]
    assert stamps == [i / FPS for i in range(2 * FPS + 1)]  # --end 2: the frames stamped 0 to 2 s
    assert all(t - t0 >= stamp for t, stamp in fed), [(t - t0, stamp) for t, stamp in fed]
    t_question = next(t for t, q in asked if q == "What colour?")
    assert t_question - t0 >= 1.5  # asked once the stream reached its time, 1.5 s


def test_bad_arguments_are_reported(ckpt, video, tmp_path, capsys):
    for bad in ("no time", "1.5:", "x:question"):
        with pytest.raises(argparse.ArgumentTypeError, match="SECONDS:QUESTION"):
            parse_question(bad)
    assert parse_question(" 3 : What? ") == (3.0, "What?")
    assert main([str(video), "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot open video"):
        main([str(tmp_path / "missing.mp4"), "--model", str(ckpt)])


def test_weights_and_memory_budget_options(ckpt, video, capsys):
    """--weights int8 quantizes at load (and says so); a --max-gpu-memory below the budget refuses
    before loading, with the sizes, and exits 2."""
    assert main([str(video), "--model", str(ckpt), "--end", "1", "--weights", "int8"]) == 0
    err = capsys.readouterr().err
    assert "(int8, float32)" in err and "linear layers quantized in" in err
    assert main([str(video), "--model", str(ckpt), "--max-gpu-memory", "0.0001"]) == 2
    err = capsys.readouterr().err
    assert "error: this configuration needs about weights" in err and "max_gpu_memory 0.0001 GiB" in err
