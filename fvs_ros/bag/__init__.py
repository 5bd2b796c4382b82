"""Rosbag2 tools for fvs_ros: video -> bag conversion, bag replay evaluation, question files.

Commands (see docs/evaluation.md):

    python -m fvs_ros.bag.convert VIDEO_OR_DIR OUT.mcap --fps 2 [--compressed]
    python -m fvs_ros.bag.evaluate BAG QUESTIONS --mode offline --model CKPT --out DIR
    python -m fvs_ros.bag.evaluate BAG QUESTIONS --mode live --out DIR   # node already running
    python -m fvs_ros.bag.play BAG --clock                               # like `ros2 bag play --clock`

Modules:
- `bagio`: read image topics from rosbag2 bags (mcap or sqlite3, directory or single file) and
  write image bags; built on `rosbags` (no bag format code here).
- `images`: sensor_msgs/Image and CompressedImage <-> RGB uint8 arrays.
- `questions`: question files (YAML, JSON, JSONL, VStream-QA) with per-line errors.
- `scoring`: multiple-choice, exact / contains, external scoring command.
- `report`: JSON + Markdown + PNG report.
- `offline`: feeds the engine directly (no ROS). `live`: replays into a running node over DDS.

Nothing here imports model internals; offline mode uses `fvs_ros.engine` and `fvs_ros.model.load_model`.
"""
