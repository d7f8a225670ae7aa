#!/usr/bin/env bash
# Every fine-tuning method on the default recipe, lorafuse against its reference library, in one
# run: `lorafuse compare` (all methods, eval loss before/after, s/step, peak RSS), then the same
# recipe in PEFT (LoRA, IA3, BEFT, LN tuning, prompt/P-/prefix tuning) or the adapters library
# (Houlsby, Pfeiffer, AdapterFusion) through scripts/peft_finetune.py, timing runs without eval.
# Writes OUT/compare.md (lorafuse's table), OUT/peers/<method>.json and OUT/vs-peers.md (s/step
# median of both and the ratio peer / lorafuse). Run it on an otherwise idle machine.
#
#   bash scripts/compare-vs-peers.sh [OUT]          (default runs/compare-vs-peers)
#
# Needs target/release/lorafuse (cargo build --release) and the peers venv of
# scripts/setup-peers.sh (with .peers/adapters-site for the adapters library).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/compare-vs-peers}"
peers="${PEERS:-.peers}"
py="$peers/venv/bin/python"
mkdir -p "$out/peers"
exe=target/release/lorafuse
methods="${METHODS:-full,lora,qlora,dora,qdora,vera,qvera,adalora,qadalora,ia3,beft,ln_tuning,prompt_tuning,p_tuning,prefix_tuning,houlsby,pfeiffer,adapter_fusion}"
peer_methods="${PEER_METHODS:-lora ia3 beft ln_tuning prompt_tuning p_tuning prefix_tuning houlsby pfeiffer adapter_fusion}"
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$exe" compare --methods "$methods" --out "$out"
for m in $peer_methods; do
  echo "== peer: $m"
  env=()
  case $m in houlsby | pfeiffer | adapter_fusion) env=(PYTHONPATH="$peers/adapters-site") ;; esac
  lr=$("$py" -c "import json; print(json.load(open('$out/$m/metrics.json'))['steps'][5]['lr'])")
  env "${env[@]}" "$py" scripts/peft_finetune.py --method "$m" --lr "$lr" --no-eval \
    --out "$out/peers/$m.json" >"$out/peers/$m.log" 2>&1
done
"$py" - "$out" $peer_methods <<'PY'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
rows = ["| method | peer | trainable (ours / peer) | s/step lorafuse | s/step peer | peer / lorafuse |",
        "|---|---|---|---|---|---|"]
for m in methods:
    ours = json.load(open(f"{out}/{m}/metrics.json"))
    peer = json.load(open(f"{out}/peers/{m}.json"))
    lib = "adapters 1.3.0" if m in ("houlsby", "pfeiffer", "adapter_fusion") else "PEFT " + peer["env"]["peft"]
    a, b = ours["seconds_per_step_median"], peer["sec_per_step_median"]
    rows.append(f"| {m} | {lib} | {ours['trainable_params']} / {peer['trainable_params']} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
text = "\n".join(rows) + "\n"
open(f"{out}/vs-peers.md", "w").write(text)
print(text)
PY
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)"
