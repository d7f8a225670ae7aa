#!/usr/bin/env bash
# lorafuse's GGUF exports checked by llama.cpp itself: builds llama-cpp-python 0.3.36 from PyPI
# (it compiles llama.cpp with cmake: about 10 minutes on 2 cores, which is why CI does not run
# this) into a git-ignored venv, then runs scripts/check_llama_cpp.py on the real model: llama.cpp's
# logits for base + exported adapter and for the merged model against `lorafuse logits`.
#   usage: bash scripts/test-llama-cpp.sh [--json OUT.json]
#   LORAFUSE_LLAMA_VENV: the venv (default .peers/llama-venv); LORAFUSE_MODEL: the GGUF (default:
#   `lorafuse fetch`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LORAFUSE_LLAMA_VENV:-$PWD/.peers/llama-venv}"
if ! "$venv/bin/python" -c "import llama_cpp, gguf, safetensors" >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check numpy diskcache jinja2 typing-extensions \
    scikit-build-core cmake ninja safetensors gguf==0.19.0
  CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF" \
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
    llama-cpp-python==0.3.36
fi
cargo build --release --bin lorafuse
model="${LORAFUSE_MODEL:-$(target/release/lorafuse fetch)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" scripts/check_llama_cpp.py --lorafuse target/release/lorafuse --model "$model" \
  --work "$work" "$@"
