#!/usr/bin/env bash
# Sets up (scripts/setup_venv.sh) and runs the fvs_ros test suite. Extra arguments go
# to pytest (e.g. scripts/test.sh -k memory). Exits non-zero on any failure, and also
# when no test ran. FVS_ROS_DISTRO=jazzy runs it on ROS 2 Jazzy (.venv-jazzy).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
. scripts/env.sh
# A DDS domain of its own and localhost discovery: concurrent runs cannot see each other.
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export PYTHONUNBUFFERED=1
echo "[test] ROS 2 ${FVS_ROS_DISTRO:-kilted}, ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
set +e
python -m pytest test -p no:cacheprovider -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] FAILED: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
