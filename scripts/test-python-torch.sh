#!/usr/bin/env bash
# The Python suite WITH torch and PEFT: builds the wheel like scripts/test-python.sh, installs it
# into a git-ignored venv (python/.venv-torch) that also sees the site-packages of the peers venv
# (torch 2.15 + peft 0.21.2 + bitsandbytes, from scripts/setup-peers.sh: about 2.8 GB from PyPI,
# which is why CI does not run this), and runs every pytest file, python/tests/test_torch.py (the
# torch drop-in against real PEFT) included. LORAFUSE_REQUIRE gains `torch`, so a torch or peft
# that fails to import is a failure here, not a skip.
#   usage: bash scripts/test-python-torch.sh [pytest args]
#   LORAFUSE_PEERS_VENV: the venv with torch + peft (default .peers/venv, setup-peers.sh's output).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
export LORAFUSE_GOLDEN_DIR="${LORAFUSE_GOLDEN_DIR:-$root/tests/golden}"
peers="${LORAFUSE_PEERS_VENV:-$root/.peers/venv}"
if [ ! -x "$peers/bin/python" ]; then
  echo "no torch venv at $peers: run 'bash scripts/setup-peers.sh' (about 2.8 GB from PyPI)" \
    "or set LORAFUSE_PEERS_VENV to a venv with torch and peft" >&2
  exit 2
fi
venv="$root/python/.venv-torch"
if [ ! -x "$venv/bin/python" ]; then
  "$peers/bin/python" -m venv "$venv"
fi
# The peers' packages (torch, peft, numpy, safetensors, bitsandbytes) become visible through a
# .pth file, after this venv's own; the peers venv itself is not modified.
peers_site="$("$peers/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$peers_site" >"$site/lorafuse-peers.pth"
"$venv/bin/python" -m pip install -q --disable-pip-version-check maturin pytest
dist="$root/python/target/wheels-torch"
rm -rf "$dist"
"$venv/bin/maturin" build --release --manifest-path python/Cargo.toml \
  --interpreter "$venv/bin/python" --out "$dist"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
  "$dist"/lorafuse-*.whl
export LORAFUSE_REQUIRE="${LORAFUSE_REQUIRE:+$LORAFUSE_REQUIRE,}torch"
cd python/tests
"$venv/bin/python" -m pytest -v -rs "$@" .
