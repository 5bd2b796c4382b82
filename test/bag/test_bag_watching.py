"""Conditions in question files and their event scoring (fvs_ros/bag/watching.py). No ROS, no model."""

import json

import pytest

from fvs_ros.bag.questions import load_questions
from fvs_ros.bag.watching import WatchSpec, load_watches, score_watch, summarize_watch


def test_question_file_holds_questions_and_conditions(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        {"id": "colour", "time": 1, "question": "What colour is the ball?"},
        {
            "id": "door",
            "watch": "a person is at the door",
            "threshold": 0.6,
            "true_during": [[2, 5.5], ["0:09", "end"]],
        },
        {"watch": "smoke is visible"},
        {"id": "bad1", "watch": "", "true_during": []},
        {"id": "bad2", "watch": "x", "threshold": 1.5},
        {"id": "bad3", "watch": "x", "true_during": [[5, 3]]},
        {"id": "bad4", "watch": "x", "true_during": [[1, 5], [4, 8]]},
        {"id": "bad5", "watch": "x", "true_during": [["end", 3]]},
        {"id": "door", "watch": "again"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    questions, q_issues = load_questions(path)
    assert [q.id for q in questions] == ["colour"] and not q_issues  # conditions are not questions
    specs, issues = load_watches(path)
    assert [(s.id, s.condition, s.threshold, s.intervals) for s in specs] == [
        ("door", "a person is at the door", 0.6, [(2.0, 5.5), (9.0, None)]),
        ("W3", "smoke is visible", 0.5, []),
    ]
    messages = {i.id: i.message for i in issues}
    assert "condition is empty" in messages["bad1"]
    assert "threshold must be in [0, 1]" in messages["bad2"]
    assert "ends before it starts" in messages["bad3"]
    assert "overlap" in messages["bad4"]
    assert "cannot start at 'end'" in messages["bad5"]
    assert "duplicate id 'door'" in messages["door"]


def test_yaml_conditions(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("- id: cup\n  watch: a cup is on the table\n  true_during: [3, 7]\n")
    (spec,), issues = load_watches(path)
    assert spec.intervals == [(3.0, 7.0)] and spec.line == 1 and not issues


def test_scoring():
    spec = WatchSpec("door", "a person is at the door", 0.5, [(2.0, 5.0), (10.0, None)])
    events = [
        (1.0, True),  # before the first interval: false rise
        (1.5, False),  # its fall, outside any interval end window... a false fall
        (3.0, True),  # detects [2, 5] after 1 s
        (4.0, False),  # falls inside the interval: false fall
        (4.5, True),  # rises again inside: false rise
        (6.0, False),  # clears [2, 5] 1 s after its end
        (13.0, True),  # detects [10, end] after 3 s
    ]
    s = score_watch(spec, events, stream_end=20.0, tolerance_s=2.0)
    assert s["detection_delay_s"] == [1.0, 3.0] and s["detected"] == 2 and s["missed"] == 0
    assert s["clearing_delay_s"] == [1.0] and s["cleared"] == 1 and s["ends"] == 1
    assert s["false_rises"] == 2 and s["false_falls"] == 2
    assert s["mean_detection_delay_s"] == 2.0 and s["max_detection_delay_s"] == 3.0


def test_scoring_misses_and_tolerance():
    spec = WatchSpec("smoke", "smoke is visible", 0.5, [(2.0, 4.0), (8.0, 9.0)])
    # the first interval is detected late, within tolerance; the second never; nothing clears
    s = score_watch(spec, [(5.5, True)], stream_end=12.0, tolerance_s=2.0)
    assert s["detection_delay_s"] == [3.5, None] and s["missed"] == 1
    assert s["clearing_delay_s"] == [None, None] and s["cleared"] == 0
    # beyond the tolerance the rise is a false one
    s = score_watch(spec, [(6.5, True)], stream_end=12.0, tolerance_s=2.0)
    assert s["detected"] == 0 and s["false_rises"] == 1
    never = WatchSpec("never", "a unicorn", 0.5, [])
    s = score_watch(never, [(1.0, True), (2.0, False)], stream_end=5.0)
    assert s["false_rises"] == 1 and s["false_falls"] == 1 and s["intervals"] == 0


def test_summary():
    a = score_watch(WatchSpec("a", "a", 0.5, [(1.0, None)]), [(2.0, True)], 5.0)
    b = score_watch(WatchSpec("b", "b", 0.5, [(1.0, 2.0)]), [(0.5, True)], 5.0)
    total = summarize_watch([a, b])
    assert total["conditions"] == 2 and total["detected"] == 1 and total["missed"] == 1
    assert total["false_rises"] == 1 and total["p50_detection_delay_s"] == 1.0


@pytest.mark.parametrize("true", ["3", [[1, 2, 3]], {"from": 1}])
def test_bad_interval_shapes(tmp_path, true):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "x", "watch": "x", "true_during": true}) + "\n")
    specs, issues = load_watches(path)
    assert not specs and "list of [from, until]" in issues[0].message


