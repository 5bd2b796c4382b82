#!/usr/bin/env bash
# The main job on a fresh machine: set up, start the fvs node on a video, ask it a question
# through its ~/ask service twice (the second answer has seen more video), print the answers
# and timings, shut everything down.
#
#   scripts/run.sh
#   VIDEO=clip.mp4 MODEL=/path/to/checkpoint QUESTION="What is on the table?" scripts/run.sh
#
# MODEL    hub id or checkpoint directory (default: the params file's model, if it is in the local
#          Hugging Face cache; otherwise a tiny random model is written and used)
# VIDEO    video file published as the camera (default: a synthetic test pattern)
# QUESTION the question (default: "What is happening in the video?")
# WATCH_S  seconds of video the node watches before each of the two questions (default: 5)
# WAIT_S   seconds to wait for the node to load the model and come up (default: 300)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
. scripts/env.sh
# A DDS domain of its own, discovery on this host only.
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 101 ))}
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export PYTHONUNBUFFERED=1
QUESTION=${QUESTION:-What is happening in the video?}
WATCH_S=${WATCH_S:-5}
WAIT_S=${WAIT_S:-300}
work=$(mktemp -d -t fvs_run.XXXXXX)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

default_model=$(python -c 'from fvs_ros.ros.params import load_defaults; print(load_defaults()["model"])')
if [ -z "${MODEL:-}" ]; then
  if python -c 'import sys; from huggingface_hub import try_to_load_from_cache as c
sys.exit(0 if isinstance(c(sys.argv[1], "config.json"), str) else 1)' "$default_model"; then
    MODEL=$default_model
  else
    MODEL=$work/tiny_model
    echo "[run] The default model, $default_model, is the 7B hub checkpoint (~16 GB)."
    echo "[run] It is not in the local Hugging Face cache and cannot be downloaded here, so this run"
    echo "[run] uses a TINY RANDOM model written to $MODEL: its answers are gibberish, the"
    echo "[run] pipeline is real. Give MODEL=<hub id or checkpoint dir> for real answers."
    python -m fvs_ros.model.tiny "$MODEL" --format flash_vstream > "$work/tiny_model.log" 2>&1 \
      || { cat "$work/tiny_model.log"; exit 1; }
  fi
fi
echo "[run] model: $MODEL"
echo "[run] video: ${VIDEO:-synthetic test pattern}"
echo "[run] ROS_DOMAIN_ID=$ROS_DOMAIN_ID, logs in $work"

python -m fvs_ros.ros.node --autostart --ros-args --params-file config/fvs.yaml -p "model:=$MODEL" \
  > "$work/node.log" 2>&1 &
pids+=($!)
video_args=()
if [ -n "${VIDEO:-}" ]; then video_args=(--ros-args -p "video:=$VIDEO"); fi
python -m fvs_ros.cli.video_source "${video_args[@]}" > "$work/video_source.log" 2>&1 &
pids+=($!)

echo "[run] waiting for /fvs/ask (model loading) ..."
ask() { python -m fvs_ros.cli.ask "$1" --wait "$WAIT_S" --timeout 60; }
set +e
# Readiness probe: the node refuses an empty question at once (exit 1); exit 2 = not up.
python -m fvs_ros.cli.ask "" --wait "$WAIT_S" > /dev/null 2>&1
if [ "$?" -eq 2 ]; then
  echo "[run] the node did not come up within ${WAIT_S} s; its log:"
  cat "$work/node.log"
  exit 1
fi
echo "[run] node is up"
rc=0
for _ in 1 2; do
  echo "[run] letting it watch ${WATCH_S} s of video, then asking"
  sleep "$WATCH_S"
  ask "$QUESTION"
  rc=$?
  [ "$rc" -eq 0 ] || break
done
set -e
if [ "$rc" -ne 0 ]; then
  echo "[run] FAILED (ask_client exit $rc); node log:"
  tail -n 40 "$work/node.log"
fi
echo "[run] shutting down"
exit "$rc"
