#!/usr/bin/env bash
# The whole test suite RUNS times in a row (default 5) while LOAD busy-loop processes (default 2)
# keep every core of a small machine busy: the suite must not depend on an idle machine. The
# first run keeps the files' order; the others shuffle the tests within each module
# (pytest-random-order, seed = run number), so no test leans on the one before it. Prints, per
# run, the pass/fail/error/skip counts and the duration; exits non-zero if any run failed.
# Logs and JUnit files stay in a temporary directory (printed). Extra arguments go to pytest.
#
#   scripts/stress_test.sh                 # 5 loaded runs (~30-50 min on 2 cores)
#   RUNS=2 LOAD=4 scripts/stress_test.sh -x
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
LOAD=${LOAD:-2}
scripts/setup_venv.sh
. scripts/env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export PYTHONUNBUFFERED=1
logs=$(mktemp -d -t fvs_stress.XXXXXX)
load_pids=()

stop_load() {
  for pid in "${load_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${load_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  load_pids=()
}
trap stop_load EXIT

for _ in $(seq "$LOAD"); do
  python3 -c 'while True: pass' &
  load_pids+=($!)
done
echo "[stress] $LOAD busy-loop processes started (pids ${load_pids[*]}); $RUNS runs; logs in $logs"

bad_runs=0
for run in $(seq "$RUNS"); do
  order=()
  label="file order"
  if [ "$run" -gt 1 ]; then
    order=(--random-order-bucket=module --random-order-seed="$run")
    label="shuffled within modules, seed $run"
  fi
  # A DDS domain of its own, away from the 1-100 that scripts/test.sh picks from: a node of a
  # concurrent run in the same domain answers this run's services and counts its images.
  domain=${STRESS_DOMAIN_ID:-$(( (RANDOM % 32) + 201 ))}
  start=$(date +%s)
  set +e
  ROS_DOMAIN_ID=$domain python -m pytest test -p no:cacheprovider -q -ra \
    "${order[@]}" --junitxml="$logs/run$run.xml" "$@" > "$logs/run$run.log" 2>&1
  rc=$?
  set -e
  secs=$(( $(date +%s) - start ))
  counts=$(python3 - "$logs/run$run.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no results")
    sys.exit()
suite = root if root.tag == "testsuite" else root.find("testsuite")
n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - s} passed, {f} failed, {e} errors, {s} skipped")
EOF
)
  echo "[stress] run $run/$RUNS ($label, ROS_DOMAIN_ID=$domain): $counts in ${secs} s (pytest exit $rc)"
  if [ "$rc" -ne 0 ]; then
    bad_runs=$((bad_runs + 1))
    grep -E "^(FAILED|ERROR) " "$logs/run$run.log" | sed 's/^/[stress]   /' || true
  fi
done
stop_load
echo "[stress] $((RUNS - bad_runs)) of $RUNS loaded runs passed; logs in $logs"
[ "$bad_runs" -eq 0 ]
