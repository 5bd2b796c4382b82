"""Bag tools without a model or DDS: conversion (read back independently), question files, scoring, report.

Independent readers: `mcap` + `mcap-ros2-support` for .mcap files, and sqlite3 + rclpy
deserialization for .db3 bags; neither goes through rosbags, which writes the bags.
"""

import json
import sqlite3
import sys
import textwrap

import cv2
import numpy as np
import pytest

from fvs_ros.bag import convert as convert_mod
from fvs_ros.bag import evaluate
from fvs_ros.bag.bagio import BagError, ImageBag, ImageBagWriter
from fvs_ros.bag.questions import QuestionFileError, load_questions, parse_time
from fvs_ros.bag.report import build_report, write_report
from fvs_ros.bag.scoring import extract_choice, normalize, score_answer
from fvs_ros.bag.synthetic import scene_frames, write_scene_bag

START = convert_mod.DEFAULT_START_STAMP


# ----------------------------------------------------------------------------- helpers


def read_mcap_independently(path):
    """(header stamp s, log ns, message) via mcap_ros2 (no rosbags involved)."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        return [
            (m.header.stamp.sec + m.header.stamp.nanosec * 1e-9, message.log_time, m)
            for _, _, message, m in reader.iter_decoded_messages(log_time_order=True)
        ]


def read_db3_independently(path, msg_class):
    """Messages of a sqlite3 bag via the sqlite3 module + rclpy deserialization (no rosbags involved)."""
    from rclpy.serialization import deserialize_message

    con = sqlite3.connect(str(path))
    try:
        rows = con.execute(
            "SELECT m.timestamp, m.data FROM messages m JOIN topics t ON m.topic_id = t.id "
            "ORDER BY m.timestamp"
        ).fetchall()
    finally:
        con.close()
    return [(ts, deserialize_message(bytes(data), msg_class)) for ts, data in rows]


def raw_pixels(msg):
    assert msg.encoding == "rgb8"
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)


def decode_compressed(msg):
    return cv2.cvtColor(
        cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )


def write_video(path, frames, fps):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def decoded_video(path):
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


# ----------------------------------------------------------------------------- conversion


def test_convert_video_raw_read_back_by_mcap_ros2(tmp_path):
    frames = [f for _, _, f in scene_frames(fps=10, scene_s=1.0)]  # 30 frames, 10 fps, 3 s
    video = tmp_path / "scenes.avi"
    write_video(video, frames, 10.0)
    source = decoded_video(video)  # what OpenCV decodes is what the converter sees
    assert len(source) == 30
    out = tmp_path / "scenes.mcap"
    assert convert_mod.main([str(video), str(out), "--fps", "2"]) == 0
    assert out.is_file()  # one self-contained file, no metadata.yaml needed

    msgs = read_mcap_independently(out)
    # 2 fps from 10 fps: the source frames nearest to 0, 0.5, 1.0, ... -> indices 0, 5, 10, ...
    assert len(msgs) == 6
    for k, (stamp, log_ns, msg) in enumerate(msgs):
        assert stamp == pytest.approx(START + k * 0.5, abs=1e-6)
        assert log_ns == msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        assert msg.header.frame_id == "camera"
        assert np.array_equal(raw_pixels(msg), source[5 * k])
    with ImageBag(out) as bag:  # our reader agrees with the independent one
        assert bag.info.topic == "/camera/image_raw" and bag.info.count == 6
        for f, (stamp, _, msg) in zip(bag.frames(), msgs, strict=True):
            assert f.stamp == pytest.approx(stamp, abs=1e-9)
            assert np.array_equal(bag.decode(f), raw_pixels(msg))


def test_convert_folder_png_to_sqlite3_read_back_by_rclpy(tmp_path):
    from sensor_msgs.msg import CompressedImage

    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = [f for _, _, f in scene_frames(fps=2, scene_s=1.0)]  # 6 frames
    for i, f in enumerate(frames):  # natural order: img2 before img10
        cv2.imwrite(str(folder / f"img{i * 4}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out = tmp_path / "bagdir"
    assert (
        convert_mod.main([str(folder), str(out), "--fps", "4", "--compressed", "png", "--storage", "sqlite3"])
        == 0
    )
    assert (out / "metadata.yaml").is_file()
    db3 = next(out.glob("*.db3"))
    msgs = read_db3_independently(db3, CompressedImage)
    assert len(msgs) == len(frames)
    for k, (ts, msg) in enumerate(msgs):
        assert ts == pytest.approx((START + k * 0.25) * 1e9, abs=1e3)
        assert "png" in msg.format
        assert np.array_equal(decode_compressed(msg), frames[k])  # png is lossless
    with ImageBag(out) as bag:
        assert bag.info.storage == "sqlite3" and bag.info.topic == "/camera/image_raw/compressed"
        for f, (_, msg) in zip(bag.frames(), msgs, strict=True):
            assert np.array_equal(bag.decode(f), decode_compressed(msg))


def test_convert_jpeg_identical_bytes_and_close_pixels(tmp_path):
    frames = write_scene_bag(tmp_path / "src.mcap", fps=2, scene_s=1.0)  # used only for the pixels
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (_, _, f) in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out = tmp_path / "j.mcap"
    s = convert_mod.convert(folder, out, fps=2, compressed="jpeg", jpeg_quality=95)
    assert s["frames"] == len(frames) and s["msgtype"] == "sensor_msgs/msg/CompressedImage"
    msgs = read_mcap_independently(out)
    with ImageBag(out) as bag:
        ours = list(bag.frames())
        for f, (_, _, msg), (_, _, src) in zip(ours, msgs, frames, strict=True):
            assert bytes(bag.deserialize(f).data) == bytes(msg.data)
            mine, theirs = bag.decode(f), decode_compressed(msg)
            assert np.array_equal(mine, theirs)
            assert np.abs(mine.astype(int) - src).mean() < 4.0
    with pytest.raises(BagError, match="exists already"):
        convert_mod.convert(folder, out, fps=2)


def test_convert_errors(tmp_path, capsys):
    assert convert_mod.main([str(tmp_path / "missing.mp4"), str(tmp_path / "o.mcap")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_mod.main([str(empty), str(tmp_path / "o.mcap")]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "o.mcap").exists()


# ----------------------------------------------------------------------------- bag reading errors


def test_bag_without_the_topic_names_it(tmp_path, capsys):
    out = tmp_path / "b.mcap"
    write_scene_bag(out, fps=2, scene_s=0.5)
    with pytest.raises(
        BagError, match=r"no topic '/front/image'.*topics: /camera/image_raw \(sensor_msgs/msg/Image\)"
    ):
        ImageBag(out, "/front/image")
    q = tmp_path / "q.jsonl"
    q.write_text('{"time": 0, "question": "x"}\n')
    rc = evaluate.main(
        [
            str(out),
            str(q),
            "--mode",
            "offline",
            "--model",
            "unused",
            "--topic",
            "/front/image",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 2
    assert "no topic '/front/image'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_offline_without_a_loadable_model_exits_2(tmp_path, capsys):
    out = tmp_path / "b.mcap"
    write_scene_bag(out, fps=2, scene_s=0.5)
    q = tmp_path / "q.jsonl"
    q.write_text('{"time": 0, "question": "x"}\n')
    rc = evaluate.main(
        [
            str(out),
            str(q),
            "--mode",
            "offline",
            "--model",
            str(tmp_path / "no_such_ckpt"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 2
    assert "cannot load model" in capsys.readouterr().err


def test_bag_with_two_image_topics_needs_a_choice(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    from fvs_ros.bag.bagio import typestore

    path = tmp_path / "two"
    ts = typestore()
    Img = ts.types["sensor_msgs/msg/Image"]
    Header, Time = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conns = [w.add_connection(t, "sensor_msgs/msg/Image", typestore=ts) for t in ("/left", "/right")]
        msg = Img(
            header=Header(stamp=Time(sec=5, nanosec=0), frame_id="c"),
            height=2,
            width=2,
            encoding="rgb8",
            is_bigendian=0,
            step=6,
            data=np.zeros(12, np.uint8),
        )
        for c in conns:
            w.write(c, 5_000_000_000, bytes(ts.serialize_cdr(msg, "sensor_msgs/msg/Image")))
    with pytest.raises(BagError, match=r"2 image topics \(/left, /right\); pick one with --topic"):
        ImageBag(path)
    with ImageBag(path, "/right") as bag:
        assert bag.info.count == 1 and bag.info.first_stamp == 5.0


def test_missing_bag():
    with pytest.raises(BagError, match="does not exist"):
        ImageBag("/nonexistent/bag.mcap")


# ----------------------------------------------------------------------------- offline runner (fake engine)


class FakeEngine:
    """Engine stand-in: records what it is given; answers with the number of frames it holds."""

    def __init__(self):
        from types import SimpleNamespace

        self.frames, self.flushed_at, self.asked = [], [], []
        self._ns = SimpleNamespace

    def add_frame(self, rgb, stamp):
        assert rgb.dtype == np.uint8 and rgb.ndim == 3
        self.frames.append(stamp)
        return True

    def flush(self, timeout=None):
        self.flushed_at.append(len(self.frames))
        return True

    def ask(self, prompt, max_new_tokens=None, timeout=None):
        self.asked.append((prompt, len(self.frames)))
        return self._ns(
            text=f"{len(self.frames)} frames",
            frames_seen=len(self.frames),
            frames_in_memory=1,
            first_stamp=self.frames[0] if self.frames else None,
            last_stamp=self.frames[-1] if self.frames else None,
            ttft_s=0.001,
            total_s=0.002,
            num_tokens=2,
            from_cache=False,
        )

    def stats(self):
        n = len(self.frames)
        return self._ns(
            frames_in=n,
            frames_into_memory=n,
            frames_skipped=0,
            frames_dropped=0,
            frames_rejected=0,
            errors=0,
            last_error=None,
        )


def test_offline_runner_asks_at_stream_time_and_catches_questions_past_the_last_frame(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    from fvs_ros.bag.bagio import typestore
    from fvs_ros.bag.offline import run_offline

    # 5 images at 0, 0.5, ..., 2.0 s and a status topic going on until 4.0 s
    path = tmp_path / "mixed"
    ts = typestore()
    frames = [f for _, _, f in scene_frames(fps=2, scene_s=1.0)][:5]
    with ImageBagWriter(tmp_path / "tmp.mcap") as w:
        msgs = [w.message(f, START + 0.5 * i) for i, f in enumerate(frames)]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        img = w.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        txt = w.add_connection("/status", "std_msgs/msg/String", typestore=ts)
        for i, m in enumerate(msgs):
            w.write(img, int((START + 0.5 * i) * 1e9), bytes(ts.serialize_cdr(m, "sensor_msgs/msg/Image")))
        for i in range(9):
            s = ts.types["std_msgs/msg/String"](data=f"status {i}")
            w.write(txt, int((START + 0.5 * i) * 1e9), bytes(ts.serialize_cdr(s, "std_msgs/msg/String")))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        "\n".join(
            json.dumps(q)
            for q in [
                {"id": "zero", "time": 0, "question": "a"},
                {"id": "mid", "time": 0.75, "question": "b"},
                {"id": "on_frame", "time": 1.5, "question": "c"},
                {"id": "gap", "time": 3.0, "question": "d"},
                {"id": "end", "time": "end", "question": "e"},
            ]
        )
        + "\n"
    )
    questions, issues = load_questions(qfile)
    with ImageBag(path) as bag:
        assert bag.info.topic == "/camera/image_raw" and bag.info.bag_end_s == pytest.approx(4.0)
        engine = FakeEngine()
        results, counters = run_offline(bag, questions, engine, batch=2)
    by = {r["id"]: r for r in results}
    assert {k: by[k].get("frames_seen") for k in by} == {
        "zero": 1,
        "mid": 2,
        "on_frame": 4,
        "gap": None,
        "end": 5,
    }
    assert by["gap"]["status"] == "skipped"
    assert (
        "q.jsonl:4: time 3.000 s is beyond the end of the bag's image stream (the last frame is at 2.000 s)"
        in by["gap"]["error"]
    )
    assert by["end"]["asked_stream_s"] == pytest.approx(2.0)
    assert engine.frames == pytest.approx([START + 0.5 * i for i in range(5)])  # header stamps, in order
    assert 2 in engine.flushed_at and 4 in engine.flushed_at  # drained every 2 queued frames
    assert counters["in_bag"] == 5 and counters["used"] == 5 and counters["last_frame_stream_s"] == 2.0


# ----------------------------------------------------------------------------- question files


def test_jsonl_malformed_lines_are_named_and_the_rest_kept(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(
        textwrap.dedent("""\
        # comment line
        {"id": "a", "time": 1.5, "question": "Colour?", "choices": ["red", "green"], "answer": "B"}
        {"id": "b", "time": "0:02.5", "question": "How many?", "answer": "three"}
        {"id": "c", "time": 3, "question": "What happened?"
        {"id": "d", "time": -1, "question": "Negative?"}
        {"id": "e", "question": "No time?"}
        {"id": "f", "time": 2, "question": "Bad option", "choices": ["x", "y"], "answer": "C"}

        {"id": "a", "time": 4, "question": "Duplicate id"}
        {"id": "g", "time": "end", "question": "All?", "answer": "Seven words make this answer open ended."}
        ["not", "an", "object"]
        {"time": 0.5, "question": "No id", "choices": {"A": "left", "B": "right"}, "answer": 1}
        """)
    )
    qs, issues = load_questions(f)
    assert [q.id for q in qs] == ["L12", "a", "b", "g"]  # sorted by time, 'end' last
    assert [i.line for i in issues] == [4, 5, 6, 7, 9, 11]
    msgs = {i.line: i.message for i in issues}
    assert "malformed JSON" in msgs[4] and "time must be >= 0" in msgs[5] and "missing 'time'" in msgs[6]
    assert "not one of the options A-B" in msgs[7] and "duplicate id 'a'" in msgs[9]
    assert all(str(i).startswith(f"{f}:{i.line}: ") for i in issues)
    by = {q.id: q for q in qs}
    assert by["a"].kind == "mc" and by["a"].reference_letter == "B" and by["a"].time == 1.5
    assert by["a"].prompt().splitlines()[1:3] == ["A. red", "B. green"]
    assert by["b"].kind == "short" and by["b"].time == 2.5
    assert by["g"].kind == "open" and by["g"].at_end and by["g"].time is None
    assert by["L12"].reference_letter == "B" and by["L12"].choices == ["left", "right"]


def test_yaml_and_json_keep_line_numbers(tmp_path):
    y = tmp_path / "q.yaml"
    y.write_text(
        textwrap.dedent("""\
        questions:
          - id: first
            time: 1
            question: What is on the table?
            answer: [cup, mug]
          - id: second
            time: "1:00:00.5"
            question: ""
          - time: 2
            question: Which side?
            options: ["(A) left", "(B) right"]
            answer: right
        """)
    )
    qs, issues = load_questions(y)
    assert [(q.id, q.line) for q in qs] == [("first", 2), ("L9", 9)]
    assert qs[0].kind == "short" and qs[0].reference == ["cup", "mug"]
    assert qs[1].choices == ["left", "right"] and qs[1].reference_letter == "B"
    assert [(i.line, "empty 'question'" in i.message) for i in issues] == [(6, True)]

    j = tmp_path / "q.json"
    j.write_text('[\n  {"time": 1, "question": "ok"},\n\n  {"time": "soon", "question": "bad time"}\n]\n')
    qs, issues = load_questions(j)
    assert [q.line for q in qs] == [2] and [i.line for i in issues] == [4]
    assert "cannot read time 'soon'" in issues[0].message

    bad = tmp_path / "bad.yaml"
    bad.write_text("questions:\n  - time: 1\n    question: [unclosed\n")
    with pytest.raises(QuestionFileError, match=r"bad.yaml:\d+: not valid YAML"):
        load_questions(bad)
    with pytest.raises(QuestionFileError, match="unknown question file type"):
        load_questions(tmp_path / "q.txt") if (tmp_path / "q.txt").write_text("x") else None


def test_parse_time():
    assert parse_time(3) == (3.0, False)
    assert parse_time("1:02.5") == (62.5, False)
    assert parse_time("01:00:02") == (3602.0, False)
    assert parse_time("END") == (None, True)
    for bad in ("1:75", "x", -2, None, True, "nan"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_vstream_qa_files(tmp_path):
    """VStream-QA (IVGSZ/VStream-QA test_qa_*.json): video_id, question, answer, id (+ answer_type,
    duration)."""
    qa = tmp_path / "test_qa_ego4d.json"
    qa.write_text(
        json.dumps(
            [
                {
                    "video_id": "000246",
                    "question": "what did I put in the sink",
                    "id": "000246_0",
                    "answer": "a red bowl",
                    "answer_type": "object",
                    "duration": 840,
                },
                {
                    "video_id": "000246",
                    "question": "where was the knife",
                    "id": "000246_1",
                    "answer": "It was lying on the wooden cutting board next to the sink",
                    "duration": 840,
                },
                {"video_id": "000300", "question": "other clip", "id": "000300_0", "answer": "yes"},
            ],
            indent=1,
        )
    )
    with pytest.raises(
        QuestionFileError, match="questions on 2 videos; choose the bag's video with --video-id"
    ):
        load_questions(qa)
    qs, issues = load_questions(qa, video_id="000246")
    assert not issues and [q.id for q in qs] == ["000246_0", "000246_1"]
    assert all(q.at_end for q in qs)  # a pre-cut RVS clip ends where its questions are asked
    assert qs[0].kind == "short" and qs[1].kind == "open" and qs[0].meta["answer_type"] == "object"
    assert qs[0].line == 2

    clips = tmp_path / "rvs_ego.json"
    clips.write_text(
        json.dumps(
            [
                {"video_id": "000246", "original_video": "e582", "start_time": 2430, "end_time": 3270},
                {"video_id": "000300", "original_video": "e582", "start_time": 3300, "end_time": 3400},
                {"video_id": "000400", "original_video": "other", "start_time": 0, "end_time": 10},
            ]
        )
    )
    qs, issues = load_questions(qa, video_id="e582", clips=clips, time_offset=2400)
    assert not issues
    assert [(q.id, q.time) for q in qs] == [("000246_0", 870.0), ("000246_1", 870.0), ("000300_0", 1000.0)]


# ----------------------------------------------------------------------------- scoring


def _q(**kw):
    from fvs_ros.bag.questions import question_from_dict

    return question_from_dict({"time": 1, "question": "q", **kw}, source="t", line=1, default_id="x")


@pytest.mark.parametrize(
    "answer,letter",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. green", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("green", "B"),
        ("It is dark red.", "C"),
        ("A red one", "A"),
        ("I see red.", "A"),
        ("purple", None),
        ("red or green", None),
    ],
)
def test_extract_choice(answer, letter):
    assert extract_choice(answer, ["red", "green", "dark red"])[0] == letter


def test_scoring_kinds(tmp_path):
    mc = _q(choices=["red", "green", "blue"], answer="green")
    assert score_answer(mc, "B").correct is True and score_answer(mc, "B").method == "choice-letter"
    s = score_answer(mc, "It looks blue to me")
    assert (s.correct, s.score, s.predicted, s.method) == (False, 0.0, "C", "choice-text")
    assert score_answer(mc, "no idea").method == "choice-none"

    short = _q(answer="3")
    assert normalize("The THREE cups!") == "3 cups"
    s = score_answer(short, "three")
    assert (s.exact, s.contains, s.correct) == (True, True, True)
    s = score_answer(short, "There are 3 cups.")
    assert (s.exact, s.contains, s.correct, s.method) == (False, True, True, "contains")
    s = score_answer(short, "13")
    assert (s.exact, s.contains, s.correct) == (False, False, False)
    alts = _q(answer=["cockatoo", "parrot"])
    assert score_answer(alts, "a white parrot").correct is True

    open_q = _q(answer="The girl jumps on the bed while the boy crawls to the left and stands up.")
    assert open_q.kind == "open"
    s = score_answer(open_q, "kids jumping")
    assert s.score is None and s.method == "unscored"
    assert score_answer(_q(), "anything").method == "unscored"  # no reference

    script = tmp_path / "judge.py"
    script.write_text(
        "import json, sys\nd = json.load(sys.stdin)\n"
        "print(json.dumps({'score': 0.8 if 'jump' in d['answer'] else 0.1}))\n"
    )
    cmd = f"{sys.executable} {script}"
    s = score_answer(open_q, "kids jumping", cmd)
    assert (s.score, s.correct, s.method) == (0.8, True, "command")
    assert score_answer(open_q, "kids sleeping", cmd).correct is False
    assert score_answer(short, "three", cmd).method == "exact"  # short answers keep their own rule ...
    assert score_answer(short, "three", cmd, cmd_all=True).method == "command"  # ... unless asked
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    s = score_answer(open_q, "x", f"{sys.executable} {bad}")
    assert s.score is None and "exited with 3: boom" in s.detail
    plain = tmp_path / "plain.py"
    plain.write_text("print(0.25)\n")
    s = score_answer(open_q, "x", f"{sys.executable} {plain}")
    assert (s.score, s.correct) == (0.25, False)


# ----------------------------------------------------------------------------- report


def test_report_files_agree(tmp_path):
    rows = [
        {
            "id": "a",
            "type": "mc",
            "time": 1.0,
            "status": "answered",
            "answer": "B",
            "score": 1.0,
            "correct": True,
            "ttft_s": 0.010,
            "total_s": 0.050,
            "frames_seen": 2,
            "reference": "green",
            "reference_letter": "B",
        },
        {
            "id": "b",
            "type": "short",
            "time": 2.0,
            "status": "answered",
            "answer": "two",
            "score": 0.0,
            "correct": False,
            "exact": False,
            "contains": False,
            "ttft_s": 0.020,
            "total_s": 0.070,
            "frames_seen": 3,
        },
        {
            "id": "c",
            "type": "open",
            "time": 3.0,
            "status": "answered",
            "answer": "stuff",
            "score": None,
            "correct": None,
            "ttft_s": 0.030,
            "total_s": 0.090,
            "frames_seen": 4,
        },
        {"id": "d", "type": "open", "time": 3.5, "status": "failed", "error": "timeout"},
        {"id": "e", "type": "open", "time": 99.0, "status": "skipped", "error": "beyond the end"},
    ]
    issues = [{"source": "q.jsonl", "line": 7, "id": None, "message": "malformed JSON"}]
    frames = {"in_bag": 30, "sent": 30, "received": 30, "used": 6, "dropped": 0}
    report = build_report(
        mode="offline",
        bag={"path": "x.mcap", "topic": "/cam", "count": 30, "duration_s": 5.8},
        questions_file="q.jsonl",
        config={"model": "tiny"},
        rows=rows,
        issues=issues,
        frames=frames,
    )
    paths = write_report(report, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    s = loaded["summary"]
    assert (s["questions"], s["answered"], s["failed"], s["skipped"], s["scored"], s["correct"]) == (
        6,
        3,
        1,
        2,
        2,
        1,
    )
    assert s["accuracy"] == 0.5
    assert s["latency_s"]["total"]["p50"] == pytest.approx(0.070) and s["latency_s"]["total"]["max"] == 0.090
    md = paths["markdown"].read_text()
    assert "| 6 | 3 | 1 | 2 | 2 | 1 | 50.0% |" in md
    assert "| total | 3 | 70.0 | 88.0 | 90.0 | 70.0 |" in md
    assert "`q.jsonl:7`: malformed JSON" in md
    assert md.count("\n| ") - md.count("\n| ---") >= len(rows)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loaded["plot_points"] == 4 and loaded["files"]["plot"] == paths["plot"].name
