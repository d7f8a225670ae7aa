#!/usr/bin/env bash
# Builds the Python wheel (python/, PyO3 + maturin, abi3 for CPython 3.9+) in release mode,
# installs it into a git-ignored venv (python/.venv) with numpy, pytest and safetensors from
# PyPI, and runs the pytest suite (golden vectors from $LORAFUSE_GOLDEN_DIR, default
# tests/golden, and bad-argument tests) against the installed wheel, not the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export LORAFUSE_GOLDEN_DIR="${LORAFUSE_GOLDEN_DIR:-$root/tests/golden}"
venv="$root/python/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check maturin numpy pytest safetensors gguf==0.19.0
dist="$root/python/target/wheels"
rm -rf "$dist"
"$venv/bin/maturin" build --release --manifest-path python/Cargo.toml \
  --interpreter "$venv/bin/python" --out "$dist"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
  "$dist"/lorafuse-*.whl
# Run from python/tests so that the installed wheel, not a source dir, is what gets imported.
cd python/tests
"$venv/bin/python" -m pytest -v -rs "$@" .
