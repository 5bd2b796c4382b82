"""Command-line tools: `fvs_ask`, `fvs_watch` (ROS clients of the node), the video CLI (the
engine over a video file, no ROS) and `fvs_video_source` (a camera stand-in)."""