def test_offline_evaluation_scores_watched_conditions(tmp_path):
    """evaluate --mode offline with conditions: every memory update evaluated, its events scored."""
    from support.watch_scene import expected_events, hysteresis_case

    from fvs_ros.bag import evaluate
    from fvs_ros.bag.synthetic import write_scene_bag
    from fvs_ros.model.tiny import write_tiny_checkpoint

    bag = tmp_path / "scenes.mcap"
    write_scene_bag(bag, fps=5.0, scene_s=2.0)  # red 0-2 s, green 2-4 s, blue 4-6 s; 30 frames
    questions = tmp_path / "q.jsonl"
    entries = [
        {"id": "colour", "time": 1.0, "question": "What colour is the background?"},
        {"id": "square", "watch": "a white square is visible", "threshold": 0.0, "true_during": [[0, 2]]},
        {"id": "green", "watch": "the background is green", "threshold": 1.0, "true_during": [[2, 4]]},
    ]
    questions.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    model = write_tiny_checkpoint(tmp_path / "tiny", "flash_vstream")
    out = tmp_path / "report"
    args = [str(bag), str(questions), "--mode", "offline", "--model", str(model), "--out", str(out)]
    rc = evaluate.main(args + ["--memory-fps", "0", "--max-new-tokens", "4", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    watch = report["watch"]
    assert watch["evaluations"] == 15  # 30 frames in two-frame slots, one memory update each
    slot_ends = [pytest.approx(0.2 + 0.4 * i) for i in range(15)]  # stream time of each slot's last frame
    square, green = watch["conditions"]
    for c in (square, green):
        assert [t for t, _ in c["timeline"]] == slot_ends
        probabilities = [p for _, p in c["timeline"]]
        assert all(0.0 < p < 1.0 for p in probabilities)
        want = [
            (c["timeline"][i][0], rising)
            for i, rising in expected_events(probabilities, c["threshold"], watch["hysteresis"])
        ]
        assert [(e["time"], e["rising"]) for e in c["events"]] == want
    # threshold 0: true from the first memory on, never false again; threshold 1: never true
    assert square["detection_delay_s"] == [pytest.approx(0.2)] and square["clearing_delay_s"] == [None]
    assert green["missed"] == 1 and green["events"] == []
    assert watch["summary"]["detected"] == 1 and watch["summary"]["missed"] == 1
    # the rise's evidence: the one slot in that memory (evidence_frames 3, one block per kind)
    (rise,) = square["events"]
    assert rise["evidence_s"] and all(t == pytest.approx(0.2) for t in rise["evidence_s"])
    md = (out / "report.md").read_text()
    assert "## Watched conditions" in md and "| square | 0.000 | 1 | 1 | 0 | 0.20 | 0/1 | - | 0 | 0 |" in md
    assert "- square: rise at 0.20 s, evidence frames at 0.20" in md

    # hysteresis: a threshold inside the range the probabilities took and a watch_hysteresis (from
    # --params, as the node's) for which the rule gives other events than without hysteresis
    probabilities = [p for _, p in square["timeline"]]
    threshold, hysteresis = hysteresis_case(probabilities)
    entry = {"id": "square", "watch": entries[1]["watch"], "threshold": threshold, "true_during": [[0, 2]]}
    questions.write_text(json.dumps(entry) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"fvs:\n  ros__parameters:\n    watch_hysteresis: {hysteresis}\n")
    rc = evaluate.main(
        [str(bag), str(questions), "--mode", "offline", "--model", str(model), "--out", str(tmp_path / "h")]
        + ["--memory-fps", "0", "--max-new-tokens", "4", "--device", "cpu", "--params", str(params)]
    )
    assert rc == 0
    watch = json.loads((tmp_path / "h" / "report.json").read_text())["watch"]
    (c,) = watch["conditions"]
    assert watch["hysteresis"] == pytest.approx(hysteresis)
    assert [p for _, p in c["timeline"]] == pytest.approx(probabilities)  # the same memories
    want = [(c["timeline"][i][0], r) for i, r in expected_events(probabilities, threshold, hysteresis)]
    assert [(e["time"], e["rising"]) for e in c["events"]] == want


def test_live_evaluation_scores_watched_conditions(tmp_path):
    """evaluate --mode live with conditions: added to the running node over ~/watch, its
    ~/watch_scores and ~/events recorded during the replay, scored, removed afterwards."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from support.watch_scene import expected_events

    from fvs_ros.bag.synthetic import write_scene_bag
    from fvs_ros.model.tiny import write_tiny_checkpoint

    root = Path(__file__).resolve().parents[2]
    bag = tmp_path / "scenes.mcap"
    write_scene_bag(bag, fps=5.0, scene_s=2.0)
    questions = tmp_path / "q.jsonl"
    entries = [
        {"id": "square", "watch": "a white square is visible", "threshold": 0.0, "true_during": [[0, 2]]},
        {"id": "green", "watch": "the background is green", "threshold": 1.0, "true_during": [[2, 4]]},
    ]
    questions.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    model = write_tiny_checkpoint(tmp_path / "tiny", "flash_vstream")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    params = ["model:=" + str(model), "memory_fps:=1.0", "summary_period_s:=0.0", "device:=cpu"]
    params += [
        "image_topic:=/camera/image_raw",
        "reliability:=reliable",
        "qos_depth:=10",
        "watch_hysteresis:=0.02",
    ]
    cmd = [sys.executable, "-m", "fvs_ros.ros.node", "--autostart", "--ros-args"]
    cmd += ["--params-file", str(root / "config" / "fvs.yaml")] + [a for p in params for a in ("-p", p)]
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        out = tmp_path / "live"
        run = [sys.executable, "-m", "fvs_ros.bag.evaluate", str(bag), str(questions), "--mode", "live"]
        done = subprocess.run(
            run + ["--out", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "node.log").read_text()[-3000:]
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(30)
        log.close()
    watch = json.loads((out / "report.json").read_text())["watch"]
    # memory at 1 fps in two-frame slots: frames at 0, 1, ..., 5 s -> slots ending at 1, 3, 5 s
    assert watch["evaluations"] == 3
    square, green = watch["conditions"]
    for c in (square, green):
        assert [t for t, _ in c["timeline"]] == [pytest.approx(1.0), pytest.approx(3.0), pytest.approx(5.0)]
        probabilities = [p for _, p in c["timeline"]]
        want = [(c["timeline"][i][0], r) for i, r in expected_events(probabilities, c["threshold"], 0.02)]
        assert [(e["time"], e["rising"]) for e in c["events"]] == want
    assert square["detection_delay_s"] == [pytest.approx(1.0)] and green["missed"] == 1
    (rise,) = square["events"]  # its evidence: frames of the memory it was computed on
    assert rise["evidence_s"] and all(t == pytest.approx(1.0) for t in rise["evidence_s"])
    assert "the node (watch_hysteresis)" in (out / "report.md").read_text()
    assert "stopped watching 'square'" in (tmp_path / "node.log").read_text()  # removed afterwards
