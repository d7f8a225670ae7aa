#!/usr/bin/env bash
# lorafuse's CPU kernels against PEFT on CPU torch, measured in the same run, on the same cases.
#
#   scripts/bench-vs-peft.sh [--cases default|full|small] [--append] [--min-time S] [--filter TEXT]
#
# 1. builds and runs `lorafuse bench --json` (our times, and the machine's SGEMM peak and copy
#    bandwidth measured in the same process);
# 2. runs scripts/peft_bench.py on the same case list with $PEERS_PYTHON (default python3), which
#    needs torch and peft (see tests/golden/peers-env.txt for an offline recipe); without them it
#    says so and the table shows our times only;
# 3. prints a Markdown table (ours, PEFT, PEFT/ours, fraction of the machine's limits) with the
#    machine, the load and the date; --append adds it to BENCHMARKS.md.
#
# Both sides use 2 threads. Run it on an otherwise idle machine: another process on a core makes
# torch's OpenMP threads wait on each other (we saw 10x slower small PEFT calls under load 3).
set -euo pipefail
cd "$(dirname "$0")/.."

cases=default
append=0
min_time=1.0
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) cases="$2"; shift 2 ;;
    --append) append=1; shift ;;
    --min-time) min_time="$2"; shift 2 ;;
    --filter) filter=(--filter "$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

py="${PEERS_PYTHON:-python3}"
out="${BENCH_OUT:-target/bench-vs-peft}"
mkdir -p "$out"

# Build before the watch starts: the compiler is not a neighbour of the timed run.
cargo build --release --quiet --bin lorafuse
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
# Watch for other busy processes while we time (torch's OpenMP threads slow down 10x or more
# when another process takes a core): every 2 s, any process above 20% CPU that is not ours.
: >"$out/others.log"
(
  while sleep 2; do
    ps -eo pcpu=,etimes=,args= | awk -v t="$(date +%T)" '$1 > 20 && $2 > 2 &&
      !/lorafuse bench/ && !/peft_bench\.py/ && !/cargo build/ {print t, substr($0, 1, 120)}'
  done >>"$out/others.log" 2>/dev/null
) &
watch_pid=$!
trap 'kill $watch_pid 2>/dev/null || true' EXIT
./target/release/lorafuse bench --cases "$cases" --min-time "$min_time" "${filter[@]}" \
  --json "$out/ours.json"
echo
"$py" scripts/peft_bench.py --cases "$out/ours.json" --json "$out/both.json" \
  --markdown "$out/table.md" --min-time "$min_time" --threads 2 2>&1 \
  | grep -v -e 'kernels-community' -e 'flop_counter' | tee "$out/peft.log" | sed '/^Machine:/,$d'
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
kill $watch_pid 2>/dev/null || true
if [ -s "$out/others.log" ]; then
  others="WARNING: other processes were busy during the run, the times are not trustworthy: $(
    sort -k4 -u "$out/others.log" | head -5 | tr '\n' ';')"
  echo "$others" >&2
else
  others="No other process above 20% CPU during the run (sampled every 2 s)."
fi

{
  echo "### \`scripts/bench-vs-peft.sh --cases $cases\` ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Load average (1, 5, 15 min) before: $load_before; after: $load_after. $others"
  cat "$out/table.md"
} >"$out/section.md"
echo
cat "$out/section.md"
if [ "$append" = 1 ]; then
  { echo; cat "$out/section.md"; } >>BENCHMARKS.md
  echo "appended to BENCHMARKS.md"
fi
