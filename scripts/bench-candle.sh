#!/usr/bin/env bash
# lorafuse's candle layers vs candle's own composition, one layer forward+backward at T 512
# (benches/candle.rs), then the same-run ratios candle/lorafuse from criterion's medians.
# Run on an otherwise idle machine; the numbers go to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/candle}"
cargo bench --features candle --bench candle -- "$@"
python3 - "$CARGO_TARGET_DIR/criterion" <<'PY'
import json, os, sys
root = sys.argv[1]
print(f"{'case':44s} {'lorafuse ms':>12s} {'candle ms':>12s} {'speedup':>8s}")
# criterion keeps each group in target/criterion/<group, '/' as '_'>/<function>/new/.
for group in sorted(os.listdir(root)):
    if not group.startswith("candle_"):
        continue
    med = {}
    for side in ("lorafuse", "candle"):
        p = os.path.join(root, group, side, "new", "estimates.json")
        if os.path.exists(p):
            med[side] = json.load(open(p))["median"]["point_estimate"] / 1e6
    if len(med) == 2:
        print(f"{group:44s} {med['lorafuse']:12.2f} {med['candle']:12.2f} "
              f"{med['candle'] / med['lorafuse']:7.2f}x")
PY
