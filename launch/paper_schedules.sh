#!/usr/bin/env bash
# The papers' own schedules on one GPU: FedAIMS Table 2 (13 methods, 300 rounds of
# 5 local epochs, Dir(0.3) and Dir(0.1)) and FedSoL's main table (its 2-conv CNN,
# 200 rounds of 5 epochs, Dir(0.1) and 2 shards per client), seed 0, then one
# report with every table and figure.
#
#   launch/paper_schedules.sh [WORKDIR] [tiny]
#
# WORKDIR defaults to runs/paper. Each table's sweep runs in PARALLEL processes
# (default 4), the two tables side by side: 2 x PARALLEL processes share the GPU,
# each allocating memory as it needs it; clients are vmapped inside each round
# (fl.client_parallelism=auto on a GPU). The FedSoL table's flatness column is
# measured on the final models before the report. Started again, it resumes every
# unfinished run and reads back the finished ones. "tiny" runs the same script
# at the 'local' size (digits, a few rounds, two methods per table) in about a
# minute on a CPU: the smoke test of this script (tests/test_launch.py).
# ONLY (a regex over run names) restricts both sweeps, e.g. ONLY='fedaims|fedsol-'.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/paper}
SIZE=${2:-}
PARALLEL=${PARALLEL:-4}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ARG=paper
ONLY=${ONLY:-}
if [ "$SIZE" = tiny ]; then
  ARG=paper,local
  ONLY=${ONLY:-'-(fedavg|fedaims|fedsol)-'}
elif [ -n "$SIZE" ]; then
  echo "error: the second argument is 'tiny' or nothing, not '$SIZE'" >&2
  exit 2
fi
mkdir -p "$WORKDIR"
# Preallocation would reserve 75 % of the GPU per process: 2 x PARALLEL processes
# would ask for several times the card. Each takes what its runs need instead.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

start=$(date +%s)
pids=()
for sweep in fedaims fedsol; do
  for ((i = 0; i < PARALLEL; i++)); do
    "$PYTHON" -m experiments.sweep --sweep="experiments/sweeps/$sweep.py:$ARG" \
      --workdir="$WORKDIR/$sweep" --shard="$i/$PARALLEL" ${ONLY:+--only="$ONLY"} \
      > "$WORKDIR/$sweep.shard$i.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
if [ "$status" -ne 0 ]; then
  echo "error: a sweep process failed (exit $status); see $WORKDIR/*.shard*.log" >&2
  exit "$status"
fi
# The shards collected only their own view: collect every run once more.
for sweep in fedaims fedsol; do
  "$PYTHON" -m experiments.sweep --sweep="experiments/sweeps/$sweep.py:$ARG" \
    --workdir="$WORKDIR/$sweep" ${ONLY:+--only="$ONLY"} --collect > /dev/null
done
"$PYTHON" -m experiments.flatness --workdirs="$WORKDIR/fedsol"
"$PYTHON" -m experiments.report --workdirs="$WORKDIR/fedaims,$WORKDIR/fedsol" --results= \
  --standalone --out="$WORKDIR/REPORT.md" --figures="$WORKDIR/figures"
"$PYTHON" - "$WORKDIR" "$start" <<'EOF'
import json, sys, time
import jax
workdir, start = sys.argv[1], int(sys.argv[2])
d = jax.devices()[0]
info = {"device": d.device_kind, "platform": d.platform, "count": jax.device_count(),
        "wall_s": int(time.time()) - start, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
json.dump(info, open(f"{workdir}/device.json", "w"), indent=1)
print(f"{workdir}/REPORT.md written; {info['wall_s']} s on {info['count']} x {info['device']}")
EOF
