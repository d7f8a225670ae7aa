#!/usr/bin/env bash
# Many adapters in one batch, lorafuse against PEFT measured in the same run (CPU, 2 threads):
#
#   scripts/bench-multi.sh [--seqs 8] [--tokens 64] [--adapters 4] [--rank 8] [--min-time 1]
#                          [--train-steps 20] [--append]
#
# 1. `lorafuse bench --mixed`: prefill and one decode step of N sequences spread over K LoRA
#    adapters (every projection), against the same batch on one adapter and on the base; it
#    writes the adapters and the batch for
# 2. scripts/peft_multi_bench.py: the same with PEFT (`adapter_names=[...]` for the mixed batch),
#    with $PEERS_PYTHON (default .peers/venv/bin/python);
# 3. training: `lorafuse finetune` of one LoRA adapter and `finetune --multi` of K adapters on
#    the default data, their median s/step;
# 4. a Markdown table of the ratios; --append adds it to BENCHMARKS.md.
# Run it on an otherwise idle machine (see scripts/bench-vs-peft.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
seqs=8 tokens=64 adapters=4 rank=8 min_time=1 train_steps=20 append=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seqs) seqs="$2"; shift 2 ;;
    --tokens) tokens="$2"; shift 2 ;;
    --adapters) adapters="$2"; shift 2 ;;
    --rank) rank="$2"; shift 2 ;;
    --min-time) min_time="$2"; shift 2 ;;
    --train-steps) train_steps="$2"; shift 2 ;;
    --append) append=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
py="${PEERS_PYTHON:-.peers/venv/bin/python}"
out="${BENCH_OUT:-target/bench-multi}"
mkdir -p "$out"
export RAYON_NUM_THREADS=2
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
cargo build --release --quiet --bin lorafuse
./target/release/lorafuse bench --mixed --device cpu --seqs "$seqs" --tokens "$tokens" \
  --adapters "$adapters" --rank "$rank" --min-time "$min_time" --mixed-dir "$out"
"$py" scripts/peft_multi_bench.py --dir "$out" --threads 2 --min-time "$min_time" 2>&1 \
  | grep -v -e 'kernels-community' -e 'flop_counter'

# Training: one adapter vs K in one pass, same data and steps.
cfg="$out/multi.json"
python3 - "$adapters" >"$cfg" <<'PY'
import json, sys
k = int(sys.argv[1])
print(json.dumps({"adapters": [{"name": f"t{i}", "seed": 42 + i} for i in range(k)]}))
PY
./target/release/lorafuse finetune --device cpu --steps "$train_steps" --no-eval \
  --out "$out/train-one" >/dev/null
./target/release/lorafuse finetune --device cpu --steps "$train_steps" --no-eval \
  --multi "$cfg" --out "$out/train-multi" >/dev/null
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" "$adapters" "$load_before" "$load_after" <<'PY' | tee "$out/section.md"
import json, sys, datetime
out, k, lb, la = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ours = json.load(open(f"{out}/ours.json"))
peft = json.load(open(f"{out}/peft.json"))
ms = lambda rows, ph, c: next(r["ms"] for r in rows if r["phase"] == ph and r["case"] == c)
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
print(f"### `scripts/bench-multi.sh` ({now})\n")
print(f"{ours['seqs']} sequences x {ours['tokens']} tokens spread over {ours['adapters']} LoRA "
      f"adapters of rank {ours['rank']} on every projection of SmolLM2-135M (f32, CPU, 2 threads); "
      f"PEFT {peft['peft']}, torch {peft['torch']}. Load average before: {lb}; after: {la}.\n")
print("| phase | case | lorafuse ms | PEFT ms | PEFT / lorafuse |")
print("|---|---|---|---|---|")
for ph in ("prefill", "decode step"):
    for c in ("base model", "one adapter", "mixed"):
        o, p = ms(ours["rows"], ph, c), ms(peft["rows"], ph, c)
        print(f"| {ph} | {c} | {o:.2f} | {p:.2f} | {p / o:.2f}x |")
print()
for ph in ("prefill", "decode step"):
    o = ms(ours["rows"], ph, "mixed") / ms(ours["rows"], ph, "one adapter")
    p = ms(peft["rows"], ph, "mixed") / ms(peft["rows"], ph, "one adapter")
    print(f"- {ph}: mixed / one adapter = {o:.3f} (lorafuse), {p:.3f} (PEFT)")
one = json.load(open(f"{out}/train-one/metrics.json"))["seconds_per_step_median"]
multi = json.load(open(f"{out}/train-multi/t0/metrics.json"))["seconds_per_step_median"]
print(f"- training (default recipe, {len(json.load(open(f'{out}/train-one/metrics.json'))['steps'])} "
      f"steps): one adapter {one:.3f} s/step, {k} adapters in one pass {multi:.3f} s/step = "
      f"{multi / one:.2f}x one adapter (vs {k}x for {k} runs)")
PY
if [ "$append" = 1 ]; then
  { echo; cat "$out/section.md"; } >>BENCHMARKS.md
  echo "appended to BENCHMARKS.md"
fi
