#!/usr/bin/env bash
# Every sweep behind experiments/RESULTS.md, on one machine, then the report.
#
#   launch/results_grids.sh [RUNS_DIR] [SWEEP ...]
#
# RUNS_DIR defaults to runs/; SWEEPs default to all of them, in this order:
#   isr_gap fedsol fedaims isr_taps zoo demo channel
# WORKERS processes (default 2) walk the same list at `nice 10`; each skips a run
# another is training (the workdir lock), so they share the work without a plan.
# Stopped and started again, every run resumes from its checkpoint. At the end
# the measurements that read finished models run (FedSoL's flatness, the ISR
# diagnostics), each sweep's records go to experiments/results/ and
# experiments/RESULTS.md is rebuilt from them. ISR_TAPS_ALPHA (default 0.03, the
# decoupled α that cost FL least in isr_gap) is the α of the tap-placement sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
shift || true
SWEEPS=("$@")
[ ${#SWEEPS[@]} -gt 0 ] || SWEEPS=(isr_gap fedsol fedaims isr_taps zoo demo channel)
WORKERS=${WORKERS:-2}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

spec() {  # sweep name -> the --sweep argument
  case "$1" in
    isr_gap) echo experiments/sweeps/isr_gap.py ;;
    isr_taps) echo "experiments/sweeps/isr_gap.py:taps,a${ISR_TAPS_ALPHA:-0.03}" ;;
    fedsol) echo experiments/sweeps/fedsol.py ;;
    fedaims) echo experiments/sweeps/fedaims.py ;;
    fedaims_dir01) echo experiments/sweeps/fedaims.py:dir01 ;;
    zoo) echo experiments/sweeps/zoo.py ;;
    demo) echo experiments/sweeps/demo.py ;;
    channel) echo experiments/sweeps/channel.py ;;
    *) echo "error: unknown sweep '$1': isr_gap, isr_taps, fedsol, fedaims, fedaims_dir01," \
         "zoo, demo, channel" >&2
       exit 2 ;;
  esac
}
for s in "${SWEEPS[@]}"; do spec "$s" > /dev/null; done
mkdir -p "$RUNS"

worker() {
  for s in "${SWEEPS[@]}"; do
    nice -n 10 "$PYTHON" -m experiments.sweep --sweep="$(spec "$s")" --workdir="$RUNS/$s" \
      --prior_records=experiments/results
  done
}
pids=()
for ((w = 0; w < WORKERS; w++)); do
  worker > "$RUNS/worker$w.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
[ "$status" -eq 0 ] || { echo "error: a worker failed; see $RUNS/worker*.log" >&2; exit "$status"; }

dirs=()
for s in "${SWEEPS[@]}"; do
  "$PYTHON" -m experiments.sweep --sweep="$(spec "$s")" --workdir="$RUNS/$s" --collect \
    --prior_records=experiments/results > /dev/null
  case "$s" in
    fedsol) "$PYTHON" -m experiments.flatness --workdirs="$RUNS/$s" ;;
    isr_gap|isr_taps) "$PYTHON" -m experiments.isr_diagnostics --workdirs="$RUNS/$s" ;;
  esac
  dirs+=("$RUNS/$s")
done
"$PYTHON" -m experiments.report --workdirs="$(IFS=,; echo "${dirs[*]}")" --save
