#!/usr/bin/env bash
# The CUDA toolchain that CI needs to compile and assemble kernels/*.cu without a GPU: NVRTC
# (libnvrtc.so.13), the cuda_fp16.h/cuda_bf16.h headers and ptxas, from NVIDIA's pip wheels,
# installed once into .cuda-pip/ (git-ignored).
#
#   source scripts/cuda-env.sh     # installs if missing, then exports the variables below
#   bash scripts/cuda-env.sh       # installs if missing, prints the export lines
#
# Exports LD_LIBRARY_PATH (the wheel's lib folder first), LORAFUSE_CUDA_INCLUDE (its include
# folder, for NVRTC), LORAFUSE_PTXAS and PATH (its bin folder, for ptxas). Override the
# packages with LORAFUSE_CUDA_PIP (e.g. "nvidia-cuda-nvrtc==13.0.* nvidia-cuda-runtime==13.0.*
# nvidia-cuda-nvcc==13.0.*"). Sourcing does not change the caller's shell options.

_lf_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_lf_pip="$_lf_root/.cuda-pip"
_lf_cu="$_lf_pip/nvidia/cu13"
if [ ! -e "$_lf_cu/lib/libnvrtc.so.13" ] || [ ! -x "$_lf_cu/bin/ptxas" ] \
  || [ ! -e "$_lf_cu/include/cuda_fp16.h" ] || [ ! -e "$_lf_cu/include/cuda_bf16.h" ]; then
  echo "cuda-env: installing ${LORAFUSE_CUDA_PIP:-nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-nvcc} into $_lf_pip" >&2
  # shellcheck disable=SC2086
  python3 -m pip install -q --disable-pip-version-check --target "$_lf_pip" --upgrade \
    ${LORAFUSE_CUDA_PIP:-nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-nvcc} >&2 \
    || echo "cuda-env: pip install failed; the CUDA compile test will report libnvrtc missing" >&2
fi
export LD_LIBRARY_PATH="$_lf_cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LORAFUSE_CUDA_INCLUDE="$_lf_cu/include"
export LORAFUSE_PTXAS="$_lf_cu/bin/ptxas"
export PATH="$_lf_cu/bin:$PATH"
echo "export LD_LIBRARY_PATH=\"$LD_LIBRARY_PATH\""
echo "export LORAFUSE_CUDA_INCLUDE=\"$LORAFUSE_CUDA_INCLUDE\""
echo "export LORAFUSE_PTXAS=\"$LORAFUSE_PTXAS\""
echo "export PATH=\"$PATH\""
unset _lf_root _lf_pip _lf_cu
