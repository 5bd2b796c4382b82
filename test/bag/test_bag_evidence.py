"""The bag evaluation report shows each answer's evidence frames and the memory at the end
(offline mode, tiny random model, the synthetic red / green / blue scenes)."""

import json

import cv2
import numpy as np
import pytest

from fvs_ros.bag import evaluate
from fvs_ros.bag.convert import DEFAULT_START_STAMP
from fvs_ros.bag.synthetic import SCENES, scene_questions, write_scene_bag


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from fvs_ros.model.tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("evidence")
    model = write_tiny_checkpoint(d / "ckpt", "flash_vstream", seed=0)
    frames = write_scene_bag(d / "scenes.mcap", fps=5.0, scene_s=2.0)
    (d / "q.jsonl").write_text("\n".join(json.dumps(q) for q in scene_questions(2.0)) + "\n")
    out = d / "out"
    args = [str(d / "scenes.mcap"), str(d / "q.jsonl"), "--mode", "offline", "--model", str(model)]
    args += ["--out", str(out), "--memory-fps", "2", "--max-new-tokens", "6", "--device", "cpu"]
    assert evaluate.main(args) == 0
    return out, json.loads((out / "report.json").read_text()), frames


def test_report_lists_evidence_frames_of_the_bag(report):
    out, data, frames = report
    stamps = {round(DEFAULT_START_STAMP + t, 6): scene for t, scene, _ in frames}
    answered = [r for r in data["questions"] if r["status"] == "answered"]
    assert answered and all(1 <= len(r["evidence"]) <= 3 for r in answered)
    for r in answered:
        for e in r["evidence"]:
            assert round(e["stamp"], 6) in stamps  # a frame of the bag
            assert e["stream_s"] == pytest.approx(e["stamp"] - DEFAULT_START_STAMP)
            assert e["stream_s"] <= r["time"] + 1e-6  # nothing from after the question
            rgb = cv2.cvtColor(cv2.imread(str(out / e["image"])), cv2.COLOR_BGR2RGB)
            background = np.median(rgb.reshape(-1, 3), axis=0)  # the scene's colour dominates
            assert np.abs(background - SCENES[stamps[round(e["stamp"], 6)]][1]).max() < 20
    assert "evidence_jpeg" not in json.dumps(data)


def test_markdown_shows_thumbnails_and_the_memory_view(report):
    out, data, _ = report
    md = (out / "report.md").read_text()
    assert "## Evidence" in md and "## Memory at the end of the replay" in md
    for r in data["questions"]:
        for e in r.get("evidence", []):
            assert f"]({e['image']})" in md
    view = cv2.imread(str(out / data["files"]["memory_view"]))
    assert view is not None and view.shape[0] > 100 and f"]({data['files']['memory_view']})" in md
