#!/bin/bash
# Plan time on a deliberately busy CPU: two spinning processes on the 2 cores, then
# `batchlab plan TASK` alternating between two code versions (each a `git archive` of src/).
#   bash benchmarks/busy_cpu_plan.sh BEFORE_COMMIT [TASK]     (AFTER is HEAD)
# Prints seconds per plan, the load, the verdict and whether it warned `busy-cpu`.
set -u
before=${1:?usage: busy_cpu_plan.sh BEFORE_COMMIT [TASK]}
task=${2:-mnist1d-cnn}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
mkdir -p "$tmp/before" "$tmp/after"
git archive "$before" src | tar -x -C "$tmp/before"
git archive HEAD src | tar -x -C "$tmp/after"
python3 -c "while True: pass" & s1=$!
python3 -c "while True: pass" & s2=$!
trap 'kill $s1 $s2 2>/dev/null; rm -rf "$tmp"' EXIT
sleep 3
for v in before after after before; do
  t0=$(date +%s.%N)
  PYTHONPATH="$tmp/$v/src" .venv/bin/python -m batchlab plan "$task" --json "$tmp/$v.json" > "$tmp/$v.out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  verdict=$(grep -o 'Verdict: [a-z]* B[0=]*[0-9]*' "$tmp/$v.out" | head -1)
  echo "$v rc=$rc seconds=$(echo "$t1 - $t0" | bc) load=$(cut -d' ' -f1 /proc/loadavg) $verdict busy-cpu=$(grep -c busy-cpu "$tmp/$v.out")"
done
