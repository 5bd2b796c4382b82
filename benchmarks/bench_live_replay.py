"""Live bag replay timing: how close to the recorded schedule are frames and questions sent?

    python benchmarks/bench_live_replay.py [--runs 3] [--fps 5] [--scene-s 2]

Starts the node (config/fvs.yaml, a tiny random model, reliable depth-10 images on
/camera/image_raw) as its own process, writes the synthetic scene bag, and runs
`python -m fvs_ros.bag.evaluate --mode live --clock 50` against it --runs times; prints, per run,
how late frames were published and questions asked against the recorded times (p50/p95/max) and
the replay's wall time. test/test_bag_eval.py asserts what replay guarantees; these are the
figures, which depend on the machine's load. Run it with its own ROS_DOMAIN_ID.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fvs_ros.bag.synthetic import scene_questions, write_scene_bag
from fvs_ros.model.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--scene-s", type=float, default=2.0)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="fvs_bench_live_") as tmp:
        tmp = Path(tmp)
        model = write_tiny_checkpoint(tmp / "tiny", "flash_vstream", seed=0)
        bag = tmp / "scenes.mcap"
        write_scene_bag(bag, fps=args.fps, scene_s=args.scene_s)
        questions = tmp / "questions.jsonl"
        questions.write_text("".join(json.dumps(q) + "\n" for q in scene_questions(args.scene_s)))
        params = ["memory_fps:=1.0", "summary_period_s:=0.0", "max_new_tokens:=8", "device:=cpu"]
        params += ["image_topic:=/camera/image_raw", "reliability:=reliable", "qos_depth:=10"]
        cmd = [sys.executable, "-m", "fvs_ros.ros.node", "--autostart", "--ros-args"]
        cmd += ["--params-file", str(ROOT / "config" / "fvs.yaml"), "-p", f"model:={model}"]
        for p in params:
            cmd += ["-p", p]
        with open(tmp / "node.log", "w") as log:
            node = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for run in range(args.runs):
                out = tmp / f"run{run}"
                done = subprocess.run(
                    [sys.executable, "-m", "fvs_ros.bag.evaluate", str(bag), str(questions), "--mode", "live"]
                    + ["--out", str(out), "--clock", "50", "--wait", "90", "--quiet"],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if not (out / "report.json").is_file():
                    sys.exit(f"evaluate failed:\n{done.stderr[-3000:]}")
                t = json.loads((out / "report.json").read_text())["summary"]["timing"]
                fl, ql = t["frames_late_s"], t["questions_late_s"]
                print(
                    f"run {run}: {fl['n']} frames late p50/p95/max "
                    f"{1e3 * fl['p50']:.1f}/{1e3 * fl['p95']:.1f}/"
                    f"{1e3 * fl['max']:.1f} ms; {ql['n']} questions late p50/max {1e3 * ql['p50']:.1f}/"
                    f"{1e3 * ql['max']:.1f} ms; replay {t['replay_wall_s']:.2f} s"
                )
        finally:
            node.terminate()
            node.wait(timeout=30)


if __name__ == "__main__":
    main()
